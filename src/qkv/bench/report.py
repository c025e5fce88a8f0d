"""Writing a sweep down: ``bench.json`` (every raw number), ``bench.md`` (the table) and PNG plots.

Plots: for each (feature, mode, head dim) group, median time and peak memory against the length, one
line per backend, log-log, in ``plots/<feature>_<mode>_d<D>.png``; ``bench.png`` is the first group
(by default ``plain``, ``fwd``, the first head dim).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qkv.bench.cases import PEERS
from qkv.bench.runner import BenchConfig, Result

FLOP_CONVENTION = (
    "FlashAttention's: fwd = 4*B*H*L*S*D, halved when causal; fwd+bwd = 3.5*fwd (bwd = 2.5*fwd). "
    "Masked, windowed and padded positions are not subtracted."
)
RATIO_CONVENTION = (
    "ratio_to_torch = median time / median time of qkv.attention(backend='torch') on the same case "
    "(PyTorch SDPA as qkv calls it, with qkv's dense mask where the feature needs one); "
    "below 1 = faster than SDPA. 'sdpa' is raw F.scaled_dot_product_attention."
)
MEMORY_CONVENTION = (
    "peak_bytes = peak memory growth of one call (no warm-up) in a fresh process, inputs already "
    "allocated: peak RSS (VmHWM, as getrusage ru_maxrss) on CPU, torch.cuda.max_memory_allocated on CUDA."
)
MARKERS = ("o", "s", "^", "v", "D", "x", "P", "*")  # overlapping backends stay distinguishable
TABLE_HEADER = ("case", "L", "S", "D", "mode", "backend", "median ms", "GFLOP/s", "peak MiB", "× torch", "note")


def to_json(results: Sequence[Result], config: BenchConfig, machine: dict[str, Any]) -> dict[str, Any]:
    """The whole sweep as one JSON-ready dict: machine, config, conventions, one entry per result."""
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "config": config.to_json(),
        "conventions": {"flops": FLOP_CONVENTION, "ratio": RATIO_CONVENTION, "memory": MEMORY_CONVENTION},
        "results": [r.to_json() for r in results],
    }


def _note(r: Result) -> str:
    if r.status != "ok":
        return f"{r.status}: {r.reason}"
    notes = []
    if r.runs_on != r.backend:
        notes.append(f"runs {r.runs_on}")
    if r.memory_error:
        notes.append(f"memory: {r.memory_error}")
    return "; ".join(notes)


def table_rows(results: Sequence[Result]) -> list[tuple[str, ...]]:
    """One row per result, cells as in :data:`TABLE_HEADER`."""
    rows: list[tuple[str, ...]] = []
    for r in results:
        c = r.case
        ok = r.status == "ok"
        rows.append(
            (
                c.feature,
                str(c.q_len),
                str(c.kv_len),
                str(c.head_dim),
                c.mode,
                r.backend,
                f"{r.median_s * 1e3:.2f}" if ok and r.median_s is not None else r.status,
                f"{r.gflops:.1f}" if ok and r.gflops is not None else "",
                f"{r.peak_bytes / 2**20:.1f}" if r.peak_bytes is not None else "",
                f"{r.ratio_to_torch:.2f}" if r.ratio_to_torch is not None else "",
                _note(r),
            )
        )
    return rows


def markdown_table(results: Sequence[Result]) -> str:
    """A GitHub markdown table of the sweep, followed by what ``× torch`` means."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    lines = [line(TABLE_HEADER), "|" + "|".join("---" for _ in TABLE_HEADER) + "|"]
    lines += [line(row) for row in table_rows(results)]
    lines += [
        "",
        '× torch: median time / median time of `qkv.attention(backend="torch")` (SDPA) on the same case; '
        "below 1 is faster. `sdpa`: raw `F.scaled_dot_product_attention`. GFLOP/s: " + FLOP_CONVENTION,
    ]
    return "\n".join(lines) + "\n"


def plot_groups(results: Sequence[Result]) -> dict[tuple[str, str, int], list[Result]]:
    """Results grouped by (feature, mode, head dim), in sweep order."""
    groups: dict[tuple[str, str, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.case.feature, r.case.mode, r.case.head_dim), []).append(r)
    return groups


def write_plot(results: Sequence[Result], path: Path, title: str) -> None:
    """Median time and peak memory against ``S``, one line per backend, log-log, two subplots."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_time, ax_mem = fig.subplots(1, 2, sharex=True)
    backends = [b for b in PEERS if any(r.backend == b for r in results)]
    for backend, marker in zip(backends, MARKERS, strict=False):
        mine = sorted((r for r in results if r.backend == backend), key=lambda r: r.case.length)
        timed = [(r.case.length, r.median_s * 1e3) for r in mine if r.median_s is not None]
        measured = [(r.case.length, r.peak_bytes / 2**20) for r in mine if r.peak_bytes]
        for ax, points in ((ax_time, timed), (ax_mem, measured)):
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker=marker, label=backend, alpha=0.85)
    for ax, ylabel in ((ax_time, "median time (ms)"), (ax_mem, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length S")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def write_outputs(
    results: Sequence[Result], config: BenchConfig, machine: dict[str, Any], out_dir: Path
) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md``, ``bench.png`` and ``plots/*.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md", "plot": out_dir / "bench.png"}
    paths["json"].write_text(json.dumps(to_json(results, config, machine), indent=2) + "\n")
    paths["markdown"].write_text(markdown_table(results))
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    for i, ((feature, mode, head_dim), group) in enumerate(plot_groups(results).items()):
        c = group[0].case
        title = (
            f"{feature}, {mode}, B={c.batch} H={c.heads} D={head_dim} {c.dtype} on {machine['device']} "
            f"({machine['threads']} threads)"
        )
        write_plot(group, plots / f"{feature}_{mode.replace('+', '-')}_d{head_dim}.png", title)
        if i == 0:
            write_plot(group, paths["plot"], title)
    return paths
