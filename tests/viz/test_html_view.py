"""The HTML attention view: the page itself, then what a real headless Chromium draws from it.

The browser tests load the page from a file:// URL in ``chromium --headless --dump-dom``, which prints the DOM
after the page's JavaScript has run, and read back what the script drew: the SVG ``<line>`` elements of the
head view (one per drawn weight, with ``data-head``/``data-from``/``data-to`` and ``stroke-opacity``), the
options of the layer select, the head checkboxes and the model view's thumbnails. A screenshot checks that
something visible is painted.

Chromium: Debian's ``chromium`` package (``apt-get install chromium``), or the binary named by ``QKV_CHROMIUM``.
Without it the browser tests are skipped, unless ``CI`` is set: CI installs it, so there they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from qkv.viz.html_view import render_html, save_html, view_data

TOKENS = ["The", "cat", "</script>", "sat", "on", "mats"]
LAYERS, HEADS, L = 3, 4, len(TOKENS)
TIMEOUT_S = 60


def make_attention() -> np.ndarray:
    """(layers, H, L, L) causal softmax rows, with a few more exact zeros, so lines are countable."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(LAYERS, HEADS, L, L))
    scores = np.where(np.tril(np.ones((L, L), dtype=bool)), scores, -np.inf)
    scores[1, 2, 4, 1] = scores[2, 0, 5, 3] = -np.inf
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


ATTENTION = make_attention()
SHOWN = np.round(ATTENTION, 4)  # what the page embeds


# ---- the page, without a browser ------------------------------------------------------------------------------


def embedded(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="qkv-data">(.*?)</script>', page, re.S)
    assert match, "no embedded data"
    return json.loads(match.group(1))


def test_page_is_self_contained():
    page = render_html(torch.tensor(ATTENTION), TOKENS, title="cat <sat>")
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>cat &lt;sat&gt;</title>" in page
    # No external resource: no src/href attribute, no stylesheet link, no CSS url() or @import; the only URL is
    # the SVG namespace, which is a name and never fetched.
    assert not re.search(r"\b(src|href)\s*=", page)
    assert "<link" not in page and "url(" not in page and "@import" not in page
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) == {"http://www.w3.org/2000/svg"}
    assert "default-src 'none'" in page
    # The "</script>" token is escaped inside the data, so only the page's own two script elements end.
    assert page.count("</script>") == 2


def test_embedded_data():
    data = embedded(render_html(ATTENTION, TOKENS, title="t"))
    assert data == view_data(ATTENTION, TOKENS, title="t")
    (kind,) = data["kinds"]
    assert kind["name"] == "attention" and kind["tokens"] == TOKENS and kind["key_tokens"] == TOKENS
    assert (kind["layers"], kind["heads"]) == (LAYERS, HEADS)
    np.testing.assert_array_equal(kind["attention"], SHOWN)


def test_several_kinds_and_cross_attention():
    src, tgt = ["a", "b", "c"], ["x", "y"]
    data = view_data(
        {"encoder": np.ones((2, 1, 3, 3)) / 3, "cross": np.ones((1, 2, 2, 3)) / 3},
        tokens={"encoder": src, "cross": tgt},
        key_tokens={"cross": src},
    )
    encoder, cross = data["kinds"]
    assert (encoder["name"], encoder["tokens"], encoder["key_tokens"]) == ("encoder", src, src)
    assert (cross["name"], cross["tokens"], cross["key_tokens"], cross["layers"], cross["heads"]) == (
        "cross",
        tgt,
        src,
        1,
        2,
    )


def test_errors():
    with pytest.raises(ValueError, match=r"shape \(4, 6, 6\); expected \(layers, H, L, S\)"):
        render_html(ATTENTION[0], TOKENS)
    with pytest.raises(ValueError, match=r"pick one sequence"):
        render_html(np.stack([ATTENTION, ATTENTION]), TOKENS)
    with pytest.raises(ValueError, match=r"tokens for 'attention': 5 tokens given but the attention has L"):
        render_html(ATTENTION, TOKENS[:5])
    with pytest.raises(ValueError, match=r"give key_tokens for 'cross'"):
        render_html({"cross": np.ones((1, 1, 2, 3)) / 3}, ["x", "y"])
    with pytest.raises(ValueError, match=r"tokens has no entry for attention kind 'decoder'"):
        render_html({"decoder": ATTENTION}, {"encoder": TOKENS})
    with pytest.raises(ValueError, match="negative"):
        render_html(-ATTENTION, TOKENS)
    with pytest.raises(ValueError, match="NaN"):
        render_html(ATTENTION * np.nan, TOKENS)


def test_causal_kinds():
    data = view_data(ATTENTION, TOKENS, causal=True)
    assert data["kinds"][0]["causal"] is True
    assert view_data(ATTENTION, TOKENS)["kinds"][0]["causal"] is False
    cross = np.ones((1, 1, 2, 3)) / 3
    named = view_data(
        {"decoder": ATTENTION, "cross": cross},
        {"decoder": TOKENS, "cross": ["x", "y"]},
        key_tokens={"cross": ["a", "b", "c"]},
        causal=["decoder"],
    )
    assert [(k["name"], k["causal"]) for k in named["kinds"]] == [("decoder", True), ("cross", False)]
    # Bottom-right aligned when L < S: the last of 2 queries sees all 3 keys, the first only 2.
    bottom_right = np.array([[[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]]])
    assert view_data(bottom_right, ["x", "y"], key_tokens=["a", "b", "c"], causal=True)["kinds"][0]["causal"]


def test_causal_errors():
    with pytest.raises(ValueError, match=r"marked causal but weight \[0, 0, 0, 1\] = 0.4 lies above the diagonal"):
        render_html(np.array([[[[0.6, 0.4], [0.5, 0.5]]]]), ["a", "b"], causal=True)
    with pytest.raises(ValueError, match=r"causal names \['encoder'\], which are not kinds"):
        render_html({"decoder": ATTENTION}, TOKENS, causal=["encoder"])
    with pytest.raises(ValueError, match="marked causal but has L = 3 > S = 2"):
        render_html(np.ones((1, 1, 3, 2)) / 2, ["a", "b", "c"], key_tokens=["x", "y"], causal=True)
    with pytest.raises(ValueError, match="not one string 'decoder'"):
        render_html({"decoder": ATTENTION}, TOKENS, causal="decoder")


# ---- in a real browser ------------------------------------------------------------------------------------------


def find_chromium() -> str | None:
    if os.environ.get("QKV_CHROMIUM"):
        return os.environ["QKV_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = find_chromium()
    if binary is None:
        reason = "Chromium not found (apt-get install chromium, or set QKV_CHROMIUM to a Chrome/Chromium binary)"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {reason}; CI must install it to test the HTML view")
        pytest.skip(reason)
    return binary


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"chromium exited with {result.returncode}: {result.stderr[-2000:]}"
    return result


class Dom(HTMLParser):
    """Every element of a dumped DOM as ``(tag, attrs, text, ancestor ids)``; text is its own character data."""

    VOID = {"meta", "input", "br", "img", "link", "hr", "wbr", "area", "base", "col", "embed", "source", "track"}

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str], list[str], set[str]]] = []
        self._open: list[tuple[str, dict[str, str], list[str], set[str]]] = []
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        ancestors = {a["id"] for _, a, _, _ in self._open if "id" in a}
        element = (tag, {name: value or "" for name, value in attrs}, [], ancestors)
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data):
        if self._open:
            self._open[-1][2].append(data)

    def find(self, tag: str, *, within: str | None = None, **attrs: str) -> list[tuple[dict[str, str], str]]:
        """``(attrs, text)`` of the elements with this tag, inside the element with id ``within``, whose
        attributes have these values (``class_`` names one of the classes, ``data_x`` is ``data-x``)."""
        wanted_class = attrs.pop("class_", None)
        return [
            (a, "".join(text))
            for t, a, text, ancestors in self.elements
            if t == tag
            and (within is None or within in ancestors)
            and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())
            and (wanted_class is None or wanted_class in a.get("class", "").split())
        ]


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    return save_html(tmp_path_factory.mktemp("view") / "view.html", ATTENTION, TOKENS, title="test view")


def load(chromium: str, tmp_path: Path, url: str, *extra: str) -> Dom:
    result = run_chromium(chromium, tmp_path / "profile", *extra, "--dump-dom", url)
    dom = Dom(result.stdout)
    ((body, _),) = dom.find("body")
    assert body.get("data-status") == "ready", f"the page's script failed: {body.get('data-error')!r}"
    return dom


def drawn_lines(dom: Dom) -> dict[tuple[int, int, int], float]:
    """``{(head, from, to): opacity}`` of the head view's lines."""
    lines = {}
    for attrs, _ in dom.find("line", class_="attn"):
        key = (int(attrs["data-head"]), int(attrs["data-from"]), int(attrs["data-to"]))
        assert key not in lines, f"line {key} drawn twice"
        lines[key] = float(attrs["stroke-opacity"])
    return lines


def expected_lines(layer: int, heads, rows=range(L), cols=range(L)) -> dict[tuple[int, int, int], float]:
    return {(h, i, j): SHOWN[layer, h, i, j] for h in heads for i in rows for j in cols if SHOWN[layer, h, i, j] > 0}


def check_lines(dom: Dom, expected: dict[tuple[int, int, int], float]) -> None:
    lines = drawn_lines(dom)
    assert len(lines) == len(expected)
    assert lines.keys() == expected.keys()
    keys = sorted(expected)
    np.testing.assert_allclose([lines[k] for k in keys], [expected[k] for k in keys], atol=5e-4)


@pytest.fixture(scope="module")
def default_view(chromium, page, tmp_path_factory) -> tuple[Dom, Path]:
    """The page as first opened: its DOM and, from the same Chromium run, a 900×700 screenshot."""
    tmp_path = tmp_path_factory.mktemp("default")
    shot = tmp_path / "view.png"
    dom = load(chromium, tmp_path, page.as_uri(), f"--screenshot={shot}", "--window-size=900,700")
    return dom, shot


def test_browser_default_view(default_view):
    dom, _ = default_view
    # Layer 0, every head, every token: one line per non-zero weight, opacity = weight.
    expected = expected_lines(0, range(HEADS))
    assert len(expected) == HEADS * L * (L + 1) // 2  # causal: row i has i + 1 non-zero weights
    check_lines(dom, expected)
    colors = {h: {a["stroke"] for a, _ in dom.find("line", class_="attn", data_head=str(h))} for h in range(HEADS)}
    assert all(len(c) == 1 for c in colors.values()) and len(set.union(*colors.values())) == HEADS

    layer_options = [(a["value"], text) for a, text in dom.find("option", within="layer")]
    assert layer_options == [(str(n), f"Layer {n}") for n in range(LAYERS)]
    ((kind_control, _),) = dom.find("label", id="kind-control")
    assert "hidden" in kind_control, "one kind of attention needs no kind select"
    boxes = dom.find("input", class_="head-toggle")
    assert [a["data-head"] for a, _ in boxes] == [str(h) for h in range(HEADS)]
    assert all("checked" in a for a, _ in boxes)

    assert [text for _, text in dom.find("text", class_="left")] == TOKENS
    assert [text for _, text in dom.find("text", class_="right")] == TOKENS
    thumbs = dom.find("figure", class_="thumb")
    assert len(thumbs) == LAYERS * HEADS
    assert {(a["data-layer"], a["data-head"]) for a, _ in thumbs} == {
        (str(n), str(h)) for n in range(LAYERS) for h in range(HEADS)
    }
    assert len(dom.find("canvas")) == LAYERS * HEADS


def test_browser_fragment_preselects_layer_heads_token(chromium, page, tmp_path):
    dom = load(chromium, tmp_path, page.as_uri() + "#layer=2&heads=0,3&token=5")
    check_lines(dom, expected_lines(2, [0, 3], rows=[5]))
    assert all(int(a["data-from"]) == 5 for a, _ in dom.find("line", class_="attn"))
    # The controls show the state: the selected option, checked heads, the highlighted token, marked thumbnails.
    assert [a["value"] for a, _ in dom.find("option", within="layer") if "selected" in a] == ["2"]
    assert [a["data-head"] for a, _ in dom.find("input", class_="head-toggle") if "checked" in a] == ["0", "3"]
    assert [text for _, text in dom.find("text", class_="active")] == ["mats"]
    selected = {(a["data-layer"], a["data-head"]) for a, _ in dom.find("figure", class_="selected")}
    assert selected == {("2", "0"), ("2", "3")}
    ((summary, _),) = dom.find("p", id="summary")
    assert summary["data-lines"] == str(len(expected_lines(2, [0, 3], rows=[5])))


def test_browser_query_selects_attended_to_token(chromium, page, tmp_path):
    # The zero weight at [2, 0, 5, 3] draws no line: token 3 receives lines from rows 3 and 4 only.
    dom = load(chromium, tmp_path, page.as_uri() + "?layer=2&heads=0&key=3")
    check_lines(dom, expected_lines(2, [0], cols=[3]))
    assert len(drawn_lines(dom)) == 2


def page_with_script(tmp_path: Path, script: str) -> Path:
    """The view with ``script`` appended: it runs after the view's own script, like a user's actions."""
    path = tmp_path / "interactive.html"
    page = render_html(ATTENTION, TOKENS).replace("</body>", f"<script>{script}</script></body>")
    path.write_text(page, encoding="utf-8")
    return path


CONTROLS_AND_HOVER = """
    for (const h of [1, 2, 3]) document.querySelector('.head-toggle[data-head="' + h + '"]').click();
    const layer = document.getElementById("layer");
    layer.value = "1";
    layer.dispatchEvent(new Event("change"));
    document.querySelector('#head-svg text.left[data-index="3"]').dispatchEvent(new MouseEvent("mouseenter"));
"""


def test_browser_controls_and_hover(chromium, tmp_path):
    dom = load(chromium, tmp_path, page_with_script(tmp_path, CONTROLS_AND_HOVER).as_uri())
    check_lines(dom, expected_lines(1, [0], rows=[3]))
    assert [text for _, text in dom.find("text", class_="active")] == ["sat"]


def test_browser_leave_and_thumbnail_click(chromium, tmp_path):
    script = (
        CONTROLS_AND_HOVER
        + """
    document.querySelector('#head-svg text.left[data-index="3"]').dispatchEvent(new MouseEvent("mouseleave"));
    document.querySelector('.thumb[data-layer="2"][data-head="1"]').click();
    """
    )
    dom = load(chromium, tmp_path, page_with_script(tmp_path, script).as_uri())
    check_lines(dom, expected_lines(2, [1]))  # every token's lines again, of the clicked layer and head
    assert [a["value"] for a, _ in dom.find("option", within="layer") if "selected" in a] == ["2"]
    assert dom.find("text", class_="active") == []


def test_browser_several_kinds(chromium, tmp_path):
    rng = np.random.default_rng(1)
    src, tgt = ["ein", "Haus", "."], ["a", "house", ".", "</s>"]
    cross = rng.dirichlet(np.ones(3), size=(2, 3, 4))  # (layers=2, H=3, T=4, S=3)
    path = save_html(
        tmp_path / "seq2seq.html",
        {"encoder": rng.dirichlet(np.ones(3), size=(1, 2, 3)), "cross": cross},
        tokens={"encoder": src, "cross": tgt},
        key_tokens={"cross": src},
    )
    dom = load(chromium, tmp_path, path.as_uri() + "#kind=cross&layer=1&heads=2")
    kind_options = [(text, "selected" in a) for a, text in dom.find("option", within="kind")]
    assert kind_options == [("encoder", False), ("cross", True)]
    assert [text for _, text in dom.find("option", within="layer")] == ["Layer 0", "Layer 1"]
    assert [text for _, text in dom.find("text", class_="left")] == tgt
    assert [text for _, text in dom.find("text", class_="right")] == src
    assert len(dom.find("figure", class_="thumb")) == 2 * 3
    shown = np.round(cross, 4)
    lines = drawn_lines(dom)
    assert lines.keys() == {(2, i, j) for i in range(4) for j in range(3)}
    np.testing.assert_allclose([lines[(2, i, j)] for i in range(4) for j in range(3)], shown[1, 2].ravel(), atol=5e-4)


# Reads back what the thumbnail of layer 0, head 0 painted: its top-right cell (masked when causal) and its
# bottom-left cell (a weight), as "r,g,b,a".
THUMBNAIL_PIXELS = """
    const canvas = document.querySelector('.thumb[data-layer="0"][data-head="0"] canvas');
    const ctx = canvas.getContext("2d");
    const pixel = (x, y) => Array.from(ctx.getImageData(x, y, 1, 1).data).join(",");
    document.body.dataset.masked = pixel(canvas.width - 1, 0);
    document.body.dataset.seen = pixel(0, canvas.height - 1);
"""


@pytest.mark.parametrize("causal", [True, False])
def test_browser_causal_view_greys_out_what_a_token_cannot_see(chromium, tmp_path, causal):
    path = tmp_path / "causal.html"
    page = render_html(ATTENTION, TOKENS, causal=causal)
    path.write_text(page.replace("</body>", f"<script>{THUMBNAIL_PIXELS}</script></body>"), encoding="utf-8")

    dom = load(chromium, tmp_path, path.as_uri() + "#token=2")
    check_lines(dom, expected_lines(0, range(HEADS), rows=[2]))
    masked = [int(a["data-index"]) for a, _ in dom.find("text", class_="masked")]
    assert masked == ([3, 4, 5] if causal else [])
    assert all("right" in a["class"] for a, _ in dom.find("text", class_="masked"))
    ((note, text),) = dom.find("p", id="kind-note")
    assert ("hidden" not in note and text.startswith("Causal: each token attends only to itself")) == causal
    ((body, _),) = dom.find("body")
    masked_cell = tuple(map(int, body["data-masked"].split(",")))
    seen_cell = tuple(map(int, body["data-seen"].split(",")))
    # Opaque grey where the mask hides a key; a weight of 0 is transparent, a weight > 0 partly opaque.
    assert masked_cell == (230, 230, 230, 255) if causal else masked_cell[3] == 0
    assert 0 < seen_cell[3] < 255

    by_key = load(chromium, tmp_path, path.as_uri() + "#key=2")
    masked = [(a["class"], int(a["data-index"])) for a, _ in by_key.find("text", class_="masked")]
    assert masked == ([("token left masked", 0), ("token left masked", 1)] if causal else [])


def test_browser_screenshot(default_view):
    _, shot = default_view
    assert shot.stat().st_size > 1000
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (700, 900)
    rgb = (pixels * 255).round().astype(np.int64)
    colors = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])
    assert len(colors) > 50, f"only {len(colors)} colors: the page looks blank"
    # Some pixels carry a head's color (drawn lines, thumbnails), not just black text on white.
    saturation = pixels.max(axis=-1) - pixels.min(axis=-1)
    assert (saturation > 0.3).mean() > 0.005
