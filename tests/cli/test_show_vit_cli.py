"""``qkv show`` on an image classifier (a ViT directory ``qkv train`` writes): the weights in JSON are the
model's over ``[CLS]`` and the patches, the PNG overlay, the HTML head/model view over the patch tokens read
back from headless Chromium, the summary and ``--top``, and the bad inputs as one-line errors.

The model directory is built here, tiny and untrained: ``save_model`` and a ``preprocessing.json``, the files
``qkv train`` writes.
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
from PIL import Image

from qkv.cli import main
from qkv.models import VisionTransformer, ViTConfig, save_model
from qkv.train.image_inference import ImageClassifier

GRID = 2
PATCH_TOKENS = ["[CLS]", "p(0,0)", "p(0,1)", "p(1,0)", "p(1,1)"]
pytestmark = pytest.mark.usefixtures("one_thread")


def vit_dir(root: Path, pooling: str) -> Path:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        num_classes=3,
        d_model=16,
        num_layers=2,
        num_heads=2,
        ffn_dim=32,
        pooling=pooling,
        class_names=["zero", "one", "two"],
    )
    save_model(VisionTransformer(config), root)
    preprocessing = {"image_size": 8, "num_channels": 1, "mean": [0.3], "std": [0.4], "dataset": "digits"}
    (root / "preprocessing.json").write_text(json.dumps(preprocessing), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    return vit_dir(tmp_path_factory.mktemp("vit"), "cls")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "digit.png"
    pixels = np.zeros((8, 8), dtype=np.uint8)
    pixels[1:7, 3:5] = 255  # a "1"
    Image.fromarray(pixels).save(path)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(["show", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_json_is_the_models_attention_over_cls_and_patches(vit, image, tmp_path, capsys) -> None:
    path = tmp_path / "a.json"
    status, out, err = run(capsys, "--model", str(vit), str(image), "--json", str(path))
    assert (status, out, err) == (0, f"wrote {path}\n", "")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert (data["tokens"], data["layers"], data["heads"], data["causal"]) == (PATCH_TOKENS, 2, 2, False)
    classifier = ImageClassifier.load(vit)
    pixels = classifier.read(image)
    torch.testing.assert_close(pixels[0, 1, 3], torch.tensor(1.0))
    with torch.no_grad():
        expected = classifier.model(((pixels - 0.3) / 0.4)[None], need_attention=True).attention[0]
    np.testing.assert_allclose(np.array(data["attentions"]), expected.double().numpy(), atol=1e-6)


def test_png_summary_and_top(vit, image, tmp_path, capsys) -> None:
    png = tmp_path / "a.png"
    status, out, err = run(capsys, "--model", str(vit), str(image), "--png", str(png), "--layer", "0", "--head", "1")
    assert (status, out, err) == (0, f"wrote {png}\n", "")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    status, out, _ = run(capsys, "--model", str(vit), str(image))
    lines = out.splitlines()
    assert status == 0 and re.fullmatch(rf"{re.escape(str(image))}: predicted (zero|one|two) \(\d+\.\d%\)", lines[0])
    assert lines[2] == f"{vit}: 2 layers x 2 heads, 5 tokens"
    status, out, _ = run(capsys, "--model", str(vit), str(image), "--top", "[CLS]")
    assert status == 0 and out.startswith("from '[CLS]' (position 0)")


def test_mean_pooling_has_no_class_token(tmp_path, image, capsys) -> None:
    model = vit_dir(tmp_path / "mean", "mean")
    path = tmp_path / "a.json"
    assert run(capsys, "--model", str(model), str(image), "--json", str(path), "--png", str(tmp_path / "a.png"))[0] == 0
    assert json.loads(path.read_text(encoding="utf-8"))["tokens"] == PATCH_TOKENS[1:]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["MISSING.png"], "MISSING.png: no such image file"),
        (["IMAGE", "--target", "x"], "--target applies to translation models"),
        (["IMAGE", "--layer", "2", "--png", "out.png"], r"--layer 2 is out of range: the model has 2 layers"),
        (["IMAGE", "--kind", "cross"], "--kind cross: .* has no such attention; its kinds: self"),
    ],
)
def test_errors_are_one_line(vit, image, tmp_path, capsys, argv, message) -> None:
    argv = [str(image) if a == "IMAGE" else str(tmp_path / a) if a.endswith(".png") else a for a in argv]
    status, out, err = run(capsys, "--model", str(vit), *argv)
    assert status == 2 and out == ""
    assert err.startswith("qkv show: error: ") and err.count("\n") == 1 and re.search(message, err), err


# ---- the HTML view in headless Chromium (as tests/viz/test_html_view.py runs it) -------------------------------


class Elements(HTMLParser):
    """``(tag, attrs, text)`` of every element of a dumped DOM."""

    def __init__(self, markup: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []
        self.feed(markup)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}, []))

    def handle_data(self, data: str) -> None:
        if self.elements:
            self.elements[-1][2].append(data)

    def find(self, tag: str, cls: str) -> list[tuple[dict[str, str], str]]:
        return [(a, "".join(t).strip()) for g, a, t in self.elements if g == tag and cls in a.get("class", "").split()]


def test_browser_head_view_over_the_patch_tokens(vit, image, tmp_path, capsys) -> None:
    binary = os.environ.get("QKV_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but Chromium is not found; CI must install it to test the HTML view")
        pytest.skip("Chromium not found (apt-get install chromium, or set QKV_CHROMIUM)")
    page = tmp_path / "view.html"
    assert run(capsys, "--model", str(vit), str(image), "--html", str(page))[0] == 0
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage"]
    flags += [f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom"]
    result = subprocess.run(
        [binary, *flags, page.as_uri() + "#layer=1&heads=0"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    dom = Elements(result.stdout)
    assert 'data-status="ready"' in result.stdout, "the page's script did not finish"
    assert [text for _, text in dom.find("text", "left")] == PATCH_TOKENS
    assert [text for _, text in dom.find("text", "right")] == PATCH_TOKENS
    assert len(dom.find("figure", "thumb")) == 4  # 2 layers x 2 heads
    lines = dom.find("line", "attn")
    assert {a["data-head"] for a, _ in lines} == {"0"}
    assert len(lines) == 25  # layer 1, head 0: softmax weights over 5 tokens, none of them 0
