"""``torch.autograd.gradcheck`` (finite differences, float64) on small calls, and gradients of empty rows."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import qkv

from .helpers import (
    DIFFERENTIABLE_EXTRAS_BACKENDS,
    EVERY_CALL_BACKENDS,
    SDPA_PARITY_BACKENDS,
    make_qkv,
    rand_bool_mask,
    rand_float_mask,
    rand_slopes,
)

SHAPE = {"batch": (2,), "heads": 2, "kv_heads": 1, "q_len": 3, "kv_len": 4, "head_dim": 3, "value_dim": 2}


def _features(name: str) -> dict[str, Any]:
    batch, heads, q_len, kv_len = SHAPE["batch"], SHAPE["heads"], SHAPE["q_len"], SHAPE["kv_len"]
    return {
        "masks": {
            "mask": rand_bool_mask((*batch, 1, q_len, kv_len), 1),
            "key_lengths": torch.tensor([4, 2]),
            "causal": True,
            "window": (2, 0),
        },
        "float_mask_top_left": {"mask": rand_float_mask((q_len, kv_len), 2, neg_inf=0.3), "causal": "top_left"},
        "alibi_window": {"alibi_slopes": rand_slopes((*batch, heads), 3), "window": (1, 1), "scale": 0.8},
        "alibi_softcap": {"alibi_slopes": rand_slopes((heads,), 4), "softcap": 0.7, "causal": True},
        "everything": {
            "mask": rand_float_mask((heads, q_len, kv_len), 5, neg_inf=0.2),
            "key_lengths": torch.tensor([3, 0]),
            "causal": "top_left",
            "window": (-1, 1),
            "alibi_slopes": rand_slopes((heads,), 6),
            "softcap": 2.0,
        },
    }[name]


CASES = ["masks", "float_mask_top_left", "alibi_window", "alibi_softcap", "everything"]
# Every backend with every case it accepts: the torch backend takes no soft-capping.
BACKEND_CASES = [(b, c) for b in EVERY_CALL_BACKENDS for c in CASES] + [
    ("torch", c) for c in CASES if "softcap" not in _features(c)
]


@pytest.mark.parametrize(("backend", "case"), BACKEND_CASES)
def test_gradcheck(backend: str, case: str) -> None:
    q, k, v = make_qkv(**SHAPE, requires_grad=True)
    kw = _features(case)
    assert gradcheck(lambda q, k, v: qkv.attention(q, k, v, backend=backend, **kw), (q, k, v), check_batched_grad=True)


@pytest.mark.parametrize("backend", EVERY_CALL_BACKENDS)
@pytest.mark.parametrize("case", ["masks", "alibi_softcap"])
def test_gradcheck_with_dropout(backend: str, case: str) -> None:
    """Dropout's pattern comes from a seed drawn from the generator: a fresh generator per call makes
    the function deterministic, so finite differences (and batched gradients) apply."""
    q, k, v = make_qkv(**SHAPE, requires_grad=True)
    kw = _features(case)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return qkv.attention(q, k, v, backend=backend, dropout=0.3, generator=torch.Generator().manual_seed(5), **kw)

    assert gradcheck(attend, (q, k, v), check_batched_grad=True)


@pytest.mark.parametrize("backend", DIFFERENTIABLE_EXTRAS_BACKENDS)
def test_gradcheck_weights_and_lse(backend: str) -> None:
    """All three outputs are differentiable (a loss on attention maps, or a z-loss on the lse)."""
    q, k, v = make_qkv(**SHAPE, requires_grad=True)
    kw = _features("masks")
    outputs = qkv.attention(q, k, v, return_weights=True, return_lse=True, backend=backend, **kw)
    # gradcheck skips outputs that do not require grad, so check that first
    assert [t.requires_grad for t in outputs] == [True, True, True]
    assert gradcheck(
        lambda q, k, v: qkv.attention(q, k, v, return_weights=True, return_lse=True, backend=backend, **kw),
        (q, k, v),
        check_batched_grad=True,
    )


@pytest.mark.parametrize("backend", ["math"])
def test_gradgradcheck(backend: str) -> None:
    q, k, v = make_qkv(batch=(1,), heads=2, kv_heads=1, q_len=2, kv_len=3, head_dim=2, value_dim=2, requires_grad=True)
    kw = {"causal": True, "alibi_slopes": rand_slopes((2,), 7), "softcap": 1.5}
    assert gradgradcheck(lambda q, k, v: qkv.attention(q, k, v, backend=backend, **kw), (q, k, v))


@pytest.mark.parametrize("what", ["mask", "alibi_slopes"])
def test_gradcheck_learned_biases(what: str) -> None:
    """Float masks and ALiBi slopes that require grad (a learned relative-position bias) get gradients."""
    q, k, v = make_qkv(**SHAPE)
    bias = {
        "mask": torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64),
        "alibi_slopes": torch.rand(2, generator=torch.Generator().manual_seed(9), dtype=torch.float64),
    }[what].requires_grad_()
    assert gradcheck(lambda b: qkv.attention(q, k, v, backend="math", causal=True, **{what: b}), (bias,))


EMPTY_ROWS = {
    "key_lengths_0": ({"key_lengths": torch.tensor([0, 3])}, (0, slice(None))),
    "bool_mask_row": (
        {"mask": torch.ones(3, 4, dtype=torch.bool).index_fill(0, torch.tensor([1]), False)},
        (slice(None), 1),
    ),
    "float_mask_row": (
        {"mask": torch.zeros(3, 4, dtype=torch.float64).index_fill(0, torch.tensor([2]), float("-inf"))},
        (slice(None), 2),
    ),
    "bottom_right_L>S": ({"causal": True, "q_len": 6}, (slice(None), slice(0, 2))),
}


@pytest.mark.parametrize("backend", SDPA_PARITY_BACKENDS)
@pytest.mark.parametrize("case", EMPTY_ROWS.values(), ids=EMPTY_ROWS.keys())
def test_gradients_of_fully_masked_rows_are_zero(case: tuple, backend: str) -> None:
    kw, (batch_index, rows) = case
    kw = dict(kw)
    shape = {**SHAPE, "q_len": kw.pop("q_len", SHAPE["q_len"])}
    q, k, v = make_qkv(**shape, requires_grad=True)
    out = qkv.attention(q, k, v, backend=backend, **kw)
    (out * torch.randn_like(out)).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    dq_empty = q.grad[batch_index][..., rows, :]
    assert dq_empty.numel() > 0 and torch.equal(dq_empty, torch.zeros_like(dq_empty))
    assert q.grad.abs().sum() > 0, "some rows are not empty and must get a gradient"
