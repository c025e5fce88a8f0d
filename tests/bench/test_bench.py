"""qkv bench: the FLOP count, the naive peer against qkv's reference, the CLI's outputs, skips and n/a."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

import qkv
from qkv.bench import FEATURES, PEERS, BenchConfig, Case, attention_flops, naive_attention, run_bench
from qkv.bench.cases import make_inputs
from qkv.bench.runner import SAFETY, estimate_bytes
from qkv.cli import main
from qkv.cli.bench import parse_size
from qkv.ops.dropout import draw_seed, keep_mask
from qkv.ops.spec import build_spec

TOL = {"rtol": 1e-10, "atol": 1e-10}


# --- FLOPs --------------------------------------------------------------------------------------------


def test_flops_by_hand() -> None:
    # B=2, H=8, L=S=1024, D=64: two matmuls of 2·L·S·D multiply-adds each, per head.
    fwd = 2 * 8 * (2 * 1024 * 1024 * 64 + 2 * 1024 * 1024 * 64)
    assert fwd == 4_294_967_296  # 2**32
    assert attention_flops(2, 8, 1024, 1024, 64, causal=False, mode="fwd") == fwd
    assert attention_flops(2, 8, 1024, 1024, 64, causal=True, mode="fwd") == fwd / 2
    assert attention_flops(2, 8, 1024, 1024, 64, causal=False, mode="fwd+bwd") == fwd * 3.5
    assert attention_flops(2, 8, 1024, 1024, 64, causal=True, mode="fwd+bwd") == fwd / 2 * 3.5


def test_case_flops_use_its_shape() -> None:
    case = Case("bottom_right", 512, 32, "fwd", batch=3, heads=4)
    assert (case.q_len, case.kv_len, case.causal) == (256, 512, True)
    assert case.flops == 4 * 3 * 4 * 256 * 512 * 32 / 2
    assert Case("alibi", 512, 32, "fwd+bwd").flops == 4 * 8 * 512 * 512 * 32 * 3.5
    assert Case.from_json(json.loads(json.dumps(case.to_json()))) == case


# --- the naive peer computes what qkv.attention computes ------------------------------------------------


def _naive_and_math(case: Case, features: dict) -> None:
    inputs = make_inputs(case, seed=1)
    q, k, v = inputs.q, inputs.k, inputs.v
    gen = torch.Generator().manual_seed(7) if "dropout" in features else None
    ours = qkv.attention(q, k, v, backend="math", generator=gen, **features)
    keep = None
    if "dropout" in features:  # the same weights dropped: qkv's pattern for the seed the generator gives
        spec = build_spec(q, k, v, dropout=features["dropout"])
        seed = draw_seed(torch.Generator().manual_seed(7))
        keep = keep_mask(spec, seed, 0, case.q_len, 0, case.kv_len, q.device)
    naive = naive_attention(q, k, v, keep=keep, **features)
    ours_t = ours if isinstance(ours, tuple) else (ours,)
    naive_t = naive if isinstance(naive, tuple) else (naive,)
    assert len(ours_t) == len(naive_t)
    for a, b in zip(ours_t, naive_t, strict=True):
        torch.testing.assert_close(b, a, **TOL)
    assert inputs.grad_out is not None
    grads_ours = torch.autograd.grad(ours_t[0], (q, k, v), inputs.grad_out)
    grads_naive = torch.autograd.grad(naive_t[0], (q, k, v), inputs.grad_out)
    for a, b in zip(grads_ours, grads_naive, strict=True):
        torch.testing.assert_close(b, a, **TOL)


@pytest.mark.parametrize("feature", list(FEATURES))
def test_naive_equals_math(feature: str) -> None:
    case = Case(feature, 24, 8, "fwd+bwd", batch=2, heads=4, dtype="float64")
    _naive_and_math(case, make_inputs(case).features)


@pytest.mark.parametrize(
    "features",
    [
        {"window": (5, 2)},
        {"window": (-1, 3)},
        {"window": (4, -1), "causal": True},
        {"alibi_slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625]), "causal": True, "softcap": 5.0},
    ],
    ids=["window", "window-right", "window-causal", "alibi-causal-softcap"],
)
def test_naive_equals_math_on_combinations(features: dict) -> None:
    _naive_and_math(Case("bottom_right", 24, 8, "fwd+bwd", batch=2, heads=4, dtype="float64"), features)


# --- the command: files, table, JSON ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, dict, str, object]:
    """``qkv bench --quick`` at tiny sizes, memory measured as --quick does (first case, largest length)."""
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "bench",
        "--quick",
        "--lengths",
        "32",
        "64",
        "--head-dims",
        "16",
        "--heads",
        "2",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(argv)
    data = json.loads((out / "bench.json").read_text())
    return status, stdout.getvalue(), data, (out / "bench.md").read_text(), out


def test_quick_writes_well_formed_json(quick_run) -> None:
    status, _, data, _, _ = quick_run
    assert status == 0
    assert {"created", "machine", "config", "conventions", "results"} <= set(data)
    machine = data["machine"]
    for key in ("torch", "threads", "cpu_model", "device", "python"):
        assert machine[key], key
    assert machine["threads"] == 1 and machine["device"] == "cpu"
    assert set(data["conventions"]) == {"flops", "ratio", "memory"}
    results = data["results"]
    assert len(results) == 2 * 3 * 2 * len(PEERS)  # lengths × --quick's cases × modes × backends
    for r in results:
        assert r["status"] in ("ok", "n/a"), r
        if r["status"] == "ok":
            assert len(r["times_s"]) == 1 and all(t > 0 for t in r["times_s"])
            assert r["median_s"] > 0 and r["gflops"] > 0 and r["flops"] > 0
            assert r["gflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e9)
        else:
            assert r["reason"] and r["median_s"] is None


def test_quick_ratios_match_the_times(quick_run) -> None:
    results = quick_run[2]["results"]

    def key(r: dict) -> tuple:
        return r["feature"], r["length"], r["head_dim"], r["mode"]

    torch_time = {key(r): r["median_s"] for r in results if r["backend"] == "torch" and r["status"] == "ok"}
    checked = 0
    for r in results:
        if r["status"] == "ok" and key(r) in torch_time:
            assert r["ratio_to_torch"] == pytest.approx(r["median_s"] / torch_time[key(r)])
            checked += 1
        else:
            assert r["ratio_to_torch"] is None
    assert checked >= 2 * 2 * 2 * len(PEERS)  # plain and causal: every backend has a ratio


def test_quick_measures_memory_of_the_first_case_at_the_largest_length(quick_run) -> None:
    results = quick_run[2]["results"]
    measured = [r for r in results if r["peak_bytes"] is not None]
    assert {(r["feature"], r["length"]) for r in measured} == {("plain", 64)}
    assert len(measured) == 2 * len(PEERS)  # both modes, every backend
    for r in measured:
        assert r["memory_error"] is None and r["memory_method"] and r["peak_bytes"] >= 0


def test_quick_reports_na_with_the_reason(quick_run) -> None:
    results = quick_run[2]["results"]
    softcap = {r["backend"]: r for r in results if r["feature"] == "softcap"}
    assert softcap["torch"]["status"] == "n/a" and "soft" in softcap["torch"]["reason"]
    assert softcap["sdpa"]["status"] == "n/a" and "soft" in softcap["sdpa"]["reason"]
    assert softcap["auto"]["status"] == "ok" and softcap["auto"]["runs_on"] in ("math", "tiled")  # not torch


def test_quick_markdown_table(quick_run) -> None:
    _, stdout, data, markdown, _ = quick_run
    assert stdout == markdown
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header[:6] == ["case", "L", "S", "D", "mode", "backend"] and "× torch" in header
    assert set(rows[1].replace("|", "")) == {"-"}
    body = rows[2:]
    assert len(body) == len(data["results"])
    cells = {tuple(c.strip() for c in row.strip("|").split("|")[:6]) for row in body}
    expected = {
        (r["feature"], str(r["q_len"]), str(r["kv_len"]), str(r["head_dim"]), r["mode"], r["backend"])
        for r in data["results"]
    }
    assert cells == expected  # one row per (case, length, mode, backend)
    assert any("n/a: SDPA has no soft-capping" in row for row in body)


def test_quick_writes_png_plots(quick_run) -> None:
    out = quick_run[4]
    pngs = [out / "bench.png", *sorted((out / "plots").glob("*.png"))]
    assert len(pngs) == 1 + 3 * 2  # bench.png + one per (case, mode)
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


# --- skipping, n/a, options --------------------------------------------------------------------------------


def test_a_case_over_the_memory_limit_is_skipped_with_its_estimate() -> None:
    config = BenchConfig(
        lengths=(32,),
        head_dims=(8,),
        features=("plain", "softcap"),
        modes=("fwd",),
        backends=("math", "tiled", "torch", "naive"),
        repeats=1,
        memory_limit=1000,
    )
    results = run_bench(config, progress=False)
    by = {(r.case.feature, r.backend): r for r in results}
    assert by[("softcap", "torch")].status == "n/a"  # n/a wins: it is decided before any estimate
    for (feature, backend), r in by.items():
        if (feature, backend) == ("softcap", "torch"):
            continue
        assert r.status == "skipped", r
        assert r.estimate_bytes > SAFETY * 1000
        assert "estimated to need ~" in r.reason and "available" in r.reason
        assert r.times_s == [] and r.median_s is None and r.peak_bytes is None


def test_memory_estimates_separate_dense_from_tiled() -> None:
    big = Case("plain", 16384, 64, "fwd")
    dense = 8 * 16384 * 16384 * 4  # one float32 score matrix for 8 heads: 8 GiB
    assert estimate_bytes(big, "math") >= 3 * dense
    assert estimate_bytes(big, "naive") >= 3 * dense
    assert estimate_bytes(big, "tiled") < dense / 20
    assert estimate_bytes(big, "torch") < dense / 20
    assert estimate_bytes(Case("plain", 16384, 64, "fwd+bwd"), "math") > estimate_bytes(big, "math")


def test_unsupported_backends_are_na_not_errors() -> None:
    config = BenchConfig(
        lengths=(16,),
        head_dims=(8,),
        features=("weights", "key_lengths", "alibi", "window"),
        modes=("fwd",),
        backends=("torch", "sdpa", "naive"),
        repeats=1,
        memory=False,
    )
    by = {(r.case.feature, r.backend): r for r in run_bench(config, progress=False)}
    assert by[("weights", "torch")].status == "n/a" and "weights" in by[("weights", "torch")].reason
    for feature in ("weights", "key_lengths", "alibi", "window"):
        assert by[(feature, "sdpa")].status == "n/a" and by[(feature, "sdpa")].reason
        assert by[(feature, "naive")].status == "ok"
    for feature in ("key_lengths", "alibi", "window"):  # qkv's torch backend builds the mask
        assert by[(feature, "torch")].status == "ok"


def test_sizes_and_bad_options() -> None:
    assert parse_size("8G") == 8 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1000") == 1000
    assert main(["bench", "--lengths", "0", "--no-memory", "--no-progress"]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "--cases", "nonsense"])
    assert math.isclose(parse_size("1.5k"), 1536)


def test_an_out_that_cannot_be_written_is_refused_before_the_sweep(tmp_path, monkeypatch, capsys) -> None:
    import qkv.cli.bench as bench_cli

    def refuse(*args, **kwargs):
        raise AssertionError("the sweep ran before --out was checked")

    monkeypatch.setattr(bench_cli, "run_bench", refuse)
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "results"
    assert main(["bench", "--quick", "--no-memory", "--no-progress", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"qkv bench: error: --out {out}: {tmp_path / 'file'} is not a directory; expected a directory to write into\n"
    )
