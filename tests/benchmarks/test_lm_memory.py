"""benchmarks/lm_memory.py: every backend's step is measured in a fresh process, and the JSON has every figure."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("lm_memory", BENCHMARKS / "lm_memory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_every_backend_is_measured_and_math_grows_with_the_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = load_script(monkeypatch)
    out = tmp_path / "mem.json"
    tiny = ["--contexts", "256", "512", "--layers", "1", "--width", "16", "--heads", "2", "--vocab", "16"]
    assert script.main([*tiny, "--backends", "auto", "tiled", "math", "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    rows = {(r["context"], r["backend"]): r for r in report["results"]}
    assert set(rows) == {(c, b) for c in (256, 512) for b in ("auto", "tiled", "math", "none")}  # none added
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["peak_bytes"] > 0 and row["seconds"] > 0 and row["method"] == "VmHWM"
    assert "attention_bytes" not in rows[512, "none"]
    assert rows[512, "math"]["growth"] is not None and rows[512, "math"]["score_matrix_bytes"] == 2 * 512 * 512 * 4
    # math keeps score matrices for the backward; auto (SDPA's fused kernel) keeps none
    assert rows[512, "math"]["attention_bytes"] > 2 * rows[512, "math"]["score_matrix_bytes"]
    assert rows[512, "auto"]["attention_bytes"] < rows[512, "math"]["attention_bytes"] / 4
    assert report["auto_backend"]["512"].startswith("torch")
    assert report["overall_growth"] == {b: rows[512, b]["growth"] for b in ("auto", "tiled", "math")}


def test_a_failing_job_answers_with_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(monkeypatch)
    (answer,) = script.measure_peaks(
        [
            {
                "script": str(BENCHMARKS / "lm_memory.py"),
                "prepare": "prepare_lm_step",
                "kwargs": {
                    "context": 8,
                    "backend": "tiled",
                    "layers": 0,
                    "width": 8,
                    "heads": 2,
                    "vocab": 5,
                    "seed": 0,
                },
            }
        ],
        threads=1,
    )
    assert "error" in answer and "num_layers" in answer["error"]


def test_growth_exponent(monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(monkeypatch)
    assert script.growth_exponent(1024, 3.0, 2048, 6.0) == pytest.approx(1.0)
    assert script.growth_exponent(1024, 3.0, 4096, 48.0) == pytest.approx(2.0)
    assert script.growth_exponent(1024, 0.0, 2048, 6.0) is None
