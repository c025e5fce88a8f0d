"""KV cache speed: decoding with the preallocated ``KVCache`` against the concatenating one it replaced.

Both sides run the same code in the same process; only the caches differ:

* **after**: ``KVCache()`` as it is: buffers that grow by doubling, a step writes only its new keys/values,
  ``reorder`` copies the valid positions of the selected rows;
* **before**: the caches built inside :func:`qkv.nn.kv_cache.concatenating_caches`, which ``torch.cat``
  the whole cache at every step (the behaviour before preallocation).

Workloads (randomly initialized models, ``eval()``):

* **beam**: ``beam_search`` (beam ``--beam``, 5) over ``--sentences`` sources of up to ``--src-len`` tokens
  in one batch, for two :class:`qkv.models.TransformerSeq2Seq`: ``demo`` (the ``model:`` section of qkv's
  built-in ``demo.yaml``: 2 + 2 layers, 64 wide) and ``6x512`` (6 + 6 layers, 512 wide, 8 heads, FFN
  2048). EOS is suppressed, so every sentence decodes exactly ``--tgt-len`` steps on both sides.
  Figure: sentences/s.
* **lm**: ``TransformerLM.generate`` with greedy decoding, ``--new-tokens`` (500) after a ``--prompt-len``
  prompt, for each batch size of ``--lm-batch`` (1 and 8), on ``lm_generation_speed.py``'s default model
  (4 layers, 128 wide, vocabulary 65). Figure: new tokens/s (the batch's).

The script checks that both sides produce the same tokens. After one warm-up per side, ``--repeats`` rounds
time each workload on both sides, the order alternating between rounds; medians are reported, and the
ratio after / before (above 1: the preallocated cache is faster). One thread by default: these decodes are
small matrix products and Python overhead, and a second thread mostly adds hand-offs (on a machine shared
with other jobs, 2-thread timings swing several-fold).

Usage::

    python benchmarks/cache_speed.py                       # every workload; ~1 min on 2 cores
    python benchmarks/cache_speed.py --workloads lm --new-tokens 2000 --lm-batch 1 --json lm.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from decoding_speed import NoEOS  # this folder is on sys.path when a script here runs

from qkv.bench.runner import cpu_model
from qkv.models.config import LMConfig, TransformerConfig
from qkv.models.lm import TransformerLM
from qkv.models.search import beam_search
from qkv.models.transformer import TransformerSeq2Seq
from qkv.nn.kv_cache import concatenating_caches
from qkv.train.config import read_yaml

SIDES = ("after", "before")
CACHES: dict[str, Callable[[], AbstractContextManager[None]]] = {"after": nullcontext, "before": concatenating_caches}


@dataclass(frozen=True)
class Seq2SeqSize:
    """A ``TransformerSeq2Seq`` to beam-search with: its config fields besides the vocabulary."""

    name: str
    fields: dict[str, Any]
    vocab: int


def demo_size() -> Seq2SeqSize:
    """The ``model:`` section of the built-in ``demo.yaml`` (a character vocabulary of about 100)."""
    fields = {k: v for k, v in read_yaml("demo")["model"].items() if k != "type"}
    return Seq2SeqSize("demo", fields, vocab=100)


SEQ2SEQ: dict[str, Callable[[], Seq2SeqSize]] = {
    "demo": demo_size,
    "6x512": lambda: Seq2SeqSize(
        "6x512",
        {"d_model": 512, "num_heads": 8, "encoder_layers": 6, "decoder_layers": 6, "ffn_dim": 2048},
        vocab=8000,
    ),
}
WORKLOADS = (*SEQ2SEQ, "lm")


def build_seq2seq(size: Seq2SeqSize, seed: int) -> TransformerSeq2Seq:
    torch.manual_seed(seed)
    config = TransformerConfig(src_vocab_size=size.vocab, tgt_vocab_size=size.vocab, **size.fields)
    return TransformerSeq2Seq(config).eval()


def build_lm(args: argparse.Namespace) -> TransformerLM:
    torch.manual_seed(args.seed)
    config = LMConfig(
        vocab_size=65,
        d_model=128,
        num_heads=4,
        num_layers=4,
        ffn_dim=512,
        dropout=0.0,
        max_positions=args.prompt_len + args.new_tokens,
    )
    return TransformerLM(config).eval()


def sources(vocab: int, n: int, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """``src (n, src_len)`` of ids ``>= 3`` and lengths from ``src_len // 2`` to ``src_len`` (the first the longest)."""
    g = torch.Generator().manual_seed(args.seed)
    src = torch.randint(3, vocab, (n, args.src_len), generator=g)
    lengths = torch.randint(max(1, args.src_len // 2), args.src_len + 1, (n,), generator=g)
    lengths[0] = args.src_len
    for row, length in enumerate(lengths.tolist()):
        src[row, length:] = 0
    return src, lengths


def cases(args: argparse.Namespace) -> list[tuple[str, int]]:
    """``(workload, batch)`` to time: the beam workloads with ``--sentences``, ``lm`` once per ``--lm-batch``."""
    found: list[tuple[str, int]] = []
    for workload in args.workloads:
        found += [(workload, b) for b in args.lm_batch] if workload == "lm" else [(workload, args.sentences)]
    return found


def prepare(workload: str, batch: int, args: argparse.Namespace) -> tuple[Callable[[int], list[list[int]]], int, str]:
    """``(run, items, unit)``: ``run(steps)`` decodes ``batch`` rows (``steps`` target tokens each) and returns
    the tokens; ``items`` is what one full run produces, in ``unit``."""
    if workload == "lm":
        lm = build_lm(args)
        g = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(0, 65, (batch, args.prompt_len), generator=g)

        def generate(steps: int) -> list[list[int]]:
            return lm.generate(prompt, steps, temperature=0).tolist()

        return generate, batch * args.new_tokens, "tokens"
    model = NoEOS(build_seq2seq(SEQ2SEQ[workload](), args.seed))
    src, lengths = sources(model.model.config.src_vocab_size, batch, args)

    def search(steps: int) -> list[list[int]]:
        hyps = beam_search(model, src, lengths, beam_size=args.beam, max_len=steps)
        return [h[0].tokens for h in hyps]

    return search, batch, "sentences"


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    rows = []
    for workload, batch in cases(args):
        print(f"{workload} (batch {batch})...", file=sys.stderr, flush=True)
        decode, items, unit = prepare(workload, batch, args)
        steps = args.new_tokens if workload == "lm" else args.tgt_len
        outputs: dict[str, list[list[int]]] = {}
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        cpu_times: dict[str, list[float]] = {side: [] for side in SIDES}
        for side in SIDES:
            with CACHES[side]():
                decode(min(steps, 4))  # warm-up
        for round_ in range(args.repeats):
            for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
                with CACHES[side]():
                    start, cpu_start = time.perf_counter(), time.process_time()
                    outputs[side] = decode(steps)
                    times[side].append(time.perf_counter() - start)
                    cpu_times[side].append(time.process_time() - cpu_start)
        medians = {side: statistics.median(times[side]) for side in SIDES}
        cpu = {side: statistics.median(cpu_times[side]) for side in SIDES}
        rows.append(
            {
                "workload": workload,
                "batch": batch,
                "unit": unit,
                "items": items,
                "times_s": times,
                "median_s": medians,
                "per_s": {side: items / medians[side] for side in SIDES},
                "ratio": medians["before"] / medians["after"],
                "cpu_times_s": cpu_times,
                "ratio_cpu": cpu["before"] / cpu["after"],
                "same_output": outputs["after"] == outputs["before"],
            }
        )
    return {
        "benchmark": "cache_speed",
        "config": {**vars(args), "json": str(args.json)},
        "machine": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu_model": cpu_model(),
        },
        "convention": "per_s = items / median seconds of a whole decode (encoder and prompt included): beam "
        "workloads count sentences, lm counts new tokens of the whole batch; ratio = after per_s / before per_s "
        "(above 1: the preallocated cache is faster); ratio_cpu: the same with the process's CPU time, steadier "
        "than wall time on a machine shared with other jobs",
        "results": rows,
    }


def table(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [
        f"beam {c['beam']}: src_len<={c['src_len']}, tgt_len={c['tgt_len']}; "
        f"lm: 4x128 greedy, prompt {c['prompt_len']}, {c['new_tokens']} new tokens; "
        f"threads={report['machine']['threads']}, medians of {c['repeats']}",
        "",
        "| workload | batch | unit | before /s | after /s | after / before | (CPU time) | same output |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['workload']} | {r['batch']} | {r['unit']} | {r['per_s']['before']:.1f} | "
            f"{r['per_s']['after']:.1f} | {r['ratio']:.2f}× | {r['ratio_cpu']:.2f}× | "
            f"{'yes' if r['same_output'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--sentences", type=int, default=16, help="sources beam-searched together (default 16)")
    parser.add_argument("--src-len", type=int, default=24, help="longest source; others from len/2 (default 24)")
    parser.add_argument("--tgt-len", type=int, default=32, help="decoding steps per sentence (default 32)")
    parser.add_argument("--beam", type=int, default=5, help="beam size (default 5)")
    parser.add_argument("--new-tokens", type=int, default=500, help="tokens the LM generates (default 500)")
    parser.add_argument("--prompt-len", type=int, default=16, help="LM prompt tokens (default 16)")
    parser.add_argument("--lm-batch", type=int, nargs="+", default=[1, 8], help="LM prompts per run (default 1 8)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per side (default 7)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench-results/cache_speed.json"))
    args = parser.parse_args(argv)
    for name in ("sentences", "src_len", "tgt_len", "beam", "new_tokens", "prompt_len", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if min(args.lm_batch) < 1:
        parser.error(f"--lm-batch sizes must be >= 1; got {args.lm_batch}")
    report = run(args)
    print(table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0 if all(r["same_output"] for r in report["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
