"""benchmarks/joeynmt_comparison.py runs end to end on its qkv side and scores the outputs it wrote."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "joeynmt_comparison.py"


def load_script():
    spec = importlib.util.spec_from_file_location("joeynmt_comparison", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_qkv_side_trains_decodes_and_scores(tmp_path: Path) -> None:
    script = load_script()
    tiny = [
        "--size",
        "120",
        "--steps",
        "4",
        "--log-every",
        "2",
        "--warmup",
        "2",
        "--d-model",
        "16",
        "--heads",
        "2",
        "--layers",
        "1",
        "--ffn",
        "32",
        "--max-tokens",
        "512",
        "--threads",
        "1",
        "--workdir",
        str(tmp_path),
    ]
    assert script.main([*tiny, "--skip-joeynmt"]) == 0
    result = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["qkv"]
    outputs = (tmp_path / "qkv" / "test.hyps").read_text(encoding="utf-8").splitlines()
    references = (tmp_path / "data" / "test.tgt").read_text(encoding="utf-8").splitlines()
    assert len(outputs) == len(references) == result["decode_sentences"]
    assert result["train_tokens_per_s"] > 0 and result["decode_sentences_per_s"] > 0
    assert result["parameters"] > 0
    assert 0 <= result["test_chrf"] <= 100 and 0 <= result["test_exact_match"] <= 100


def test_joeynmt_side_reports_a_missing_interpreter(tmp_path: Path) -> None:
    script = load_script()
    args = script.parse_args(["--joey-python", str(tmp_path / "nope"), "--workdir", str(tmp_path)])
    result = script.run_joeynmt(args, tmp_path)
    assert result["status"] is None and "not found" in result["error"]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_both_configs_describe_the_same_model(tmp_path: Path, device: str) -> None:
    script = load_script()
    args = script.parse_args(["--d-model", "64", "--heads", "2", "--layers", "3", "--ffn", "96", "--device", device])
    ours = script.qkv_config(args, tmp_path, tmp_path / "q")
    joey = script.joey_config(args, tmp_path, tmp_path / "j")
    for side in ("encoder", "decoder"):
        stack = joey["model"][side]
        assert stack["hidden_size"] == ours["model"]["d_model"] == stack["embeddings"]["embedding_dim"] == 64
        assert stack["num_heads"] == ours["model"]["num_heads"] and stack["num_layers"] == 3
        assert stack["ff_size"] == ours["model"]["ffn_dim"] and stack["layer_norm"] == "pre"
    assert ours["model"]["encoder_layers"] == ours["model"]["decoder_layers"] == 3
    assert joey["training"]["batch_size"] == ours["training"]["max_tokens"]
    assert joey["training"]["updates"] == ours["training"]["max_steps"]
    assert joey["use_cuda"] == (device == "cuda") and ours["training"]["device"] == device
