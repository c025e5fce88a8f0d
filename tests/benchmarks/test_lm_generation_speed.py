"""benchmarks/lm_generation_speed.py: cached and uncached generation agree, and the JSON has every figure."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports lm_memory from its folder
    spec = importlib.util.spec_from_file_location("lm_generation_speed", BENCHMARKS / "lm_generation_speed.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


TINY = ["--new-tokens", "12", "--prompt-len", "3", "--layers", "1", "--width", "16", "--heads", "2", "--batch", "2"]


def test_both_sides_generate_the_same_tokens_and_the_json_has_the_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = load_script(monkeypatch)
    out = tmp_path / "gen.json"
    assert script.main([*TINY, "--repeats", "2", "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["same_output"] is True and report["first_difference"] is None
    cached, uncached = report["results"]
    assert (cached["side"], uncached["side"]) == ("cached", "uncached")
    for row in (cached, uncached):
        assert len(row["times_s"]) == 2 and row["tokens_per_s"] > 0 and row["gflops"] > 0
        assert row["peak_bytes"] > 0 and row["memory_error"] is None
        assert row["tokens_per_s"] == pytest.approx(2 * 12 / row["median_s"])
    assert report["speedup"] == pytest.approx(cached["tokens_per_s"] / uncached["tokens_per_s"])


def test_uncached_generation_recomputes_what_the_cache_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(monkeypatch)
    torch.set_num_threads(1)
    settings = argparse.Namespace(new_tokens=10, prompt_len=4, batch=3, layers=2, width=16, heads=2, vocab=13, seed=0)
    lm, prompt = script.build_lm(settings), script.make_prompt(settings)
    cached = script.generate_cached(lm, prompt, 10)
    uncached = script.generate_uncached(lm, prompt, 10)
    assert cached.shape == (3, 14) and torch.equal(cached[:, :4], prompt)
    assert torch.equal(cached, uncached)


def test_first_difference_names_the_first_column_that_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(monkeypatch)
    a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = a.clone()
    assert script.first_difference(a, b) is None
    b[1, 3], b[0, 2] = 0, 0
    assert script.first_difference(a, b) == 2
    assert script.first_difference(a, b[:, :3]) == 3


def test_flops_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(monkeypatch)
    settings = argparse.Namespace(prompt_len=2, new_tokens=2, batch=1, layers=1, width=2, vocab=3)
    n = 12 * 4 + 3 * 2  # Linear weights: 12·E² per layer and the head
    attention = 4 * 2  # 4·H·D per (query, key) pair
    # cached: the prompt (2 tokens, causal pairs counted as T²/2 = 2), then one step at length 3
    assert script.side_flops("cached", settings) == 2 * n * 2 + attention * 2 + 2 * n + attention * 3
    # uncached: forwards over 2 and 3 tokens
    assert script.side_flops("uncached", settings) == (2 * n * 2 + attention * 2) + (2 * n * 3 + attention * 4.5)
