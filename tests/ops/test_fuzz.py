"""The differential fuzz: every backend against the independent reference of ``helpers.py``, on random calls.

Each test id is a seed; :func:`fuzz_cases.draw_case` turns it into a call (shapes with ``L != S``,
``L = 1``, ``S = 1``, odd ``D``, ``Dv != D`` and grouped heads; float64/32, bfloat16, float16; bool and
float masks with rows that allow no key; both causal alignments; windows, ALiBi, soft-capping,
``key_lengths``, dropout; positive, negative, tiny and zero scales; non-contiguous q, k, v). To see or
rerun one case::

    cd tests && python -c "from ops.fuzz_cases import draw_case; print(draw_case(17))"
    pytest tests/ops/test_fuzz.py -k "[17-"

Every explicit backend runs the call unless it documents that it cannot (then it must raise the
``ValueError`` that says why); ``auto`` runs every call. What each returns (out, and the weights and
log-sum-exp when the case asks for them) is compared with the float64 reference on the same (rounded)
inputs, and so are the gradients of q, k, v (and of a float mask or ALiBi slopes that require grad) in
float64/float32 cases, through ``torch.autograd.grad``, once plainly and, in some cases, with
``is_grads_batched=True``. Dropout's pattern is qkv's own: the reference takes it from the ``math``
backend's weights for the same generator seed, so every backend must agree with ``math`` on it and with
the reference on everything else. Rows with no allowed key must be exactly zero in out and weights and
``-inf`` in the log-sum-exp.

The ``triton`` backend runs on CPU only in Triton's interpreter, which is chosen when Triton is first
imported: one child process started with ``TRITON_INTERPRET=1`` computes eight small cases it covers
(float32 with plain and batched gradients, float16; the interpreter mishandles bfloat16), and the tests
here compare what it saved with the same reference.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import qkv

from .fuzz_cases import LAYOUTS, FuzzCase, FuzzInputs, build_inputs, draw_case
from .helpers import make_gen, reference_attention

# Tiny calls are overhead-bound: a second intra-op thread only adds hand-offs on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["math", "torch", "tiled", "auto"]
SEEDS = range(500)
# dtype: (atol, rtol) against the float64 reference, for what is returned and for gradients. atol is
# scaled by a magnitude (at least 1), as rounding errors grow with it: the compared tensor's largest value,
# and for a gradient the largest of all the call's gradients. dq and dk are sums of terms as large as
# dv's (scale·k·(dO·v - dO·out)) that may cancel to 0, e.g. with one key; their rounding errors do not.
TOLERANCES = {
    torch.float64: ((1e-10, 1e-10), (1e-10, 1e-10)),
    torch.float32: ((1e-5, 1e-5), (1e-5, 1e-5)),
    torch.float16: ((2e-3, 2e-3), (4e-3, 4e-3)),
    torch.bfloat16: ((2e-2, 1e-2), (3e-2, 2e-2)),
}


@dataclass(frozen=True)
class Results:
    """What a backend (or the reference, in float64) computed for a case: ``out``, ``weights`` and
    ``lse`` (``None`` when not asked for), the gradients for the case's upstream gradient, and those for
    its two batched upstream gradients, stacked (empty tuples when the case has none)."""

    out: torch.Tensor
    weights: torch.Tensor | None
    lse: torch.Tensor | None
    grads: tuple[torch.Tensor, ...] = ()
    batched_grads: tuple[torch.Tensor, ...] = ()


def expected_refusal(case: FuzzCase, backend: str) -> bool:
    """Whether ``backend`` documents that it cannot run ``case`` (``torch``: no weights, no log-sum-exp,
    no soft-capping, no generator-driven dropout; ``tiled``: no mask or slope gradients; ``triton``: no
    dropout, no mask or slope gradients, no float64)."""
    if backend == "torch":
        return case.return_weights or case.return_lse or case.softcap is not None or case.dropout > 0
    if backend == "tiled":
        return case.mask_requires_grad or case.slopes_requires_grad
    if backend == "triton":
        return case.dtype == torch.float64 or case.dropout > 0 or case.mask_requires_grad or case.slopes_requires_grad
    return False


def _call(
    case: FuzzCase, inputs: FuzzInputs, backend: str, *, return_weights: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``qkv.attention`` on the case: ``(out, weights or None, lse or None)``."""
    weights = case.return_weights if return_weights is None else return_weights
    result = qkv.attention(
        inputs.q,
        inputs.k,
        inputs.v,
        **inputs.kwargs,
        dropout=case.dropout,
        generator=make_gen(case.seed) if case.dropout > 0 else None,
        return_weights=weights,
        return_lse=case.return_lse,
        backend=backend,
    )
    if isinstance(result, torch.Tensor):
        return result, None, None
    out, *extras = result
    return out, extras[0] if weights else None, extras[-1] if case.return_lse else None


def _differentiated(case: FuzzCase, inputs: FuzzInputs) -> tuple[torch.Tensor, ...]:
    """The tensors whose gradients are compared: q, k, v, then the float mask and slopes if they require grad."""
    extras = tuple(
        inputs.kwargs[name]
        for name, flag in (("mask", case.mask_requires_grad), ("alibi_slopes", case.slopes_requires_grad))
        if flag
    )
    return (inputs.q, inputs.k, inputs.v, *extras)


def _grad_names(case: FuzzCase) -> list[str]:
    return [
        "dq",
        "dk",
        "dv",
        *(["dmask"] if case.mask_requires_grad else []),
        *(["dslopes"] if case.slopes_requires_grad else []),
    ]


def _upstreams(case: FuzzCase, out_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The upstream gradient of out and, for batched cases, two more stacked: in the case's dtype."""
    g = make_gen(case.seed + 1)
    upstream = torch.randn(out_shape, generator=g, dtype=torch.float64).to(case.dtype)
    if not case.batched_grads:
        return upstream, None
    return upstream, torch.randn((2, *out_shape), generator=g, dtype=torch.float64).to(case.dtype)


def _grads(
    out: torch.Tensor, inputs: tuple[torch.Tensor, ...], upstream: torch.Tensor, batched: bool = False
) -> tuple[torch.Tensor, ...]:
    """Gradients of ``<out, upstream>`` (zeros for an input that gets none); ``batched``: one per
    slice of ``upstream``, through ``is_grads_batched``."""
    if not out.requires_grad:
        got: tuple[torch.Tensor | None, ...] = (None,) * len(inputs)
    else:
        got = torch.autograd.grad(out, inputs, upstream, allow_unused=True, retain_graph=True, is_grads_batched=batched)
    lead = upstream.shape[:1] if batched else ()
    return tuple(x.new_zeros(*lead, *x.shape) if g is None else g.detach() for g, x in zip(got, inputs, strict=True))


def _run(case: FuzzCase, inputs: FuzzInputs, backend: str) -> Results:
    """``backend``'s results on the case, gradients included when the case compares them."""
    out, weights, lse = _call(case, inputs, backend)
    weights, lse = (None if t is None else t.detach() for t in (weights, lse))
    if not case.grads:
        return Results(out.detach(), weights, lse)
    differentiated = _differentiated(case, inputs)
    upstream, batched_upstream = _upstreams(case, tuple(out.shape))
    grads = _grads(out, differentiated, upstream)
    batched = () if batched_upstream is None else _grads(out, differentiated, batched_upstream, batched=True)
    return Results(out.detach(), weights, lse, grads, batched)


@functools.cache
def _prepared(seed: int) -> tuple[FuzzCase, FuzzInputs, Results]:
    """The case of ``seed``, its inputs and the reference's results (computed once for every backend)."""
    case = draw_case(seed)
    inputs = build_inputs(case)
    keep: torch.Tensor | None = None
    if case.dropout > 0:
        with torch.no_grad():
            math_weights = _call(case, inputs, "math", return_weights=True)[1]
        assert math_weights is not None
        keep = math_weights != 0
    ref_qkv = tuple(t.detach().double().requires_grad_(case.grads) for t in (inputs.q, inputs.k, inputs.v))
    out, weights, lse = reference_attention(*ref_qkv, dropout=case.dropout, keep=keep, **inputs.kwargs)
    if not case.grads:
        return case, inputs, Results(out.detach(), weights.detach(), lse.detach())
    differentiated = (*ref_qkv, *_differentiated(case, inputs)[3:])
    upstream, batched_upstream = _upstreams(case, tuple(out.shape))
    grads = _grads(out, differentiated, upstream.double())
    batched: tuple[torch.Tensor, ...] = ()
    if batched_upstream is not None:
        per_slice = [_grads(out, differentiated, u.double()) for u in batched_upstream]
        batched = tuple(torch.stack(slices) for slices in zip(*per_slice, strict=True))
    return case, inputs, Results(out.detach(), weights.detach(), lse.detach(), grads, batched)


def _magnitude(*tensors: torch.Tensor) -> float:
    """The largest finite absolute value among ``tensors``, at least 1."""
    finite = [t[torch.isfinite(t)] for t in tensors]
    return max([1.0, *(float(t.abs().max()) for t in finite if t.numel())])


def _assert_close(
    got: torch.Tensor,
    want: torch.Tensor,
    tol: tuple[float, float],
    what: str,
    case: FuzzCase,
    magnitude: float | None = None,
) -> None:
    """``got`` within ``atol·magnitude + rtol·|want|`` of ``want``; ``magnitude`` defaults to want's."""
    atol, rtol = tol
    magnitude = _magnitude(want) if magnitude is None else magnitude
    torch.testing.assert_close(
        got.double(),
        want,
        atol=atol * magnitude,
        rtol=rtol,
        msg=lambda default: f"{what} differs from the reference for {case}\n{default}",
    )


def _check(case: FuzzCase, got: Results, want: Results) -> None:
    """``got`` against the reference: values, rows with no allowed key, gradients."""
    forward_tol, grad_tol = TOLERANCES[case.dtype]
    assert want.weights is not None and want.lse is not None
    assert got.out.dtype == case.dtype and got.out.shape == want.out.shape, f"out: {got.out.dtype} {got.out.shape}"
    _assert_close(got.out, want.out, forward_tol, "out", case)
    assert (got.weights is not None) == case.return_weights and (got.lse is not None) == case.return_lse
    if got.weights is not None:
        _assert_close(got.weights, want.weights, forward_tol, "weights", case)
    if got.lse is not None:
        _assert_close(got.lse, want.lse, forward_tol, "lse", case)

    no_key = torch.isneginf(want.lse)
    assert torch.equal(got.out[no_key], torch.zeros_like(got.out[no_key])), f"rows with no key: out not 0, {case}"
    if got.weights is not None:
        assert torch.equal(got.weights[no_key], torch.zeros_like(got.weights[no_key])), f"weights not 0, {case}"
    if got.lse is not None:
        assert torch.isneginf(got.lse[no_key]).all(), f"rows with no allowed key: lse not -inf, {case}"

    names = _grad_names(case) if case.grads else []
    magnitude = _magnitude(*want.grads)
    for name, g, expected in zip(names, got.grads, want.grads, strict=True):
        _assert_close(g, expected, grad_tol, name, case, magnitude)
    magnitude = _magnitude(*want.batched_grads)
    for name, g, expected in zip(
        names if case.batched_grads else [], got.batched_grads, want.batched_grads, strict=True
    ):
        _assert_close(g, expected, grad_tol, f"{name} (is_grads_batched)", case, magnitude)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", SEEDS, ids=str)
def test_backend_matches_reference(seed: int, backend: str) -> None:
    case, inputs, want = _prepared(seed)
    if expected_refusal(case, backend):
        with pytest.raises(ValueError, match=rf"^backend='{backend}' cannot run this call: \S.*; use "):
            _call(case, inputs, backend)
        return
    _check(case, _run(case, inputs, backend), want)


Corner = Callable[[FuzzCase, Results], bool]


def _field_is(field: str, value: object) -> Corner:
    return lambda c, r: bool(getattr(c, field) == value)


def _has_row_without_key(r: Results) -> bool:
    return r.lse is not None and bool(torch.isneginf(r.lse).any())


def _layout_used(layout: str) -> Corner:
    return lambda c, r: layout in c.layouts


# What the sweep must reach, as predicates of a case and of its reference results.
CORNERS: dict[str, Corner] = {
    **{f"dtype {d}": _field_is("dtype", d) for d in TOLERANCES},
    **{f"layout {name}": _layout_used(name) for name in LAYOUTS},
    **{f"causal={a!r}": _field_is("causal", a) for a in (True, "bottom_right", "top_left")},
    "L = 1": lambda c, r: c.q_len == 1,
    "S = 1": lambda c, r: c.kv_len == 1,
    "L < S, causal": lambda c, r: c.q_len < c.kv_len and c.causal is not False,
    "L > S, causal": lambda c, r: c.q_len > c.kv_len and c.causal is not False,
    "odd D": lambda c, r: c.head_dim % 2 == 1,
    "Dv != D": lambda c, r: c.value_dim != c.head_dim,
    "grouped heads": lambda c, r: c.kv_heads > 1 and c.heads > c.kv_heads,
    "multi-query": lambda c, r: c.kv_heads == 1 and c.heads > 1,
    "no batch dims": lambda c, r: c.batch == (),
    "two batch dims": lambda c, r: len(c.batch) == 2,
    "bool mask, rows with no key": lambda c, r: c.mask == "bool" and _has_row_without_key(r),
    "float mask, rows with no key": lambda c, r: c.mask == "float" and _has_row_without_key(r),
    "float32 mask, half inputs": lambda c, r: c.mask_dtype == torch.float32 and c.dtype.itemsize == 2,
    "key_lengths": lambda c, r: c.key_lengths,
    "window": lambda c, r: c.window is not None,
    "ALiBi (H,)": lambda c, r: c.alibi == "H",
    "ALiBi (..., H)": lambda c, r: c.alibi == "batch_H",
    "softcap": lambda c, r: c.softcap is not None,
    "dropout with gradients": lambda c, r: c.dropout > 0 and c.grads,
    "negative scale, causal": lambda c, r: c.scale is not None and c.scale < 0 and c.causal is not False,
    "negative scale, top-left causal alone": lambda c, r: (
        c.scale is not None
        and c.scale < 0
        and c.causal == "top_left"
        and c.value_dim == c.head_dim
        and (c.mask, c.alibi, c.key_lengths, c.window, c.softcap, c.dropout) == ("none", "none", False, None, None, 0)
        and not (c.return_weights or c.return_lse)
    ),
    "tiny scale": lambda c, r: c.scale is not None and 0 < abs(c.scale) < 1e-5,
    "zero scale": lambda c, r: c.scale == 0.0,
    "weights and lse": lambda c, r: c.return_weights and c.return_lse,
    "mask gradient": lambda c, r: c.mask_requires_grad,
    "slopes gradient": lambda c, r: c.slopes_requires_grad,
    "batched gradients": lambda c, r: c.batched_grads,
    "several query blocks": lambda c, r: c.q_len > 256,
}


def test_the_sweep_reaches_every_corner() -> None:
    """A change to the generator that stops drawing one of the cases the fuzz exists for fails here."""
    prepared = [_prepared(seed) for seed in SEEDS]
    missing = [name for name, reached in CORNERS.items() if not any(reached(c, r) for c, _, r in prepared)]
    assert not missing, f"no seed in {SEEDS} draws: {', '.join(missing)}"


def test_auto_picks_each_cpu_backend_somewhere_in_the_sweep() -> None:
    """``auto`` is compared with the reference on whatever it picks: the sweep must make it pick each."""
    picks = {
        qkv.explain_backend(
            inputs.q,
            inputs.k,
            inputs.v,
            **inputs.kwargs,
            dropout=case.dropout,
            generator=make_gen(case.seed) if case.dropout > 0 else None,
            return_weights=case.return_weights,
            return_lse=case.return_lse,
        ).backend
        for case, inputs, _ in map(_prepared, SEEDS)
    }
    assert picks == {"math", "torch", "tiled"}


# --- triton, in Triton's interpreter -------------------------------------------------------------------------


def _triton_seeds() -> list[int]:
    """A few small seeds the interpreter covers (float32/float16: it mishandles bfloat16), chosen so that
    they include plain and batched gradients and float16."""
    small = [
        c
        for c in map(draw_case, SEEDS)
        if not expected_refusal(c, "triton") and c.dtype != torch.bfloat16 and c.q_len * c.kv_len <= 1024
    ]
    chosen = {
        *[c.seed for c in small if c.batched_grads][:2],
        *[c.seed for c in small if c.grads][:3],
        *[c.seed for c in small if c.dtype == torch.float16][:3],
    }
    return sorted(chosen)


# The interpreter runs every block operation in NumPy: only small cases, and only a few.
TRITON_SEEDS = _triton_seeds()


def triton_worker(path: str, seeds: list[int]) -> None:
    """In a child with ``TRITON_INTERPRET=1``: the triton backend's :class:`Results` of each seed (or the
    traceback of its failure), saved to ``path`` with ``torch.save``."""
    results: dict[int, Results | str] = {}
    for seed in seeds:
        case = draw_case(seed)
        try:
            results[seed] = _run(case, build_inputs(case), "triton")
        except Exception:
            results[seed] = traceback.format_exc()
    torch.save({s: r if isinstance(r, str) else vars(r) for s, r in results.items()}, path)


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, object] | str]:
    """Run :func:`triton_worker` on :data:`TRITON_SEEDS` in one interpreter child; what it saved."""
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("fuzz_triton") / "results.pt"
    tests_dir = Path(__file__).resolve().parents[1]
    code = (
        f"import sys; sys.path.insert(0, {str(tests_dir)!r}); from ops.test_fuzz import triton_worker; "
        f"triton_worker({str(path)!r}, {TRITON_SEEDS!r})"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"triton interpreter worker failed:\n{proc.stderr[-5000:]}"
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("seed", TRITON_SEEDS, ids=str)
def test_triton_matches_reference(seed: int, triton_results: dict[int, dict[str, object] | str]) -> None:
    case, _, want = _prepared(seed)
    got = triton_results[seed]
    assert not isinstance(got, str), f"triton failed on {case}:\n{got}"
    _check(case, Results(**got), want)  # type: ignore[arg-type]
