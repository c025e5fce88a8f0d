"""LM memory: the peak memory of one training step of a small ``TransformerLM`` at long contexts, on CPU.

One forward and backward (cross-entropy over every position, no optimizer) of a 2-layer, 128-wide GPT
(learned positions, pre-LN, GELU, tied embeddings, dropout 0; 2 heads of 64, batch 1) at contexts 1,024 to
8,192, with the attention of its layers computed by:

* ``auto``: what ``TransformerLM`` runs (it has no backend option; ``qkv.explain_backend`` says which
  backend ``auto`` picks for its causal self-attention, and why);
* ``tiled``: ``qkv.attention(..., backend="tiled")``, online softmax over key blocks;
* ``math``: ``backend="math"``, the reference, which materializes the ``H·L·S`` scores;
* ``none``: no attention at all (each layer's attention output is a copy of its values), the rest of the
  step, so that **attention memory = peak(backend) − peak(none)**.

The forced backends replace ``qkv.nn.multi_head.attention`` (the function ``MultiHeadAttention`` calls)
with ``qkv.attention`` at that backend; a call counter checks that every layer went through it.

Memory is measured as ``qkv bench`` measures it (:mod:`qkv.bench.runner`): a worker process (this script
with ``--peak-worker``) imports torch and qkv, runs nothing, and forks one fresh child per measurement;
the child builds the model and inputs, returns freed memory to the OS (``malloc_trim``), resets the peak
resident set size (``VmHWM``, through ``/proc/self/clear_refs``) and reads its growth over one step, with
no warm-up. The child then times a second step. ``math`` is skipped where its estimated peak
(:func:`math_estimate_bytes`) exceeds ``--memory-fraction`` of ``MemAvailable``.

Other LM benchmarks (``lm_training_speed.py``) measure their peaks through :func:`measure_peaks` too.

Usage::

    python benchmarks/lm_memory.py                                   # contexts 1024..8192; < 1 min on 2 cores
    python benchmarks/lm_memory.py --contexts 512 1024 --backends auto math none --json mem.json
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

import qkv
import qkv.nn.multi_head
from qkv.bench.runner import available_memory, cpu_model, format_bytes, peak_rss_growth
from qkv.models.config import LMConfig
from qkv.models.lm import TransformerLM

BACKENDS = ("auto", "tiled", "math", "none")
FLOAT_BYTES = 4


# --- peak memory of a prepared step, in a fresh forked child ----------------------------------------------


def measure_peaks(jobs: Sequence[dict[str, Any]], threads: int) -> list[dict[str, Any]]:
    """The peak memory growth of one call of each job's step, each in a fresh process.

    A job is ``{"script": path, "prepare": name, "kwargs": {...}}``: ``prepare(**kwargs)``, a function of the
    script at ``path``, builds what the step needs and returns it as a no-argument callable. Returns one
    answer per job, in order: ``{"peak_bytes", "method", "seconds"}`` (``seconds``: a second, timed call) or
    ``{"error": str}``.
    """
    if not jobs:
        return []
    payload = json.dumps({"threads": threads, "jobs": list(jobs)})
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")  # this checkout's qkv, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryFile("w+") as err:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--peak-worker"],
            input=payload,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            check=False,
        )
        answers = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        if len(answers) < len(jobs):
            err.seek(0)
            tail = err.read().strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            answers += [{"error": f"memory worker failed: {tail[0][:200]}"}] * (len(jobs) - len(answers))
    return answers


def _load_script(path: str) -> ModuleType:
    name = f"_peak_job_{Path(path).stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, f"cannot load {path}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _malloc_trim() -> None:
    """Hand the memory freed while building the model back to the OS, so the step cannot reuse it unseen."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then be a little low
        pass


def _peak_of(step: Callable[[], object]) -> dict[str, Any]:
    """The growth of the peak RSS over one call of ``step``, then the seconds of a second call."""
    _malloc_trim()
    peak = peak_rss_growth(step)
    if peak is None:
        raise RuntimeError("measuring peak memory needs Linux's /proc/self/clear_refs and VmHWM")
    start = time.perf_counter()
    step()
    return {"peak_bytes": peak, "method": "VmHWM", "seconds": time.perf_counter() - start}


def _run_in_child(module: ModuleType, job: dict[str, Any], threads: int) -> dict[str, Any]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, answer, and leave without running any Python cleanup
        os.close(read_fd)
        try:
            torch.set_num_threads(threads)
            answer = _peak_of(getattr(module, job["prepare"])(**job["kwargs"]))
        except BaseException as e:  # the child must always answer and exit, whatever happened
            answer = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        os.write(write_fd, json.dumps(answer).encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if data:
        return dict(json.loads(data))
    if os.WIFSIGNALED(status):
        return {"error": f"the measuring process was killed by signal {os.WTERMSIG(status)} (out of memory?)"}
    return {"error": f"the measuring process exited with status {os.waitstatus_to_exitcode(status)}"}


def peak_worker() -> int:
    """``--peak-worker``: read ``{"threads", "jobs"}`` on stdin, print one JSON answer line per job."""
    request = json.load(sys.stdin)
    jobs = request["jobs"]
    modules = {job["script"]: _load_script(job["script"]) for job in jobs}  # imports, before any fork
    import torch.fx.experimental.symbolic_shapes  # noqa: F401  (torch imports it on a first backward)

    for job in jobs:
        print(json.dumps(_run_in_child(modules[job["script"]], job, request["threads"])), flush=True)
    return 0


# --- the LM step measured here ----------------------------------------------------------------------------


def build_lm(context: int, layers: int, width: int, heads: int, vocab: int, seed: int) -> TransformerLM:
    """The GPT-2-style model measured: learned positions (``max_positions = context``), dropout 0."""
    torch.manual_seed(seed)
    config = LMConfig(
        vocab_size=vocab,
        d_model=width,
        num_heads=heads,
        num_layers=layers,
        ffn_dim=4 * width,
        dropout=0.0,
        max_positions=context,
    )
    return TransformerLM(config)


def _values_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_: object) -> torch.Tensor:
    """The ``none`` backend: no scores at all; a copy of ``v`` ``(B, H, S, D)``, the shape attention returns."""
    return v.clone()


def use_backend(backend: str) -> list[int]:
    """Route ``MultiHeadAttention`` through ``backend`` in this process; returns the call counter."""
    calls = [0]
    base: Callable[..., Any] = _values_only if backend == "none" else functools.partial(qkv.attention, backend=backend)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return base(*args, **kwargs)

    if backend != "auto":
        qkv.nn.multi_head.attention = counted  # type: ignore[attr-defined]
    return calls


def prepare_lm_step(
    context: int, backend: str, layers: int, width: int, heads: int, vocab: int, seed: int
) -> Callable[[], None]:
    """One forward + backward of the LM at ``context`` with ``backend``'s attention (a peak-memory job)."""
    model = build_lm(context, layers, width, heads, vocab, seed)
    tokens = torch.randint(0, vocab, (1, context + 1), generator=torch.Generator().manual_seed(seed))
    calls = use_backend(backend)

    def step() -> None:
        before = calls[0]
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1)).backward()
        if backend != "auto" and calls[0] - before != layers:
            raise RuntimeError(f"backend {backend!r} ran {calls[0] - before} times for {layers} layers")

    return step


def math_estimate_bytes(context: int, layers: int, heads: int) -> int:
    """A rough peak of the ``math`` step: float32 ``H·T²`` score matrices, two saved per layer for the
    backward and about five more alive at the peak of one layer's backward."""
    return (2 * layers + 5) * heads * context * context * FLOAT_BYTES


def auto_choice(context: int, heads: int, width: int) -> str:
    """What ``backend="auto"`` runs for the model's causal self-attention at ``context``, and why."""
    q = torch.zeros(1, heads, context, width // heads, requires_grad=True)
    return str(qkv.explain_backend(q, q, q, causal=True))


def growth_exponent(x0: float, y0: float, x1: float, y1: float) -> float | None:
    """``e`` in ``y ∝ x^e`` between two points, ``None`` where a ``y`` is not positive."""
    if y0 <= 0 or y1 <= 0:
        return None
    return math.log(y1 / y0) / math.log(x1 / x0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    script = str(Path(__file__).resolve())
    limit = args.memory_fraction * available_memory("cpu")
    model_args = {"layers": args.layers, "width": args.width, "heads": args.heads, "vocab": args.vocab}
    plan, rows = [], []
    for context in args.contexts:
        for backend in args.backends:
            row: dict[str, Any] = {"context": context, "backend": backend}
            row["score_matrix_bytes"] = args.heads * context * context * FLOAT_BYTES
            if backend == "math" and math_estimate_bytes(context, args.layers, args.heads) > limit:
                row["status"] = "skipped"
                row["reason"] = (
                    f"estimated ~{format_bytes(math_estimate_bytes(context, args.layers, args.heads))}, over "
                    f"{args.memory_fraction:.0%} of the memory available"
                )
            else:
                kwargs = {"context": context, "backend": backend, "seed": args.seed, **model_args}
                plan.append((row, {"script": script, "prepare": "prepare_lm_step", "kwargs": kwargs}))
            rows.append(row)
    for (row, _), answer in zip(plan, measure_peaks([job for _, job in plan], args.threads), strict=True):
        row.update(answer)
        row["status"] = "error" if "error" in answer else "ok"
        if "seconds" in answer:
            row["tokens_per_s"] = row["context"] / answer["seconds"]
    fill_attention_memory(rows)
    return {
        "overall_growth": overall_growth(rows),
        "benchmark": "lm_memory",
        "config": {**{k: v for k, v in vars(args).items() if k != "json"}, "json": str(args.json)},
        "model": "TransformerLM: learned positions, pre-LN, GELU, tied embeddings, dropout 0, ffn 4·width",
        "auto_backend": {str(c): auto_choice(c, args.heads, args.width) for c in args.contexts},
        "machine": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu_model": cpu_model(),
            "memory_available_bytes": available_memory("cpu"),
        },
        "convention": "peak_bytes: growth of the peak RSS over the first forward+backward in a fresh process; "
        "attention_bytes = peak_bytes - peak_bytes of backend 'none' at the same context; growth: e in "
        "attention_bytes ∝ context^e from the previous context; score_matrix_bytes = H·T²·4 (one layer's "
        "float32 scores)",
        "results": rows,
    }


def fill_attention_memory(rows: list[dict[str, Any]]) -> None:
    """Add ``attention_bytes`` (over ``none``), its ratio to one score matrix and its growth exponent."""
    baseline = {r["context"]: r["peak_bytes"] for r in rows if r["backend"] == "none" and r["status"] == "ok"}
    previous: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["status"] != "ok" or r["backend"] == "none" or r["context"] not in baseline:
            continue
        r["attention_bytes"] = r["peak_bytes"] - baseline[r["context"]]
        r["attention_over_scores"] = r["attention_bytes"] / r["score_matrix_bytes"]
        before = previous.get(r["backend"])
        if before is not None:
            r["growth"] = growth_exponent(
                before["context"], before["attention_bytes"], r["context"], r["attention_bytes"]
            )
        previous[r["backend"]] = r


def overall_growth(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per backend, the growth exponent of its attention memory from its smallest to its largest context."""
    measured: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if "attention_bytes" in r:
            measured.setdefault(r["backend"], []).append(r)
    growth = {}
    for backend, found in measured.items():
        if len(found) >= 2:
            first, last = found[0], found[-1]
            growth[backend] = growth_exponent(
                first["context"], first["attention_bytes"], last["context"], last["attention_bytes"]
            )
    return growth


def table(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [
        f"TransformerLM layers={c['layers']} width={c['width']} heads={c['heads']} vocab={c['vocab']} batch=1 "
        f"threads={report['machine']['threads']}",
        *(f"auto at context {ctx}: {why}" for ctx, why in report["auto_backend"].items()),
        "attention memory ∝ context^e from the smallest to the largest context: "
        + ", ".join(f"{b} e={'n/a' if e is None else f'{e:.2f}'}" for b, e in report["overall_growth"].items()),
        "",
        "| context | backend | peak MiB | attention MiB | attention / one score matrix | growth | s/step | tokens/s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['context']} | {r['backend']} | {r['status']}: {r.get('reason') or r.get('error')} |")
            continue
        attention, growth = r.get("attention_bytes"), r.get("growth")
        cells = (
            "" if attention is None else f"{attention / 2**20:.1f}",
            "" if attention is None else f"{r['attention_over_scores']:.3f}",
            "" if growth is None else f"{growth:.2f}",
        )
        lines.append(
            f"| {r['context']} | {r['backend']} | {r['peak_bytes'] / 2**20:.1f} | {' | '.join(cells)} | "
            f"{r['seconds']:.2f} | {r['tokens_per_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--peak-worker"]:
        return peak_worker()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--layers", type=int, default=2, help="(default 2)")
    parser.add_argument("--width", type=int, default=128, help="d_model (default 128)")
    parser.add_argument("--heads", type=int, default=2, help="(default 2: head dim 64)")
    parser.add_argument("--vocab", type=int, default=256, help="(default 256, bytes)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.5,
        help="skip math where its estimate exceeds this fraction of MemAvailable (default 0.5)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench-results/lm_memory.json"))
    args = parser.parse_args(argv)
    for name in ("layers", "width", "heads", "vocab", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    if any(c < 1 for c in args.contexts):
        parser.error(f"--contexts must be >= 1; got {args.contexts}")
    if args.width % args.heads:
        parser.error(f"--width {args.width} must be a multiple of --heads {args.heads}")
    if "none" not in args.backends:
        args.backends.append("none")  # the baseline every attention figure is measured against
    report = run(args)
    print(table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0 if all(r["status"] != "error" for r in report["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
