"""CTranslate2 against qkv's own decoding: the same outputs, the same BLEU, and how much faster.

On a trained model directory (default ``runs/demo``, which ``qkv demo`` writes) and its test split
(``DIR/data/test.src``, ``test.tgt``), the script exports the model with ``qkv export`` (float32 and int8,
into a temporary directory) and reports:

* **greedy parity** (float32): how many greedy translations are identical to qkv's, and the lines that
  differ, if any;
* **BLEU** of beam-``--beam`` translations (sacrebleu, as ``qkv evaluate``): qkv, CTranslate2 float32
  (the target: within 0.1 of qkv) and int8;
* **speed**: sentences/s of beam-``--beam`` translation of the whole split, qkv
  (:class:`~qkv.train.translate.Translator`, ``torch.set_num_threads(--threads)``) against CTranslate2
  (:class:`~qkv.deploy.ctranslate2_engine.CTranslate2Translator`, ``intra_threads=--threads``), the same
  sentences, batch budget and length limits, with the median of ``--rounds`` rounds; each round runs the
  three engines one after the other, so a change of load on the machine touches all of them. The ratio is
  CTranslate2's sentences/s over qkv's.

Usage::

    python benchmarks/ctranslate2_speed.py                           # runs/demo, 2 threads, 3 rounds
    python benchmarks/ctranslate2_speed.py --model runs/demo --rounds 5 --json ct2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from qkv.deploy.ctranslate2_engine import CTranslate2Translator
from qkv.deploy.ctranslate2_export import export_ctranslate2
from qkv.train.evaluate import score
from qkv.train.translate import Translator

QUANTIZATIONS = ("float32", "int8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("runs/demo"), help="model directory (default runs/demo)")
    p.add_argument("--src", type=Path, help="source sentences (default MODEL/data/test.src)")
    p.add_argument("--ref", type=Path, help="references (default MODEL/data/test.tgt)")
    p.add_argument("--sentences", type=int, help="use the first N sentences (default all)")
    p.add_argument("--beam", type=int, default=5, help="beam size of the BLEU and speed runs (default 5)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of both engines (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; the median is reported (default 3)")
    p.add_argument("--max-tokens", type=int, default=4096, help="batch budget of both engines (default 4096)")
    p.add_argument("--json", type=Path, help="also write every figure here")
    return p.parse_args(argv)


def read_lines(path: Path, count: int | None) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines if count is None else lines[:count]


def greedy_parity(qkv: Translator, engine: CTranslate2Translator, sources: list[str]) -> dict[str, Any]:
    """How many greedy translations of the two engines are identical, and the ones that differ."""
    mine = [r.text for r in qkv.translate(sources, beam=1)]
    theirs = [r.text for r in engine.translate(sources, beam=1)]
    differing = [
        {"line": i + 1, "source": s, "qkv": a, "ctranslate2": b}
        for i, (s, a, b) in enumerate(zip(sources, mine, theirs, strict=True))
        if a != b
    ]
    return {"identical": len(sources) - len(differing), "sentences": len(sources), "differing": differing}


def timed_rounds(
    engines: dict[str, Translator | CTranslate2Translator], sources: list[str], args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    """Seconds of each round per engine, and each engine's translations (of the first round)."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    outputs: dict[str, list[str]] = {}
    for engine in engines.values():  # warm-up: first-call costs (allocations, thread pools)
        engine.translate(sources[:8], beam=args.beam, max_tokens=args.max_tokens)
    for _ in range(args.rounds):
        for name, engine in engines.items():
            start = time.perf_counter()
            results = engine.translate(sources, beam=args.beam, max_tokens=args.max_tokens)
            times[name].append(time.perf_counter() - start)
            outputs.setdefault(name, [r.text for r in results])
    return times, outputs


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    sources = read_lines(args.src or args.model / "data" / "test.src", args.sentences)
    references = read_lines(args.ref or args.model / "data" / "test.tgt", args.sentences)
    if len(sources) != len(references) or not sources:
        raise SystemExit(
            f"expected as many references as sources (at least one); got {len(sources)}, {len(references)}"
        )
    qkv = Translator.load(args.model)
    engines: dict[str, Translator | CTranslate2Translator] = {"qkv": qkv}
    with tempfile.TemporaryDirectory() as tmp:
        for quantization in QUANTIZATIONS:
            out = export_ctranslate2(args.model, Path(tmp) / quantization, quantization=quantization)
            engines[f"ctranslate2 {quantization}"] = CTranslate2Translator.load(out, intra_threads=args.threads)
        float32 = engines["ctranslate2 float32"]
        assert isinstance(float32, CTranslate2Translator)
        parity = greedy_parity(qkv, float32, sources)
        times, outputs = timed_rounds(engines, sources, args)
    rows = []
    qkv_rate = len(sources) / statistics.median(times["qkv"])
    for name, seconds in times.items():
        rate = len(sources) / statistics.median(seconds)
        scores = score(outputs[name], references)
        rows.append(
            {
                "engine": name,
                "bleu": scores.bleu,
                "chrf": scores.chrf,
                "exact_match": scores.exact_match,
                "times_s": seconds,
                "median_s": statistics.median(seconds),
                "sentences_per_s": rate,
                "speedup": rate / qkv_rate,
                "same_as_qkv": sum(a == b for a, b in zip(outputs[name], outputs["qkv"], strict=True)),
            }
        )
    return {
        "model": str(args.model),
        "sentences": len(sources),
        "beam": args.beam,
        "threads": args.threads,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "greedy_parity": parity,
        "results": rows,
        "bleu_difference_float32": rows[1]["bleu"] - rows[0]["bleu"],
        "bleu_signature": scores.bleu_signature,
        "torch": torch.__version__,
        "ctranslate2": float32.info.ctranslate2_version,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
    }


def markdown(report: dict[str, Any]) -> str:
    parity = report["greedy_parity"]
    lines = [
        f"{report['sentences']} sentences of {report['model']}, beam {report['beam']}, {report['threads']} threads, "
        f"median of {report['rounds']} rounds",
        "",
        "| engine | BLEU | chrF | same as qkv | sentences/s | × qkv |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['engine']} | {r['bleu']:.2f} | {r['chrf']:.2f} | {r['same_as_qkv']}/{report['sentences']} | "
            f"{r['sentences_per_s']:.1f} | {r['speedup']:.2f} |"
        )
    lines += ["", f"greedy, float32: {parity['identical']}/{parity['sentences']} identical to qkv"]
    lines += [
        f"  line {d['line']}: {d['source']!r} → qkv {d['qkv']!r}, ctranslate2 {d['ctranslate2']!r}"
        for d in parity["differing"]
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("beam", "threads", "rounds", "max_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    report = run(args)
    print(markdown(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
