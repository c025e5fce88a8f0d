"""benchmarks/cache_speed.py: both caches decode the same tokens, and the JSON has every figure."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from qkv.nn import kv_cache

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports decoding_speed from its folder
    spec = importlib.util.spec_from_file_location("cache_speed", BENCHMARKS / "cache_speed.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_both_caches_decode_the_same_tokens_and_the_json_has_the_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = load_script(monkeypatch)
    tiny = script.Seq2SeqSize("tiny", {"d_model": 16, "num_heads": 2, "encoder_layers": 1, "decoder_layers": 1}, 20)
    monkeypatch.setitem(script.SEQ2SEQ, "6x512", lambda: tiny)
    built: list[bool] = []
    real_init = kv_cache.KVCache.__init__

    def recording_init(self: kv_cache.KVCache, **kwargs: object) -> None:
        real_init(self, **kwargs)  # type: ignore[arg-type]
        if not self.static:
            built.append(self.preallocate)

    monkeypatch.setattr(kv_cache.KVCache, "__init__", recording_init)
    out = tmp_path / "cache.json"
    argv = [
        "--sentences",
        "3",
        "--src-len",
        "5",
        "--tgt-len",
        "6",
        "--beam",
        "2",
        "--new-tokens",
        "10",
        "--lm-batch",
        "1",
        "2",
    ]
    assert script.main([*argv, "--repeats", "2", "--threads", "1", "--json", str(out)]) == 0

    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["benchmark"] == "cache_speed" and report["machine"]["threads"] == 1
    assert [(r["workload"], r["batch"]) for r in report["results"]] == [("demo", 3), ("6x512", 3), ("lm", 1), ("lm", 2)]
    for row in report["results"]:
        assert row["same_output"] is True
        assert row["items"] == (10 * row["batch"] if row["workload"] == "lm" else 3)
        for side in ("before", "after"):
            assert len(row["times_s"][side]) == 2 and row["per_s"][side] > 0
            assert row["per_s"][side] == pytest.approx(row["items"] / row["median_s"][side])
        assert row["ratio"] == pytest.approx(row["per_s"]["after"] / row["per_s"]["before"])
        assert len(row["cpu_times_s"]["after"]) == 2 and row["ratio_cpu"] > 0
    assert set(built) == {True, False}  # "before" built concatenating caches, "after" preallocated ones


def test_demo_size_is_the_model_section_of_demo_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(monkeypatch)
    size = script.demo_size()
    assert size.fields["d_model"] == 64 and size.fields["encoder_layers"] == 2 and "type" not in size.fields
    model = script.build_seq2seq(size, seed=0)
    assert model.config.ffn_dim == size.fields["ffn_dim"] and not model.training
