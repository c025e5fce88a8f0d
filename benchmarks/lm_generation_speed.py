"""LM generation speed: KV-cached sampling against recomputing the whole prefix at every step.

Both sides continue the same prompt by ``--new-tokens`` tokens (500) with greedy decoding on the same
randomly initialized :class:`qkv.models.TransformerLM` (GPT-2 style: learned positions, pre-LN, GELU, tied
embeddings; ``eval()``, so dropout is off):

* **cached**: ``TransformerLM.generate(prompt, n, temperature=0)``: the prompt goes through once, then each
  step feeds only the newest token through ``decode_step`` and the per-layer KV caches: O(T) work per token;
* **uncached**: a loop calling ``forward`` on the whole sequence so far and taking the argmax of its last
  position, as a model without a cache must: O(T²) attention and O(T) projections per token.

The script checks that both produce the same tokens (``same_output``; where they differ, the first position
that does). After one short warm-up per side, ``--repeats`` rounds time both, the order alternating between
rounds; the median is reported.

FLOPs of the work each side does (2 per multiply-add; ``N`` = weights of every Linear, head included;
attention per layer ``4·H·L·S·D``, halved when causal)::

    cached     per new token at length S:  2·N + layers · 4 · H · S · D
    uncached   per forward of t tokens:    2·N·t + layers · 4 · H · t · t · D / 2

Peak memory: the growth of the peak RSS over one whole generation in a fresh process, measured as
``lm_memory.py`` measures it.

Usage::

    python benchmarks/lm_generation_speed.py                          # 4x128 model, 500 tokens; ~3 min on 2 cores
    python benchmarks/lm_generation_speed.py --layers 6 --width 384 --heads 6 --json gen.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lm_memory import measure_peaks  # this folder is on sys.path when a script here runs

from qkv.bench.runner import cpu_model
from qkv.models.config import LMConfig
from qkv.models.lm import TransformerLM

SIDES = ("cached", "uncached")


def build_lm(args: argparse.Namespace) -> TransformerLM:
    torch.manual_seed(args.seed)
    config = LMConfig(
        vocab_size=args.vocab,
        d_model=args.width,
        num_heads=args.heads,
        num_layers=args.layers,
        ffn_dim=4 * args.width,
        dropout=0.0,
        max_positions=args.prompt_len + args.new_tokens,
    )
    return TransformerLM(config).eval()


@torch.no_grad()
def generate_cached(lm: TransformerLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``prompt (B, T0)`` and ``new_tokens`` greedy tokens: ``(B, T0 + new_tokens)``, through the KV caches."""
    return lm.generate(prompt, new_tokens, temperature=0)


@torch.no_grad()
def generate_uncached(lm: TransformerLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """As :func:`generate_cached`, but every step runs ``forward`` on the whole sequence so far."""
    tokens = prompt
    for _ in range(new_tokens):
        next_token = lm(tokens)[:, -1].argmax(dim=-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens


GENERATORS: dict[str, Callable[[TransformerLM, torch.Tensor, int], torch.Tensor]] = {
    "cached": generate_cached,
    "uncached": generate_uncached,
}


def make_prompt(args: argparse.Namespace) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=g)


def matmul_weights(args: argparse.Namespace) -> int:
    """Weights of every Linear: q, k, v, out (4·E²) and the MLP (8·E²) per layer, and the head."""
    return args.layers * 12 * args.width * args.width + args.vocab * args.width


def side_flops(side: str, args: argparse.Namespace) -> float:
    """FLOPs of one whole generation on ``side`` (see the module docstring), batch included."""
    n, t0 = matmul_weights(args), args.prompt_len
    per_position_attention = args.layers * 4 * args.width  # 4·H·D per (query, key) pair, all layers
    if side == "cached":
        prompt = 2 * n * t0 + per_position_attention * t0 * t0 / 2
        steps = sum(2 * n + per_position_attention * s for s in range(t0 + 1, t0 + args.new_tokens))
        return args.batch * (prompt + steps)
    lengths = range(t0, t0 + args.new_tokens)
    return args.batch * sum(2 * n * t + per_position_attention * t * t / 2 for t in lengths)


def prepare_generation(side: str, settings: dict[str, Any]) -> Callable[[], torch.Tensor]:
    """One whole generation on ``side`` (a peak-memory job of :func:`lm_memory.measure_peaks`)."""
    args = argparse.Namespace(**settings)
    lm, prompt = build_lm(args), make_prompt(args)
    return lambda: GENERATORS[side](lm, prompt, args.new_tokens)


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """The first position (column) where two ``(B, T)`` outputs differ, ``None`` if they are equal."""
    if a.shape != b.shape:
        return min(a.shape[1], b.shape[1])
    differs = (a != b).any(dim=0).nonzero()
    return None if differs.numel() == 0 else int(differs[0])


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    lm, prompt = build_lm(args), make_prompt(args)
    outputs: dict[str, torch.Tensor] = {}
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for side in SIDES:
        GENERATORS[side](lm, prompt, min(args.new_tokens, 8))  # warm-up
    for round_ in range(args.repeats):
        for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
            start = time.perf_counter()
            outputs[side] = GENERATORS[side](lm, prompt, args.new_tokens)
            times[side].append(time.perf_counter() - start)
    difference = first_difference(outputs["cached"], outputs["uncached"])
    new = args.batch * args.new_tokens
    rows = []
    for side in SIDES:
        median = statistics.median(times[side])
        rows.append(
            {
                "side": side,
                "times_s": times[side],
                "median_s": median,
                "tokens_per_s": new / median,
                "gflops": side_flops(side, args) / median / 1e9,
            }
        )
    cached, uncached = rows
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "memory")}
    if args.memory:
        script = str(Path(__file__).resolve())
        jobs = [
            {"script": script, "prepare": "prepare_generation", "kwargs": {"side": side, "settings": settings}}
            for side in SIDES
        ]
        for row, answer in zip(rows, measure_peaks(jobs, args.threads), strict=True):
            row["peak_bytes"], row["memory_error"] = answer.get("peak_bytes"), answer.get("error")
    return {
        "benchmark": "lm_generation_speed",
        "config": {**vars(args), "json": str(args.json), "parameters": sum(p.numel() for p in lm.parameters())},
        "machine": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu_model": cpu_model(),
        },
        "convention": "tokens/s = batch·new_tokens / median seconds of a whole generation (prompt included); "
        "speedup = cached tokens/s / uncached tokens/s; GFLOP/s of the work each side does (module docstring); "
        "peak_bytes: RSS growth over one generation in a fresh process",
        "same_output": difference is None,
        "first_difference": difference,
        "speedup": cached["tokens_per_s"] / uncached["tokens_per_s"],
        "results": rows,
    }


def table(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [
        f"TransformerLM {c['layers']}x{c['width']} h{c['heads']} vocab={c['vocab']} params={c['parameters']:,} "
        f"batch={c['batch']} prompt={c['prompt_len']} new={c['new_tokens']} greedy, "
        f"threads={report['machine']['threads']}",
        "",
        "| decoder | seconds | tokens/s | GFLOP/s | peak MiB | speed-up | same output |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        peak = r.get("peak_bytes")
        speedup = f"{report['speedup']:.1f}×" if r["side"] == "cached" else "1.0×"
        same = "yes" if report["same_output"] else f"NO (from position {report['first_difference']})"
        lines.append(
            f"| {r['side']} | {r['median_s']:.2f} | {r['tokens_per_s']:.0f} | {r['gflops']:.2f} | "
            f"{'' if peak is None else f'{peak / 2**20:.1f}'} | {speedup} | {same} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=500, help="tokens generated (default 500)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    parser.add_argument("--batch", type=int, default=1, help="prompts generated together (default 1)")
    parser.add_argument("--layers", type=int, default=4, help="(default 4)")
    parser.add_argument("--width", type=int, default=128, help="d_model (default 128)")
    parser.add_argument("--heads", type=int, default=4, help="(default 4)")
    parser.add_argument("--vocab", type=int, default=65, help="(default 65, Shakespeare's characters)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per side (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench-results/lm_generation_speed.json"))
    args = parser.parse_args(argv)
    for name in ("new_tokens", "prompt_len", "batch", "layers", "width", "heads", "vocab", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.width % args.heads:
        parser.error(f"--width {args.width} must be a multiple of --heads {args.heads}")
    report = run(args)
    print(table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0 if report["same_output"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
