"""The tiled backend against the reference, with blocks small enough that every call spans many of them.

Both block kernels run: ``fused`` (PyTorch's CPU flash kernel per block, merged by log-sum-exp) and
``online`` (online softmax in plain PyTorch ops), on every reference case, forward (output, weights,
log-sum-exp) and backward, across block boundaries that do not divide the lengths.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qkv
import qkv.ops.blocks as blocks
import qkv.ops.tiled_fused as tiled_fused
from qkv.ops.dropout import draw_seed
from qkv.ops.spec import build_spec
from qkv.ops.tiled import tiled_attention, tiled_kernel
from qkv.ops.tiled_fused import fused_unsupported_reason

from .helpers import REFERENCE_CASES, Call, assert_close, grads, make_gen, make_qkv, reference_attention

CASE_IDS = [c.name for c in REFERENCE_CASES]
LONG = Call("long", batch=(2,), heads=4, kv_heads=2, q_len=37, kv_len=53, head_dim=8, value_dim=8)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few rows and columns, so that lengths like 5, 7, 37, 53 cross several boundaries."""
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 4 * 3 * 4)
    monkeypatch.setattr(blocks, "MAX_BLOCK_K", 3)
    monkeypatch.setattr(tiled_fused, "MASK_BLOCK_ELEMENTS", 2 * 3)
    monkeypatch.setattr(tiled_fused, "MIN_BLOCK_Q", 2)
    monkeypatch.setattr(tiled_fused, "MAX_BLOCK_Q", 2)


def _run(case: Call, kernel: str, dtype: torch.dtype = torch.float64, seed: int | None = None):
    q, k, v = case.tensors(dtype, requires_grad=True)
    kwargs = case.kwargs(dtype)
    spec = build_spec(q, k, v, **kwargs)
    out, weights, lse = tiled_attention(q, k, v, spec, seed, return_weights=True, kernel=kernel)
    return (q, k, v), kwargs, out, weights, lse


def _kernels(case: Call) -> list[str]:
    q, k, v = case.tensors()
    fused_ok = fused_unsupported_reason(build_spec(q, k, v, **case.kwargs()), q.device) is None
    return ["online", "fused"] if fused_ok else ["online"]


@pytest.mark.parametrize("case", [*REFERENCE_CASES, LONG], ids=[*CASE_IDS, "long"])
def test_tiled_equals_reference_in_every_kernel(case: Call) -> None:
    for kernel in _kernels(case):
        inputs, kwargs, out, weights, lse = _run(case, kernel)
        ref_out, ref_weights, ref_lse = reference_attention(*inputs, **kwargs)
        msg = f"{case.name} / {kernel}"
        assert_close(out, ref_out, torch.float64, msg)
        assert_close(weights, ref_weights, torch.float64, msg)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), msg
        assert_close(lse.nan_to_num(neginf=0.0), ref_lse.nan_to_num(neginf=0.0), torch.float64, msg)
        for got, want in zip(grads(out, inputs), grads(ref_out, inputs), strict=True):
            assert_close(got, want, torch.float64, msg)


def test_fused_kernel_covers_dv_equal_d_and_online_the_rest() -> None:
    q, k, v = make_qkv(value_dim=8)
    assert tiled_kernel(build_spec(q, k, v), q.device) == "fused"
    assert tiled_kernel(build_spec(q, k, v, softcap=2.0), q.device) == "online"
    assert tiled_kernel(build_spec(q, k, v, dropout=0.1), q.device) == "online"
    q, k, v = make_qkv(value_dim=6)
    assert "Dv == D" in str(fused_unsupported_reason(build_spec(q, k, v), q.device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tiled_half_and_single_precision_match_math(dtype: torch.dtype) -> None:
    for kernel in _kernels(LONG):
        inputs, kwargs, out, _, _ = _run(LONG, kernel, dtype)
        expected = qkv.attention(*inputs, backend="math", **kwargs)
        assert out.dtype == dtype
        # Both compute in float32; what differs is the order of sums, then one rounding to dtype.
        atol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
        torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=atol)


def test_dropout_is_reproducible_and_equals_math_forward_and_backward() -> None:
    q, k, v = LONG.tensors(requires_grad=True)
    results = []
    for backend in ("tiled", "tiled", "math"):
        out, weights = qkv.attention(
            q, k, v, dropout=0.3, generator=make_gen(5), return_weights=True, backend=backend, causal=True
        )
        results.append((out, weights, *grads(out, (q, k, v))))
    for a, b in zip(results[0], results[1], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(results[0], results[2], strict=True):
        assert_close(a, b, torch.float64)
    other = qkv.attention(q, k, v, dropout=0.3, generator=make_gen(6), backend="tiled", causal=True)
    assert not torch.allclose(other, results[0][0])


@pytest.mark.parametrize("source", ["generator", "global_rng"])
def test_seed_is_drawn_once_per_call(source: str) -> None:
    """A dropout call advances its RNG exactly as one ``draw_seed`` does, in the forward only; the backward
    draws nothing and reuses the forward's keep pattern (the zeros of the returned weights)."""
    p = 0.3
    q, k, v = LONG.tensors(requires_grad=True)
    generator = make_gen(1) if source == "generator" else None
    torch.manual_seed(1)
    rng = generator if generator is not None else torch.default_generator
    start = rng.get_state()
    draw_seed(generator)
    after_one_draw = rng.get_state()
    rng.set_state(start)

    out, weights = qkv.attention(
        q, k, v, dropout=p, generator=generator, return_weights=True, backend="tiled", causal=True
    )
    assert torch.equal(rng.get_state(), after_one_draw), "the forward must draw exactly one seed"
    got = grads(out, (q, k, v))
    assert torch.equal(rng.get_state(), after_one_draw), "the backward must not draw"
    ref_out, _, _ = reference_attention(q, k, v, dropout=p, keep=weights != 0, causal=True)
    assert_close(out, ref_out, torch.float64)
    for got_grad, want in zip(got, grads(ref_out, (q, k, v)), strict=True):
        assert_close(got_grad, want, torch.float64)


def test_attention_weights_recomputes_any_slice_from_lse() -> None:
    q, k, v = LONG.tensors()
    slopes = torch.rand(LONG.heads, dtype=torch.float64)
    features = {"causal": True, "window": (9, -1), "alibi_slopes": slopes, "key_lengths": torch.tensor([53, 20])}
    _, weights, lse = qkv.attention(q, k, v, return_weights=True, return_lse=True, backend="math", **features)
    part = qkv.attention_weights(q, k, lse, rows=(5, 29), heads=[3, 0], **features)
    assert part.shape == (2, 2, 24, LONG.kv_len)
    assert_close(part, weights[:, [3, 0], 5:29], torch.float64)
    assert_close(qkv.attention_weights(q, k, lse, heads=slice(1, 3), **features), weights[:, 1:3], torch.float64)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"rows": (3, 99)}, "rows must be"),
        ({"heads": [7]}, "heads must select"),
        ({"lse": torch.zeros(3)}, "lse must have shape"),
    ],
)
def test_attention_weights_bad_input(kwargs: dict, pattern: str) -> None:
    q, k, _ = LONG.tensors()
    lse = kwargs.pop("lse", torch.zeros(2, LONG.heads, LONG.q_len, dtype=torch.float64))
    with pytest.raises(ValueError, match=pattern):
        qkv.attention_weights(q, k, lse, **kwargs)


PEAK_SCRIPT = """
import sys, torch, qkv
torch.set_num_threads(1)
backend, kernel = sys.argv[1], sys.argv[2]
heads, length, dim = 4, 2048, 32
q, k, v = (torch.randn(1, heads, length, dim, requires_grad=True) for _ in range(3))
features = {"alibi_slopes": torch.rand(heads), "causal": True}
if kernel == "online":
    features["softcap"] = 30.0
from qkv.ops.spec import build_spec
from qkv.ops.tiled import tiled_kernel
assert tiled_kernel(build_spec(q, k, v, **features), q.device) == kernel
qkv.attention(q[..., :64, :], k[..., :64, :], v[..., :64, :], backend=backend, **features).sum().backward()
def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")
before = kib("VmRSS")
qkv.attention(q, k, v, backend=backend, **features).sum().backward()
print((kib("VmHWM") - before) * 1024)
"""


def _peak_extra_bytes(backend: str, kernel: str) -> int:
    """Peak resident-memory growth of one forward+backward at L = S = 2048, in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, backend, kernel], capture_output=True, text=True, timeout=300, check=True
    )
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read peak RSS")
@pytest.mark.parametrize("kernel", ["fused", "online"])
def test_tiled_allocates_far_less_than_the_score_matrix(kernel: str) -> None:
    score_bytes = 4 * 2048 * 2048 * 4
    tiled_peak = _peak_extra_bytes("tiled", kernel)
    math_peak = _peak_extra_bytes("math", kernel)
    # The measurement sees the materialized path (several L·S score matrices)...
    assert math_peak > 4 * score_bytes, (math_peak, score_bytes)
    # ...and the tiled path stays below one: its scratch is a few bounded blocks, whatever the length.
    assert tiled_peak < score_bytes and tiled_peak < math_peak / 6, (tiled_peak, math_peak, score_bytes)


# --- batched gradients and torch.func ---------------------------------------------------------------------

VMAP_FEATURES = {
    "fused_causal": {"causal": True},
    "fused_window_lengths": {"window": (3, 2), "key_lengths": torch.tensor([5, 9])},
    "online_softcap": {"softcap": 2.0, "causal": "top_left"},
}


@pytest.mark.parametrize("features", VMAP_FEATURES.values(), ids=VMAP_FEATURES.keys())
def test_batched_gradients_equal_one_at_a_time(features: dict) -> None:
    """``is_grads_batched=True`` (what ``gradcheck(check_batched_grad=True)`` and Jacobians use) once
    raised ``Batching rule not implemented for aten::alias`` on the tiled backward."""
    q, k, v = make_qkv(batch=(2,), heads=2, kv_heads=1, q_len=9, kv_len=9, head_dim=4, value_dim=4, requires_grad=True)
    out = qkv.attention(q, k, v, backend="tiled", **features)
    upstream = torch.randn(3, *out.shape, generator=make_gen(4), dtype=torch.float64)
    batched = torch.autograd.grad(out, (q, k, v), upstream, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        single = torch.autograd.grad(out, (q, k, v), upstream[i], retain_graph=True)
        for got, want in zip(batched, single, strict=True):
            torch.testing.assert_close(got[i], want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("features", VMAP_FEATURES.values(), ids=VMAP_FEATURES.keys())
def test_vmap_and_jacobian_match_math(features: dict) -> None:
    q, k, v = make_qkv(batch=(2,), heads=2, kv_heads=1, q_len=9, kv_len=9, head_dim=4, value_dim=4)
    qs, ks, vs = (torch.stack([t, t.flip(-2), 2 * t]) for t in (q, k, v))

    def tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return qkv.attention(q, k, v, backend="tiled", **features)

    def math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return qkv.attention(q, k, v, backend="math", **features)

    torch.testing.assert_close(torch.func.vmap(tiled)(qs, ks, vs), torch.func.vmap(math)(qs, ks, vs))
    torch.testing.assert_close(
        torch.func.vmap(tiled, in_dims=(0, None, None))(qs, k, v), torch.stack([math(x, k, v) for x in qs])
    )
    for argnum in range(3):
        torch.testing.assert_close(
            torch.func.jacrev(tiled, argnums=argnum)(q, k, v), torch.func.jacrev(math, argnums=argnum)(q, k, v)
        )


def test_double_backward_is_refused_clearly() -> None:
    q, k, v = make_qkv(batch=(1,), heads=1, kv_heads=1, q_len=4, kv_len=4, head_dim=2, value_dim=2, requires_grad=True)
    out = qkv.attention(q, k, v, backend="tiled", causal=True)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only.*backend='math'"):
        dq.sum().backward()
