"""GPU benchmark of the ``triton`` backend against PyTorch's SDPA kernels and the reference, on CUDA.

Two suites, both timed with CUDA events (median of ``--repeats`` calls after ``--warmup`` calls; the first
warm-up call of a new shape also runs Triton's autotuning and compilation, which is never timed):

* **speed**: plain and causal attention (``L = S = N``), bf16 by default, head dims 64 and 128,
  ``N`` from 1k to 16k with ``B = tokens / N`` and ``H = hidden / D`` (FlashAttention's benchmark
  shapes: 16k tokens, hidden size 2048), forward and forward+backward, for ``triton``
  (``qkv.attention(..., backend="triton")``), SDPA's ``flash`` and ``cudnn`` kernels (forced through
  ``torch.nn.attention.sdpa_kernel``), SDPA's ``efficient`` kernel and qkv's ``math`` reference (skipped
  where its dense scores would not fit).
* **features** at ``N = --feature-length`` (8k): ALiBi, soft-capping, a sliding window, a padding mask,
  ``key_lengths``, bottom-right causal with ``L = S/2``, grouped heads, and weights on demand, each on
  ``triton`` against what one would use without it: qkv's ``torch`` backend (SDPA with the dense mask qkv
  builds, i.e. SDPA's fallback), raw SDPA where it has the feature, ``tiled`` and ``math``; with the
  peak GPU memory of one call (``max_memory_allocated`` growth; inputs excluded, outputs included).

Rates are TFLOP/s with FlashAttention's convention: ``fwd = 4·B·H·L·S·D``, halved when causal;
``fwd+bwd = 3.5 × fwd``; masked work is not subtracted. Ratios are time(peer) / time(triton): above 1,
triton is faster. Before timing, ``--check`` (on by default) compares triton with ``math`` on small
inputs of every feature and records the errors.

Usage (on a CUDA machine, with ``pip install -e '.[gpu]'``)::

    python benchmarks/gpu_attention.py --out results/gpu_attention.json          # both suites
    python benchmarks/gpu_attention.py --quick                                  # a minute or two
    python benchmarks/gpu_attention.py --suites speed --head-dims 128 --lengths 4096 16384 --modes fwd
    TRITON_PRINT_AUTOTUNING=1 python benchmarks/gpu_attention.py --suites speed  # show tuning choices
    python benchmarks/gpu_attention.py --list                                   # the plan (works on CPU)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import qkv
from qkv.bench.cases import alibi_slopes, attention_flops
from qkv.bench.runner import machine_info

SDPA_KERNELS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
QKV_PEERS = ("triton", "torch", "tiled", "math", "auto")
SPEED_PEERS = ("triton", "flash", "cudnn", "efficient", "math")
FEATURES = ("alibi", "softcap", "window", "padding", "key_lengths", "bottom_right", "gqa_causal", "weights")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Case:
    """One timed point: a suite, a feature, a peer and the shape."""

    suite: str
    feature: str
    peer: str
    mode: str
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str
    causal: bool

    @property
    def flops(self) -> float:
        return attention_flops(
            self.batch, self.heads, self.q_len, self.kv_len, self.head_dim, causal=self.causal, mode=self.mode
        )

    def dense_bytes(self) -> int:
        """A rough peak of a dense-scores peer: float32 score matrices (3 forward, 6 with backward)."""
        return self.batch * self.heads * self.q_len * self.kv_len * 4 * (6 if self.mode == "fwd+bwd" else 3)


@dataclass
class Result:
    case: Case
    times_ms: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    status: str = "ok"
    note: str = ""

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    @property
    def tflops(self) -> float | None:
        ms = self.median_ms
        return self.case.flops / (ms * 1e-3) / 1e12 if ms else None

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self.case),
            "times_ms": self.times_ms,
            "median_ms": self.median_ms,
            "tflops": self.tflops,
            "peak_mib": self.peak_mib,
            "status": self.status,
            "note": self.note,
        }


# ---------------------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------------------


def speed_plan(args: argparse.Namespace) -> Iterator[Case]:
    for head_dim in args.head_dims:
        heads = max(1, args.hidden // head_dim)
        for n in args.lengths:
            batch = max(1, args.tokens // n)
            for causal in (False, True):
                for mode in args.modes:
                    for peer in args.speed_peers:
                        yield Case(
                            "speed",
                            "causal" if causal else "plain",
                            peer,
                            mode,
                            batch,
                            heads,
                            heads,
                            n,
                            n,
                            head_dim,
                            args.dtype,
                            causal,
                        )


def feature_peers(feature: str) -> tuple[str, ...]:
    """Triton, what it replaces (qkv's SDPA path with a dense mask, raw SDPA where it has the feature, the
    tiled and math backends) and ``auto``, whose choice is noted."""
    others = {
        "alibi": ("torch", "tiled", "math"),
        "softcap": ("tiled", "math"),
        "window": ("torch", "tiled", "math"),
        "padding": ("torch", "efficient", "tiled", "math"),
        "key_lengths": ("torch", "tiled", "math"),
        "bottom_right": ("torch", "sdpa_lower_right", "tiled", "math"),
        "gqa_causal": ("flash", "cudnn", "tiled", "math"),
        "weights": ("tiled", "math"),
    }[feature]
    return ("triton", *others, "auto")


def feature_plan(args: argparse.Namespace) -> Iterator[Case]:
    n, head_dim = args.feature_length, args.feature_head_dim
    heads = max(1, args.hidden // head_dim)
    for feature in args.features:
        batch = 2 if feature in ("padding", "key_lengths") else 1
        q_len = n // 2 if feature == "bottom_right" else n
        h, hkv = (2 * heads, max(1, heads // 2)) if feature == "gqa_causal" else (heads, heads)
        causal = feature in ("softcap", "bottom_right", "gqa_causal", "weights")
        modes = ("fwd",) if feature == "weights" else args.modes
        for mode in modes:
            for peer in feature_peers(feature):
                yield Case("features", feature, peer, mode, batch, h, hkv, q_len, n, head_dim, args.dtype, causal)


# ---------------------------------------------------------------------------------------------------------
# Calls
# ---------------------------------------------------------------------------------------------------------


def feature_kwargs(case: Case, device: torch.device) -> dict[str, Any]:
    """qkv.attention arguments of a case's feature."""
    f = case.feature
    if f == "alibi":
        return {"alibi_slopes": alibi_slopes(case.heads).to(device)}
    if f == "softcap":
        return {"softcap": 30.0, "causal": True}
    if f == "window":
        return {"window": (256, 0)}
    if f == "padding":
        keep = torch.arange(case.kv_len, device=device) < case.kv_len - case.kv_len // 8
        return {"mask": keep.expand(case.batch, 1, 1, case.kv_len)}
    if f == "key_lengths":
        return {"key_lengths": torch.full((case.batch,), case.kv_len - case.kv_len // 8, device=device)}
    if f == "weights":
        return {"causal": True, "return_weights": True}
    return {"causal": case.causal}


def make_inputs(case: Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = DTYPES[case.dtype]
    grad = case.mode == "fwd+bwd"
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).requires_grad_(grad)

    return (
        rand(case.batch, case.heads, case.q_len, case.head_dim),
        rand(case.batch, case.kv_heads, case.kv_len, case.head_dim),
        rand(case.batch, case.kv_heads, case.kv_len, case.head_dim),
    )


def make_forward(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], Any]:
    """A zero-argument forward call of ``case.peer``; raises ``RuntimeError`` if the peer cannot run it."""
    kwargs = feature_kwargs(case, q.device)
    if case.peer in QKV_PEERS:
        return lambda: qkv.attention(q, k, v, backend=case.peer, **kwargs)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = case.kv_heads != case.heads
    mask, is_causal = kwargs.get("mask"), bool(kwargs.get("causal", False))
    if case.peer == "sdpa_lower_right":
        from torch.nn.attention.bias import causal_lower_right

        mask, is_causal = causal_lower_right(case.q_len, case.kv_len), False
        kernel = None
    else:
        kernel = getattr(SDPBackend, SDPA_KERNELS[case.peer])
    if set(kwargs) - {"causal", "mask"}:
        raise RuntimeError(f"SDPA has no argument for {case.feature}")

    def call() -> torch.Tensor:
        ctx = sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext()
        with ctx:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)

    return call


def make_step(case: Case, forward: Callable[[], Any], inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    if case.mode == "fwd":

        def step() -> Any:
            with torch.no_grad():
                return forward()

        return step
    d_out: list[torch.Tensor] = []

    def step_bwd() -> Any:
        result = forward()
        out = result[0] if isinstance(result, tuple) else result
        if not d_out:
            d_out.append(torch.randn_like(out))
        return torch.autograd.grad(out, inputs, d_out[0])

    return step_bwd


# ---------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------


def time_ms(step: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def peak_mib(step: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak / 2**20


def run_case(case: Case, args: argparse.Namespace) -> Result:
    result = Result(case)
    device = torch.device("cuda")
    if case.peer == "math" and case.dense_bytes() > 0.8 * torch.cuda.mem_get_info()[0]:
        result.status, result.note = "skipped", f"dense scores need ~{case.dense_bytes() / 2**30:.0f} GiB"
        return result
    try:
        inputs = make_inputs(case, device)
        step = make_step(case, make_forward(case, *inputs), inputs)
        result.times_ms = time_ms(step, args.warmup, args.repeats)
        result.peak_mib = peak_mib(step)
        if case.peer == "auto":
            result.note = str(qkv.explain_backend(*inputs, **feature_kwargs(case, device), backend=case.peer))
    except torch.cuda.OutOfMemoryError:
        result.status, result.note = "oom", "out of GPU memory"
    except RuntimeError as e:  # SDPA kernel unavailable for the shape, dtype or mask
        result.status, result.note = "n/a", str(e).splitlines()[0][:200]
    finally:
        torch.cuda.empty_cache()
    return result


def check_correctness(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Triton against math on small inputs of every feature and both head dims: max abs errors."""
    checks = []
    for head_dim in sorted({*args.head_dims, args.feature_head_dim}):
        for feature in ("plain", "causal", *FEATURES):
            causal = feature in ("causal", "softcap", "bottom_right", "gqa_causal", "weights")
            h, hkv = (8, 2) if feature == "gqa_causal" else (4, 4)
            q_len = 300 if feature == "bottom_right" else 1000
            case = Case("check", feature, "triton", "fwd+bwd", 2, h, hkv, q_len, 1000, head_dim, args.dtype, causal)
            inputs = make_inputs(case, torch.device("cuda"))
            kwargs = {**feature_kwargs(case, inputs[0].device), "return_lse": True}
            row: dict[str, Any] = {"feature": feature, "head_dim": head_dim}
            outs = {}
            for backend in ("triton", "math"):
                result = qkv.attention(*inputs, backend=backend, **kwargs)
                d_out = torch.randn(
                    result[0].shape,
                    generator=torch.Generator(device="cuda").manual_seed(1),
                    device="cuda",
                    dtype=result[0].dtype,
                )
                grads = torch.autograd.grad(result[0], inputs, d_out)
                outs[backend] = (*result, *grads)
            names = ["out", *(["weights"] if feature == "weights" else []), "lse", "dq", "dk", "dv"]
            for name, got, ref in zip(names, outs["triton"], outs["math"], strict=True):
                finite = torch.isfinite(ref)
                row[name] = float((got.float()[finite] - ref.float()[finite]).abs().max())
            checks.append(row)
            print(
                f"check {feature:13s} D={head_dim:3d} "
                + " ".join(f"{k}={v:.2e}" for k, v in row.items() if k not in ("feature", "head_dim")),
                file=sys.stderr,
            )
    return checks


def ratios(results: list[Result]) -> list[dict[str, Any]]:
    """time(peer) / time(triton) for each timed point that both ran."""
    by_point: dict[tuple[Any, ...], dict[str, float]] = {}
    for r in results:
        c = r.case
        if r.median_ms is not None:
            key = (c.suite, c.feature, c.mode, c.batch, c.heads, c.kv_heads, c.q_len, c.kv_len, c.head_dim)
            by_point.setdefault(key, {})[c.peer] = r.median_ms
    rows = []
    for key, times in by_point.items():
        if "triton" in times:
            rows.append(
                {
                    "point": dict(
                        zip(
                            ("suite", "feature", "mode", "batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim"),
                            key,
                            strict=True,
                        )
                    ),
                    "peer_over_triton": {p: t / times["triton"] for p, t in times.items() if p != "triton"},
                }
            )
    return rows


def autotune_choices() -> dict[str, dict[str, str]]:
    from qkv.ops import triton_kernels as tk

    kernels = {"forward": tk.attention_forward_kernel, "dkdv": tk.attention_dkdv_kernel, "dq": tk.attention_dq_kernel}
    return {name: {str(key): str(config) for key, config in k.cache.items()} for name, k in kernels.items()}


def table(results: list[Result]) -> str:
    lines = [
        "| suite | feature | mode | B×H/Hkv | L×S | D | peer | ms | TFLOP/s | peak MiB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.case
        ms = f"{r.median_ms:.3f}" if r.median_ms else r.status
        tf = f"{r.tflops:.1f}" if r.tflops else ""
        mem = f"{r.peak_mib:.0f}" if r.peak_mib is not None else ""
        lines.append(
            f"| {c.suite} | {c.feature} | {c.mode} | {c.batch}×{c.heads}/{c.kv_heads} | "
            f"{c.q_len}×{c.kv_len} | {c.head_dim} | {c.peer} | {ms} | {tf} | {mem} | {r.note} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--suites", nargs="+", default=["speed", "features"], choices=["speed", "features"])
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384], help="N = L = S")
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--speed-peers", nargs="+", default=list(SPEED_PEERS), choices=[*SPEED_PEERS, "tiled", "auto"])
    p.add_argument("--tokens", type=int, default=16384, help="B·N of the speed suite (B = tokens / N)")
    p.add_argument("--hidden", type=int, default=2048, help="H·D (H = hidden / D)")
    p.add_argument("--features", nargs="+", default=list(FEATURES), choices=FEATURES)
    p.add_argument("--feature-length", type=int, default=8192)
    p.add_argument("--feature-head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--warmup", type=int, default=3, help="untimed calls (the first one autotunes)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the correctness check")
    p.add_argument("--quick", action="store_true", help="lengths 1024 4096, D=128, repeats 5, features at 4096")
    p.add_argument("--list", action="store_true", help="print the planned cases and exit (no GPU needed)")
    p.add_argument("--out", type=Path, default=Path("gpu_attention.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.head_dims, args.repeats, args.feature_length = [1024, 4096], [128], 5, 4096
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = [
        *(speed_plan(args) if "speed" in args.suites else ()),
        *(feature_plan(args) if "features" in args.suites else ()),
    ]
    if args.list:
        for case in plan:
            print(json.dumps(asdict(case)))
        return 0
    if not torch.cuda.is_available():
        print("gpu_attention.py needs a CUDA GPU (try --list or --help here)", file=sys.stderr)
        return 2
    checks = check_correctness(args) if args.check else []
    results = []
    for i, case in enumerate(plan):
        result = run_case(case, args)
        results.append(result)
        tf = f"{result.tflops:.1f} TFLOP/s" if result.tflops else result.status
        print(
            f"[{i + 1}/{len(plan)}] {case.suite} {case.feature} {case.mode} N={case.kv_len} D={case.head_dim} "
            f"{case.peer}: {tf} {result.note}",
            file=sys.stderr,
        )
    report = {
        "machine": machine_info("cuda"),
        "triton": importlib.metadata.version("triton"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "flops": "fwd = 4·B·H·L·S·D, /2 when causal; fwd+bwd = 3.5·fwd",
        "checks": checks,
        "results": [r.to_json() for r in results],
        "ratios": ratios(results),
        "autotune": autotune_choices(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(table(results))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
