"""Running the sweep: median times in this process, peak memory in a fresh process per measurement.

Timing: for each case the inputs are built once and every peer runs on them: one warm-up call, then
``repeats`` timed calls (``time.perf_counter``, with ``torch.cuda.synchronize`` around each on CUDA); the
median is reported.

Memory: measured away from the timing process, whose allocator is warm and whose high-water mark is
already set by earlier, larger cases. A worker process (:func:`worker_main`) is started once with the
list of measurements as JSON on stdin; it imports torch, runs nothing, and forks one fresh child per
measurement (importing torch afresh for each, about 5 s on a small machine, would make the sweep crawl).
The child sets the thread count, builds the inputs, and measures one call with no warm-up:

* on CPU, the growth of the peak resident set size: on Linux ``VmHWM`` (the peak RSS that
  ``getrusage(RUSAGE_SELF).ru_maxrss`` also reports) is reset to the current RSS through
  ``/proc/self/clear_refs`` once the inputs exist, and read after the call. ``ru_maxrss`` itself cannot
  be reset and, across ``exec``, keeps the peak of the process that started it, so it is only the
  fallback where ``/proc`` is missing;
* on CUDA, ``torch.cuda.max_memory_allocated()`` after the call minus ``memory_allocated()`` before it,
  peaks reset in between.

The child answers on a pipe; the worker prints one JSON line per measurement.

Skipping: before running a peer, :func:`estimate_bytes` guesses its peak; a case needing more than
:data:`SAFETY` of the available memory (``MemAvailable``, free CUDA memory, or an injected limit) is
reported as ``skipped`` with the estimate and never run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from qkv.bench.cases import (
    DTYPES,
    FEATURES,
    MODES,
    PEERS,
    Case,
    Inputs,
    Unsupported,
    make_call,
    make_inputs,
    make_step,
    runs_on,
)

# Run a case only if its estimated peak is below this fraction of the available memory.
SAFETY = 0.7
# Score-sized (B·H·L·S) tensors alive at the peak of one call of an unfused implementation, measured on
# CPU at S = 1024 (with a margin): qkv's math keeps scores, modified scores, exponentials and weights (and,
# with autograd, saves most of them); the textbook code and SDPA's unfused path hold fewer.
DENSE_COPIES = {"math": {"fwd": 5, "fwd+bwd": 7}, "unfused": {"fwd": 3, "fwd+bwd": 5}}
# qkv's counter-based dropout hashes int64 indices of the whole score matrix (bytes per score).
DROPOUT_HASH_BYTES = 28
# The working set of the tiled backend and of SDPA's fused kernels: a few score blocks, at most this much
# whatever the length (three times more with qkv's dropout hashing), never more than the unfused path.
SCRATCH_BYTES = 64 << 20


@dataclass(frozen=True)
class BenchConfig:
    """A sweep: the cross product of lengths × head dims × features × modes, each run by every backend.

    ``memory_lengths``, ``memory_features``: the lengths and features whose peak memory is measured
    (``None`` = all). ``memory_limit``: bytes treated as available when deciding what to skip (``None`` =
    what the device has free).
    """

    lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    head_dims: tuple[int, ...] = (64, 128)
    features: tuple[str, ...] = tuple(FEATURES)
    backends: tuple[str, ...] = PEERS
    modes: tuple[str, ...] = MODES
    batch: int = 1
    heads: int = 8
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = field(default_factory=torch.get_num_threads)
    repeats: int = 5
    warmup: int = 1
    memory: bool = True
    memory_lengths: tuple[int, ...] | None = None
    memory_features: tuple[str, ...] | None = None
    memory_limit: int | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("features", FEATURES), ("backends", PEERS), ("modes", MODES)):
            bad = [x for x in getattr(self, name) if x not in allowed]
            if bad:
                raise ValueError(f"unknown {name} {', '.join(map(repr, bad))}; expected some of {', '.join(allowed)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda'; got {self.device!r}")
        for name in ("threads", "repeats", "batch", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if any(n < 1 for n in (*self.lengths, *self.head_dims)):
            raise ValueError(f"lengths and head dims must be >= 1; got {self.lengths} and {self.head_dims}")

    def measures_memory(self, case: Case) -> bool:
        """Whether the peak memory of ``case`` is to be measured."""
        return (
            self.memory
            and (self.memory_lengths is None or case.length in self.memory_lengths)
            and (self.memory_features is None or case.feature in self.memory_features)
        )

    def cases(self) -> list[Case]:
        """Every case, ordered feature, mode, head dim, length (the order of the report)."""
        return [
            Case(feature, length, head_dim, mode, self.batch, self.heads, self.dtype, self.device)
            for feature in self.features
            for mode in self.modes
            for head_dim in self.head_dims
            for length in self.lengths
        ]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Result:
    """One (case, backend) of the sweep.

    ``status``: ``ok``, ``n/a`` (the backend cannot compute the case), ``skipped`` (estimated to exceed
    the memory) or ``error`` (it raised, e.g. out of memory); ``reason`` says why for all but ``ok``.
    ``runs_on``: the implementation that ran (``auto`` resolves to ``math`` or ``torch``).
    ``ratio_to_torch``: ``median_s`` over the median of ``backend="torch"`` on the same case.
    ``peak_bytes``: peak memory growth of one call in a fresh process (``None`` = not measured).
    """

    case: Case
    backend: str
    status: str = "ok"
    reason: str | None = None
    runs_on: str | None = None
    times_s: list[float] = field(default_factory=list)
    median_s: float | None = None
    gflops: float | None = None
    ratio_to_torch: float | None = None
    estimate_bytes: int | None = None
    peak_bytes: int | None = None
    memory_method: str | None = None
    memory_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        case = data.pop("case")
        derived = {"q_len": self.case.q_len, "kv_len": self.case.kv_len, "flops": self.case.flops}
        return {**case, **derived, **data}


def format_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def available_memory(device: str) -> int:
    """Bytes free for a new allocation: free CUDA memory, else ``MemAvailable`` (or psutil, if /proc is
    missing)."""
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # only where /proc/meminfo is missing

    return int(psutil.virtual_memory().available)


def estimate_bytes(case: Case, impl: str) -> int:
    """A rough peak of one call of ``impl`` (``math``, ``tiled``, ``torch``, ``sdpa``, ``naive``) on ``case``,
    inputs and gradients included; enough to decide what would not fit, not a prediction to trust."""
    item = DTYPES[case.dtype].itemsize
    element = max(item, 4) if impl in ("math", "tiled") else item  # qkv computes half inputs in float32
    scores = case.batch * case.heads * case.q_len * case.kv_len
    io = case.batch * case.heads * (2 * case.q_len + 2 * case.kv_len) * case.head_dim * item
    total = io * (2 if case.backward else 1)
    dropout = case.feature == "dropout"
    # SDPA's fused CPU kernels have no dropout: it falls back to its unfused path.
    fused = impl == "tiled" or (impl in ("torch", "sdpa") and not (dropout and case.device == "cpu"))
    dense = DENSE_COPIES["math" if impl in ("math", "tiled") else "unfused"][case.mode] * scores * element
    if fused:
        total += min(SCRATCH_BYTES * (3 if dropout and impl == "tiled" else 1), dense)
    else:
        total += dense + (DROPOUT_HASH_BYTES * scores if dropout and impl == "math" else 0)
    if impl in ("torch", "sdpa") and case.feature in ("window", "bottom_right"):
        total += case.q_len * case.kv_len  # the dense boolean mask
    if impl == "torch" and case.feature == "alibi":
        total += 2 * (case.heads + 1) * case.q_len * case.kv_len * 4  # distances, bias, masked copy
    if case.feature == "weights":
        total += scores * item  # the returned weights, which even the tiled backend must materialize
    return int(total)


def time_step(step: Callable[[], object], repeats: int, warmup: int, device: str) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``step``, after ``warmup`` untimed calls."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def run_one(case: Case, backend: str, inputs: Inputs, config: BenchConfig, limit: int) -> Result:
    """Time ``backend`` on ``case``, or say why not (``n/a``, ``skipped``, ``error``)."""
    result = Result(case, backend)
    try:
        call = make_call(backend, inputs)
        result.runs_on = runs_on(backend, inputs)
    except Unsupported as e:
        result.status, result.reason = "n/a", str(e)
        return result
    result.estimate_bytes = estimate_bytes(case, result.runs_on)
    if result.estimate_bytes > SAFETY * limit:
        result.status = "skipped"
        result.reason = (
            f"estimated to need ~{format_bytes(result.estimate_bytes)}, over {SAFETY:.0%} of the "
            f"{format_bytes(limit)} available"
        )
        return result
    try:
        result.times_s = time_step(make_step(call, inputs), config.repeats, config.warmup, case.device)
    except (RuntimeError, MemoryError) as e:
        result.status, result.reason = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if case.device == "cuda":
            torch.cuda.empty_cache()
        return result
    result.median_s = statistics.median(result.times_s)
    result.gflops = case.flops / result.median_s / 1e9
    return result


def fill_ratios(results: Sequence[Result]) -> None:
    """Set ``ratio_to_torch`` = median / median of ``backend="torch"`` on the same case, where both ran."""
    baseline = {r.case: r.median_s for r in results if r.backend == "torch" and r.status == "ok"}
    for r in results:
        base = baseline.get(r.case)
        if r.median_s is not None and base:
            r.ratio_to_torch = r.median_s / base


def run_bench(config: BenchConfig, *, progress: bool = True) -> list[Result]:
    """Time every (case, backend) of ``config`` and measure the memory ``config`` asks for; progress bars
    go to stderr."""
    torch.set_num_threads(config.threads)
    limit = config.memory_limit if config.memory_limit is not None else available_memory(config.device)
    cases = config.cases()
    results: list[Result] = []
    with tqdm(
        total=len(cases) * len(config.backends),
        desc="timing",
        unit="run",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for case in cases:
            inputs = make_inputs(case)
            for backend in config.backends:
                bar.set_postfix_str(f"{case.feature} S={case.length} D={case.head_dim} {case.mode} {backend}")
                results.append(run_one(case, backend, inputs, config, limit))
                bar.update()
            del inputs
    fill_ratios(results)
    todo = [r for r in results if r.status == "ok" and config.measures_memory(r.case)]
    if todo:
        with tqdm(
            total=len(todo), desc="memory", unit="run", file=sys.stderr, disable=not progress, dynamic_ncols=True
        ) as bar:
            answers = measure_memory([(r.case, r.backend) for r in todo], config.threads)
            for r, answer in zip(todo, answers, strict=True):
                r.peak_bytes, r.memory_method = answer.get("peak_bytes"), answer.get("method")
                r.memory_error = answer.get("error")
                bar.update()
    return results


# --- memory: the worker process and what it runs ---------------------------------------------------------

WORKER_COMMAND = "import sys; from qkv.bench.runner import worker_main; sys.exit(worker_main())"


def measure_memory(jobs: Sequence[tuple[Case, str]], threads: int) -> Iterator[dict[str, Any]]:
    """Peak memory of each ``(case, backend)``, each in a fresh process; yields one answer per job, in
    order: ``{"peak_bytes": int, "method": str}`` or ``{"error": str}``."""
    if not jobs:
        return
    payload = {"threads": threads, "jobs": [{"case": c.to_json(), "backend": b} for c, b in jobs]}
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # so the worker imports this qkv, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_COMMAND],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(payload))
        proc.stdin.close()
        answered = 0
        for line in proc.stdout:
            answered += 1
            yield json.loads(line)
        proc.wait()
        if answered < len(jobs):
            err.seek(0)
            tail = err.read().strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            for _ in range(len(jobs) - answered):
                yield {"error": f"memory worker failed: {tail[0][:200]}"}


def _status_kib(name: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or ``None`` without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Set ``VmHWM`` to the current RSS (Linux >= 4.0); ``False`` where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def peak_rss_growth(step: Callable[[], object]) -> int | None:
    """How far one call of ``step`` raised this process's peak RSS above its RSS before, in bytes
    (``VmHWM``, reset first); ``None`` where Linux's /proc cannot reset and read the peak."""
    if not _reset_peak_rss():
        return None
    before = (_status_kib("VmRSS") or 0) * 1024
    step()
    return max(0, (_status_kib("VmHWM") or 0) * 1024 - before)


def _ru_maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def measure_peak(case: Case, backend: str, threads: int) -> dict[str, Any]:
    """Peak memory growth of one call (no warm-up) of ``backend`` on ``case``, in this process."""
    torch.set_num_threads(threads)
    inputs = make_inputs(case)
    step = make_step(make_call(backend, inputs), inputs)
    if case.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        return {"peak_bytes": peak, "method": "cuda.max_memory_allocated"}
    rss_peak = peak_rss_growth(step)
    if rss_peak is not None:
        return {"peak_bytes": rss_peak, "method": "VmHWM"}
    before = _ru_maxrss_bytes()
    step()
    return {"peak_bytes": _ru_maxrss_bytes() - before, "method": "ru_maxrss"}


def _measure_in_child(case: Case, backend: str, threads: int) -> dict[str, Any]:
    """:func:`measure_peak` in a forked child of this (torch imported, nothing run) process."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, answer, and leave without running any Python cleanup
        os.close(read_fd)
        try:
            answer = measure_peak(case, backend, threads)
        except BaseException as e:  # the child must always answer and exit, whatever happened
            answer = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        os.write(write_fd, json.dumps(answer).encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if data:
        return json.loads(data)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        hint = " (out of memory?)" if sig == 9 else ""
        return {"error": f"the measuring process was killed by signal {sig}{hint}"}
    return {"error": f"the measuring process exited with status {os.waitstatus_to_exitcode(status)}"}


def preload(jobs: Sequence[tuple[Case, str]]) -> None:
    """Import what torch imports on first use, so that no child's peak counts module imports (tens of MB:
    ``torch.autograd.backward`` with explicit gradients imports sympy; ``causal_lower_right`` imports
    dynamo). Imports only: no tensor operation runs before the fork."""
    import torch.fx.experimental.symbolic_shapes  # noqa: F401

    if any(case.feature == "bottom_right" and backend == "sdpa" for case, backend in jobs):
        import torch.nn.attention.bias  # noqa: F401


def worker_main() -> int:
    """The memory worker (``python -c WORKER_COMMAND``): read
    ``{"threads": n, "jobs": [{"case": {...}, "backend": "math"}, ...]}`` from stdin, print one JSON answer
    line per job, in order."""
    request = json.load(sys.stdin)
    jobs = [(Case.from_json(job["case"]), job["backend"]) for job in request["jobs"]]
    preload(jobs)
    for case, backend in jobs:
        if hasattr(os, "fork"):
            answer = _measure_in_child(case, backend, request["threads"])
        else:  # no fork (Windows): measure in this process; later jobs see the earlier ones' peak
            answer = measure_peak(case, backend, request["threads"])
        print(json.dumps(answer), flush=True)
    return 0


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers depend on: versions, threads, CPU model, device and memory."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "device": device,
        "memory_available_bytes": available_memory(device),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def cpu_model() -> str:
    """The ``model name`` line of ``/proc/cpuinfo``, or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
