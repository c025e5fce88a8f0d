"""``qkv compare``: qkv's attention side by side with PyTorch's ``F.scaled_dot_product_attention``.

For a handful of everyday cases, runs both on the same random inputs and prints the largest absolute
difference of the outputs, both median times and which qkv backend ran. Features SDPA has no argument
for (key_lengths, ALiBi, bottom-right causal) are given to SDPA as the equivalent dense mask. A bad option
is one line on stderr, ``qkv compare: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import qkv
from qkv.checks import int_at_least


@dataclass(frozen=True)
class Comparison:
    """One row of the comparison: the case, the backend qkv chose, the error and both timings."""

    case: str
    backend: str
    max_abs_diff: float
    qkv_ms: float
    sdpa_ms: float


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_comparisons(
    batch: int = 2, heads: int = 8, length: int = 512, head_dim: int = 64, repeats: int = 3, seed: int = 0
) -> list[Comparison]:
    """Compare qkv with SDPA on ``(batch, heads, length, head_dim)`` float32 inputs; one row per case."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=gen) for _ in range(3))
    kv_heads = grouped_kv_heads(heads)
    k_gqa, v_gqa = k[:, :kv_heads], v[:, :kv_heads]
    lengths = torch.tensor([length - length // (i + 2) for i in range(batch)])
    padding = torch.arange(length) < lengths[:, None, None, None]
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)
    distance = (torch.arange(length)[:, None] - torch.arange(length)).abs()
    alibi_bias = -slopes[:, None, None] * distance
    q_tail = q[:, :, length // 2 :]
    bottom_right = torch.ones(length - length // 2, length, dtype=torch.bool).tril(diagonal=length // 2)

    cases: list[tuple[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor], dict]] = [
        ("plain", lambda: qkv.attention(q, k, v), lambda: F.scaled_dot_product_attention(q, k, v), {}),
        (
            "causal (top-left)",
            lambda: qkv.attention(q, k, v, causal="top_left"),
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            {"causal": "top_left"},
        ),
        (
            f"grouped heads ({kv_heads} kv heads)",
            lambda: qkv.attention(q, k_gqa, v_gqa),
            lambda: F.scaled_dot_product_attention(q, k_gqa, v_gqa, enable_gqa=True),
            {},
        ),
        (
            "padding via key_lengths",
            lambda: qkv.attention(q, k, v, key_lengths=lengths),
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=padding),
            {"key_lengths": lengths},
        ),
        (
            "ALiBi",
            lambda: qkv.attention(q, k, v, alibi_slopes=slopes),
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=alibi_bias),
            {"alibi_slopes": slopes},
        ),
        (
            "causal (bottom-right), L = S/2",
            lambda: qkv.attention(q_tail, k, v, causal=True),
            lambda: F.scaled_dot_product_attention(q_tail, k, v, attn_mask=bottom_right),
            {"causal": True},
        ),
    ]
    rows = []
    for name, ours, theirs, features in cases:
        qq = q_tail if "L = S/2" in name else q
        kk, vv = (k_gqa, v_gqa) if "grouped" in name else (k, v)
        choice = qkv.explain_backend(qq, kk, vv, **features)
        diff = (ours() - theirs()).abs().max().item()
        rows.append(Comparison(name, choice.backend, diff, _median_ms(ours, repeats), _median_ms(theirs, repeats)))
    return rows


def grouped_kv_heads(heads: int) -> int:
    """The key/value heads of the grouped-heads case: the largest divisor of ``heads`` up to ``heads / 4``
    (at least 1), so any number of heads gives a valid grouping."""
    return max(d for d in range(1, max(1, heads // 4) + 1) if heads % d == 0)


def check_sizes(args: argparse.Namespace) -> None:
    """``ValueError`` naming the first of ``--batch``, ``--heads``, ``--length``, ``--head-dim``, ``--repeats``
    that is not a positive int."""
    for option in ("batch", "heads", "length", "head_dim", "repeats"):
        int_at_least(f"--{option.replace('_', '-')}", getattr(args, option), expected="a positive integer")


def format_table(rows: list[Comparison]) -> str:
    """A plain-text table of comparisons."""
    lines = [f"{'case':32} {'qkv backend':12} {'max |qkv - sdpa|':>17} {'qkv ms':>9} {'sdpa ms':>9}"]
    for r in rows:
        lines.append(f"{r.case:32} {r.backend:12} {r.max_abs_diff:17.2e} {r.qkv_ms:9.2f} {r.sdpa_ms:9.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the comparison table; 2 on a bad option."""
    try:
        check_sizes(args)
    except ValueError as e:
        print(f"qkv compare: error: {e}", file=sys.stderr)
        return 2
    print(
        f"qkv vs F.scaled_dot_product_attention: B={args.batch} H={args.heads} L=S={args.length} "
        f"D={args.head_dim}, float32, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    rows = run_comparisons(args.batch, args.heads, args.length, args.head_dim, args.repeats)
    print(format_table(rows))
    worst = max(r.max_abs_diff for r in rows)
    print(f"largest difference: {worst:.2e} (float32 rounding is ~1e-6)")
    return 0 if worst < 1e-4 else 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``compare`` subcommand."""
    p = sub.add_parser("compare", help="check qkv against F.scaled_dot_product_attention on common cases")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(run=run)
