"""benchmarks/lm_training_speed.py: both sides train, the plain GPT is qkv's model, the JSON has every figure."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports lm_memory from its folder
    spec = importlib.util.spec_from_file_location("lm_training_speed", BENCHMARKS / "lm_training_speed.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_both_sides_train_and_the_json_has_the_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(monkeypatch)
    out = tmp_path / "speed.json"
    argv = ["--presets", "--size", "1", "2", "16", "8", "2", "--steps", "2", "--repeats", "2", "--warmup", "1"]
    assert script.main([*argv, "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    (result,) = report["results"]
    assert result["size"] == {"layers": 1, "heads": 2, "width": 16, "context": 8, "batch": 2}
    ours, plain, nanogpt = result["qkv"], result["plain"], result["nanogpt"]
    assert ours["parameters"] == plain["parameters"] == nanogpt["parameters"] > 0
    for side in (ours, plain, nanogpt):
        assert len(side["times_s"]) == 2 and side["tokens_per_s"] > 0 and side["gflops"] > 0
        assert side["peak_bytes"] > 0 and side["memory_error"] is None
        assert math.isfinite(side["last_loss"]) and side["last_loss"] > 0
    assert result["ratio_plain"] == pytest.approx(ours["tokens_per_s"] / plain["tokens_per_s"])
    assert result["ratio_nanogpt"] == pytest.approx(ours["tokens_per_s"] / nanogpt["tokens_per_s"])
    assert result["max_logit_diff"] < 1e-5


@pytest.mark.parametrize("fused", [False, True])
def test_the_plain_gpt_computes_qkvs_function_and_trains_alike(monkeypatch: pytest.MonkeyPatch, fused: bool) -> None:
    script = load_script(monkeypatch)
    torch.set_num_threads(1)
    size = script.Size(layers=2, heads=2, width=16, context=8, batch=3)
    ours = script.build_qkv(size, 11, seed=0)
    plain = script.build_plain(ours, size, 11, fused=fused)
    assert hasattr(plain.h[0], "c_attn") == fused
    batch = script.make_batches(size, 11, 1, seed=0)[0]
    assert script.same_function(ours, plain, batch) < 1e-5
    assert script.parameters(plain) == script.parameters(ours)
    # after the same update from the same weights they still agree: the gradients and optimizers match too
    losses = [script.train_step(m, script.make_optimizer(m), batch, 11) for m in (ours, plain)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert script.same_function(ours, plain, batch) < 1e-5


def test_step_flops_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(monkeypatch)
    size = script.Size(layers=1, heads=1, width=2, context=2, batch=1)
    # Linear weights 12·E² + V·E = 48 + 6 = 54; 6·54·(B·T = 2) = 648; attention 3.5·4·B·H·T²·D/2 = 56
    assert script.step_flops(size, 3) == 648 + 56
