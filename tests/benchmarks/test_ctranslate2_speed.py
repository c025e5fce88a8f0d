"""benchmarks/ctranslate2_speed.py on a tiny model: greedy parity holds and the JSON has every figure."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("ctranslate2", reason="the CTranslate2 benchmark needs the deploy extra (ctranslate2)")

from qkv.data.tokenizer import CharTokenizer  # noqa: E402
from qkv.models import TransformerConfig, TransformerSeq2Seq  # noqa: E402
from qkv.models.checkpoint import save_model  # noqa: E402
from qkv.train.translate import save_tokenizers  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SOURCES = ["3/4/21", "12/1/99", "7/30/05", "1/1/00", "10/10/10"]


def load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("ctranslate2_speed", BENCHMARKS / "ctranslate2_speed.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def tiny_model_dir(path: Path) -> Path:
    tokenizer = CharTokenizer.train(["0123456789/."])
    torch.manual_seed(0)
    config = TransformerConfig(
        src_vocab_size=tokenizer.vocab_size,
        tgt_vocab_size=tokenizer.vocab_size,
        d_model=16,
        num_heads=2,
        encoder_layers=1,
        decoder_layers=1,
        ffn_dim=32,
    )
    save_model(TransformerSeq2Seq(config), path)
    save_tokenizers(path, tokenizer, tokenizer, shared=True)
    (path / "data").mkdir()
    (path / "data" / "test.src").write_text("\n".join(SOURCES) + "\n", encoding="utf-8")
    (path / "data" / "test.tgt").write_text("\n".join(s.replace("/", ".") for s in SOURCES) + "\n", encoding="utf-8")
    return path


def test_report_has_parity_bleu_and_speed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(monkeypatch)
    threads = torch.get_num_threads()
    out = tmp_path / "ct2.json"
    try:
        args = ["--model", str(tiny_model_dir(tmp_path / "model")), "--threads", "1", "--rounds", "2", "--beam", "2"]
        assert script.main([*args, "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["greedy_parity"] == {"identical": 5, "sentences": 5, "differing": []}
    engines = [r["engine"] for r in report["results"]]
    assert engines == ["qkv", "ctranslate2 float32", "ctranslate2 int8"]
    qkv, float32, _ = report["results"]
    for row in report["results"]:
        assert len(row["times_s"]) == 2 and row["sentences_per_s"] == pytest.approx(5 / row["median_s"])
        assert row["speedup"] == pytest.approx(row["sentences_per_s"] / qkv["sentences_per_s"])
        assert 0 <= row["bleu"] <= 100
    assert report["bleu_difference_float32"] == pytest.approx(float32["bleu"] - qkv["bleu"])


def test_differing_lines_are_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(monkeypatch)

    class Fixed:
        def __init__(self, texts: list[str]) -> None:
            self.texts = texts

        def translate(self, sources: list[str], *, beam: int) -> list[object]:
            return [type("R", (), {"text": t})() for t in self.texts]

    parity = script.greedy_parity(Fixed(["a", "b", "c"]), Fixed(["a", "x", "c"]), ["1", "2", "3"])
    assert parity == {
        "identical": 2,
        "sentences": 3,
        "differing": [{"line": 2, "source": "2", "qkv": "b", "ctranslate2": "x"}],
    }
