"""benchmarks/serve_load.py: a tiny load test against a real ``qkv serve`` subprocess, every response checked."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("httpx", reason="the load test needs the deploy extra: pip install 'qkv[deploy]'")
pytest.importorskip("fastapi", reason="qkv serve needs the deploy extra: pip install 'qkv[deploy]'")
pytest.importorskip("uvicorn", reason="qkv serve needs the deploy extra: pip install 'qkv[deploy]'")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SENTENCES = ["abc 12", "j, 9.", "0123", "hi there", "f.g.h", "99, 100", "a", "bad cafe 7", "ij 5", "hg fe dc"]
TINY = {"d_model": 16, "num_heads": 2, "encoder_layers": 1, "decoder_layers": 1, "ffn_dim": 32}


def load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("serve_load", BENCHMARKS / "serve_load.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_a_tiny_load_test_answers_every_request_with_the_offline_translations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    script = load_script(monkeypatch)
    model = script.write_random_model(tmp_path / "model", SENTENCES, TINY)
    sentences = tmp_path / "input.txt"
    sentences.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    out = tmp_path / "serve.json"
    argv = ["--model", str(model), "--input", str(sentences), "--clients", "3", "--duration", "10"]
    argv += ["--max-requests", "24", "--beam", "2", "--server-threads", "1", "--json", str(out)]
    assert script.main(argv) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["requests"] == report["answered"] == 24  # bounded by --max-requests, well within 10 s
    assert (report["errors"], report["mismatches"]) == (0, 0)
    assert report["distinct_offline_translations"] >= 0.7 * report["distinct_sentences_sent"]  # input-dependent
    assert 24 <= report["sentences"] <= 24 * 4 and 1 <= report["server_batches"] <= 24
    assert report["requests_per_s"] == pytest.approx(24 / report["seconds"])
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]


def test_a_response_with_another_requests_translation_is_a_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(monkeypatch)
    offline = {"a": "A", "b": "B", "c": "C"}
    right = script.Outcome(["a", "b"], 0.1, 200, ["A", "B"])
    swapped = script.Outcome(["a", "b"], 0.1, 200, ["B", "A"])
    dropped = script.Outcome(["c"], 0.1, 200, [])
    failed = script.Outcome(["c"], 0.1, 500, None, "translation failed")  # an error, counted apart
    assert script.count_mismatches([right, swapped, dropped, failed], offline) == 2
