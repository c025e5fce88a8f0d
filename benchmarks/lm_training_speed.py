"""LM training speed: tokens/s of qkv's ``TransformerLM`` against a plain-PyTorch GPT of the same size.

All three sides are GPT-2 style (learned positions, pre-LN, GELU, tied embeddings, dropout 0) with the same
sizes and the same parameter count:

* **qkv**: :class:`qkv.models.TransformerLM` (attention through ``qkv.nn.MultiHeadAttention`` and
  ``qkv.attention``, whose ``auto`` backend picks SDPA for this causal self-attention);
* **plain**: :class:`PlainGPT`, written here as nanoGPT writes its ``model.py``: ``nn.Embedding`` tokens and
  positions, blocks of LayerNorm, q/k/v projections, ``F.scaled_dot_product_attention(is_causal=True)``, an
  output ``Linear``, a GELU MLP, a final LayerNorm and a head tied to the token embedding; with qkv's
  parameterization, three ``Linear(E, E)`` for q, k and v. **The target: qkv >= 1.0x plain.**
* **nanogpt**: the same with nanoGPT's one fused ``Linear(E, 3E)`` for q/k/v (as many parameters; one
  larger matrix product instead of three), for reference.

The plain models are given qkv's weights, and the script checks that all compute the same logits before
timing.

Each side trains on the same random batches (``--batch`` × ``--context`` tokens, vocabulary 65 as
Shakespeare's characters) with ``torch.optim.AdamW`` (nanoGPT's lr 1e-3, betas (0.9, 0.99), weight decay
0.1) and gradient clipping at 1.0: forward, cross-entropy, backward, clip, step, ``zero_grad``. After
``--warmup`` untimed steps per side, ``--repeats`` rounds each time ``--steps`` steps of every side, the order
reversed every other round, so that all see the same machine; the median round is reported.

FLOPs of a step (PaLM's convention for the matrix products, the README's for attention)::

    6 · N_matmul · tokens                        N_matmul = weights of every Linear, head included
    + layers · 3.5 · 4 · B · H · T · T · D / 2   causal attention, forward + backward

Peak memory: the growth of the peak RSS over the first training step (AdamW's state included) in a
fresh process, measured as ``lm_memory.py`` measures it.

Usage::

    python benchmarks/lm_training_speed.py                     # baby (4x128, T=64, B=12) and small (6x384, T=256, B=8)
    python benchmarks/lm_training_speed.py --presets baby --repeats 11 --json baby.json
    python benchmarks/lm_training_speed.py --size 2 2 32 16 4 --steps 2 --repeats 1   # a custom size
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_memory import measure_peaks  # this folder is on sys.path when a script here runs
from torch import nn

from qkv.bench.runner import cpu_model
from qkv.models.config import LMConfig
from qkv.models.lm import TransformerLM
from qkv.nn.multi_head import unstack_projections

VOCAB = 65  # tiny Shakespeare's characters
SIDES = ("qkv", "plain", "nanogpt")
PEERS = SIDES[1:]


@dataclass(frozen=True)
class Size:
    """A GPT's sizes and its batch: ``layers`` blocks of ``heads`` heads, ``width`` = ``E``, ``context`` = ``T``."""

    layers: int
    heads: int
    width: int
    context: int
    batch: int

    @property
    def name(self) -> str:
        return f"{self.layers}x{self.width} h{self.heads} T={self.context} B={self.batch}"


PRESETS = {
    "baby": Size(layers=4, heads=4, width=128, context=64, batch=12),  # nanoGPT's CPU "baby GPT"
    "small": Size(layers=6, heads=6, width=384, context=256, batch=8),  # its shakespeare_char GPU model, B=8
}


class PlainBlock(nn.Module):
    """nanoGPT's ``Block``: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``; ``x: (B, T, E)``.

    ``fused``: q, k and v come from one ``c_attn = Linear(E, 3E)`` (nanoGPT); otherwise from ``q_proj``,
    ``k_proj`` and ``v_proj``, each ``Linear(E, E)`` (qkv's parameterization).
    """

    def __init__(self, width: int, heads: int, fused: bool) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        if fused:
            self.c_attn = nn.Linear(width, 3 * width)
        else:
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.fused = fused
        self.c_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, 4 * width)
        self.mlp_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape
        h = self.ln_1(x)
        q, k, v = self.c_attn(h).split(e, dim=2) if self.fused else (self.q_proj(h), self.k_proj(h), self.v_proj(h))
        q, k, v = (z.view(b, t, self.heads, e // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, e))
        out: torch.Tensor = x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))
        return out


class PlainGPT(nn.Module):
    """nanoGPT's ``GPT`` (bias, dropout 0): ``tokens (B, T)`` → ``logits (B, T, V)``."""

    def __init__(self, size: Size, vocab: int, fused: bool) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, size.width)
        self.wpe = nn.Embedding(size.context, size.width)
        self.h = nn.ModuleList(PlainBlock(size.width, size.heads, fused) for _ in range(size.layers))
        self.ln_f = nn.LayerNorm(size.width)
        self.lm_head = nn.Linear(size.width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.h:
            x = block(x)
        logits: torch.Tensor = self.lm_head(self.ln_f(x))
        return logits


def build_qkv(size: Size, vocab: int, seed: int) -> TransformerLM:
    torch.manual_seed(seed)
    config = LMConfig(
        vocab_size=vocab,
        d_model=size.width,
        num_heads=size.heads,
        num_layers=size.layers,
        ffn_dim=4 * size.width,
        dropout=0.0,
        max_positions=size.context,
    )
    return TransformerLM(config)


# qkv's TransformerLM parameter names → PlainGPT's, per layer and for the rest.
LAYER_NAMES = {
    "self_attn.out_proj": "c_proj",
    "linear1": "c_fc",
    "linear2": "mlp_proj",
    "norm1": "ln_1",
    "norm2": "ln_2",
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj")
MODEL_NAMES = {"embed_tokens": "wte", "embed_positions": "wpe", "norm": "ln_f", "lm_head": "lm_head"}


def build_plain(ours: TransformerLM, size: Size, vocab: int, fused: bool) -> PlainGPT:
    """A :class:`PlainGPT` holding ``ours``' weights (qkv's stacked ``in_proj`` is nanoGPT's ``c_attn``; split into
    q/k/v when not ``fused``)."""
    theirs = unstack_projections(ours.state_dict())
    state = {}
    for key, value in theirs.items():
        module, _, rest = key.partition(".")
        if module in MODEL_NAMES:
            state[f"{MODEL_NAMES[module]}.{rest}"] = value
    for i in range(size.layers):
        names = dict(LAYER_NAMES) if fused else {**LAYER_NAMES, **{f"self_attn.{p}": p for p in PROJECTIONS}}
        for name, mine in names.items():
            for kind in ("weight", "bias"):
                state[f"h.{i}.{mine}.{kind}"] = theirs[f"layers.{i}.{name}.{kind}"]
        if fused:
            for kind in ("weight", "bias"):
                state[f"h.{i}.c_attn.{kind}"] = torch.cat(
                    [theirs[f"layers.{i}.self_attn.{p}.{kind}"] for p in PROJECTIONS]
                )
    plain = PlainGPT(size, vocab, fused)
    plain.load_state_dict(state)  # strict: every parameter of the plain model is given
    return plain


def parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied head counted once)."""
    return sum(p.numel() for p in model.parameters())


def step_flops(size: Size, vocab: int) -> float:
    """FLOPs of one training step (see the module docstring)."""
    e, t = size.width, size.context
    matmul_weights = size.layers * (4 * e * e + 8 * e * e) + vocab * e  # attention, MLP, head
    tokens = size.batch * t
    attention = size.layers * 3.5 * 4 * size.batch * size.heads * t * t * (e // size.heads) / 2
    return 6 * matmul_weights * tokens + attention


def make_batches(size: Size, vocab: int, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` random ``(B, T + 1)`` token batches (inputs ``[:, :-1]``, targets ``[:, 1:]``)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (size.batch, size.context + 1), generator=g) for _ in range(count)]


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, vocab: int) -> float:
    logits = model(batch[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def prepare_train_step(side: str, size: dict[str, int], vocab: int, seed: int) -> Callable[[], float]:
    """One training step of ``side`` (a peak-memory job of :func:`lm_memory.measure_peaks`)."""
    sizes = Size(**size)
    ours = build_qkv(sizes, vocab, seed)
    model = ours if side == "qkv" else build_plain(ours, sizes, vocab, fused=side == "nanogpt")
    optimizer = make_optimizer(model)
    batch = make_batches(sizes, vocab, 1, seed)[0]
    return lambda: train_step(model, optimizer, batch, vocab)


def same_function(ours: nn.Module, plain: nn.Module, batch: torch.Tensor) -> float:
    """The largest difference between the two models' logits on ``batch``'s inputs."""
    with torch.no_grad():
        return float((ours(batch[:, :-1]) - plain(batch[:, :-1])).abs().max())


def time_size(size: Size, args: argparse.Namespace) -> dict[str, Any]:
    """Both sides on ``size``: interleaved rounds of ``args.steps`` steps; medians, ratios, losses."""
    ours = build_qkv(size, VOCAB, args.seed)
    models = {"qkv": ours, **{peer: build_plain(ours, size, VOCAB, fused=peer == "nanogpt") for peer in PEERS}}
    batches = make_batches(size, VOCAB, args.steps, args.seed)
    max_diff = max(same_function(ours, models[peer], batches[0]) for peer in PEERS)
    if max_diff > 1e-4:
        raise RuntimeError(f"a plain GPT does not compute qkv's function: logits differ by {max_diff:.2e}")
    optimizers = {side: make_optimizer(m) for side, m in models.items()}
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    losses: dict[str, list[float]] = {side: [] for side in SIDES}
    for side in SIDES:
        for batch in batches[: args.warmup]:
            train_step(models[side], optimizers[side], batch, VOCAB)
    for round_ in range(args.repeats):
        for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
            start = time.perf_counter()
            for batch in batches:
                losses[side].append(train_step(models[side], optimizers[side], batch, VOCAB))
            times[side].append(time.perf_counter() - start)
    tokens = args.steps * size.batch * size.context
    flops = args.steps * step_flops(size, VOCAB)
    result: dict[str, Any] = {"size": asdict(size), "name": size.name, "max_logit_diff": max_diff}
    for side in SIDES:
        median = statistics.median(times[side])
        result[side] = {
            "parameters": parameters(models[side]),
            "times_s": times[side],
            "median_s": median,
            "tokens_per_s": tokens / median,
            "gflops": flops / median / 1e9,
            "last_loss": losses[side][-1],
        }
    for peer in PEERS:
        result[f"ratio_{peer}"] = result["qkv"]["tokens_per_s"] / result[peer]["tokens_per_s"]
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    sizes = [PRESETS[name] for name in args.presets] + [Size(*s) for s in args.size]
    results = [time_size(size, args) for size in sizes]
    if args.memory:
        script = str(Path(__file__).resolve())
        jobs = [
            {
                "script": script,
                "prepare": "prepare_train_step",
                "kwargs": {"side": side, "size": r["size"], "vocab": VOCAB, "seed": args.seed},
            }
            for r in results
            for side in SIDES
        ]
        answers = iter(measure_peaks(jobs, args.threads))
        for r in results:
            for side in SIDES:
                answer = next(answers)
                r[side]["peak_bytes"] = answer.get("peak_bytes")
                r[side]["memory_error"] = answer.get("error")
    return {
        "benchmark": "lm_training_speed",
        "config": {**vars(args), "json": str(args.json), "vocab": VOCAB},
        "machine": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu_model": cpu_model(),
        },
        "convention": "tokens/s = steps·B·T / median seconds of a round of --steps training steps; ratio_<peer> "
        "= qkv tokens/s / peer tokens/s (above 1: qkv is faster); GFLOP/s with 6·N_matmul per token plus "
        "causal attention 3.5·4·B·H·T²·D/2 per layer; peak_bytes: RSS growth over the first step in a fresh "
        "process",
        "results": results,
    }


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def table(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [
        f"steps={c['steps']} per round, repeats={c['repeats']}, threads={report['machine']['threads']}, "
        f"AdamW lr 1e-3, clip 1.0",
        "",
        "| size | side | params | tokens/s | GFLOP/s | peak MiB | qkv / side |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        for side in SIDES:
            s = r[side]
            ratio = f"{r[f'ratio_{side}']:.3f}×" if side in PEERS else ""
            lines.append(
                f"| {r['name']} | {side} | {s['parameters']:,} | {s['tokens_per_s']:,.0f} | {s['gflops']:.2f} | "
                f"{_mib(s.get('peak_bytes'))} | {ratio} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="*", choices=PRESETS, default=list(PRESETS))
    parser.add_argument(
        "--size",
        type=int,
        nargs=5,
        action="append",
        default=[],
        metavar=("LAYERS", "HEADS", "WIDTH", "CONTEXT", "BATCH"),
        help="a custom size (repeatable), timed after the presets",
    )
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed round (default 10)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per side (default 7)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench-results/lm_training_speed.json"))
    args = parser.parse_args(argv)
    for name in ("steps", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    if args.warmup < 0 or args.warmup > args.steps:
        parser.error(f"--warmup must be in [0, --steps={args.steps}]; got {args.warmup}")
    for layers, heads, width, context, batch in args.size:
        if min(layers, heads, width, context, batch) < 1 or width % heads:
            parser.error(f"--size needs positive numbers and WIDTH a multiple of HEADS; got {heads} heads, {width}")
    if not args.presets and not args.size:
        parser.error("nothing to time: give --presets or --size")
    report = run(args)
    print(table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    failed = [
        f"{r['name']} {side}: {r[side]['memory_error']}"
        for r in report["results"]
        for side in SIDES
        if r[side].get("memory_error")
    ]
    for line in failed:
        print(f"peak memory failed: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
