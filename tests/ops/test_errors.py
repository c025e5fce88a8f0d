"""Bad input: one case per mistake, checking the exception type and that the message names the argument,
what was given and what was expected.

Mixed devices are simulated with the ``meta`` device, which qkv's checks see as any other device.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

import qkv

from .helpers import make_gen, make_qkv

# q (2, 4, 5, 8), k (2, 2, 7, 8), v (2, 2, 7, 6)
Q, K, V = make_qkv()


def _t(*shape: int, dtype: torch.dtype = torch.float64, device: str = "cpu") -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


# name: (exception type, regex the message must match, kwargs replacing q/k/v or adding arguments)
BAD_INPUTS: dict[str, tuple[type[Exception], str, dict[str, Any]]] = {
    # tensors
    "q_not_tensor": (TypeError, r"q must be a torch\.Tensor; got list", {"q": [[1.0]]}),
    "v_not_tensor": (TypeError, r"v must be a torch\.Tensor; got ndarray", {"v": V.numpy()}),
    "q_int_dtype": (TypeError, r"q must be float16, bfloat16, float32 or float64; got torch\.int64", {"q": Q.long()}),
    "k_bool_dtype": (TypeError, r"k must be float.*; got torch\.bool", {"k": K.bool()}),
    "q_2d": (
        ValueError,
        r"q must have shape \(\.\.\., H, L, D\) with at least 3 dimensions; got \(5, 8\)",
        {"q": Q[0, 0]},
    ),
    "k_ndim": (ValueError, r"k must have as many dimensions as q \(4.*got 3 with shape \(2, 7, 8\)", {"k": K[0]}),
    "v_ndim": (ValueError, r"v must have as many dimensions as q \(4.*got 5", {"v": V[None]}),
    "batch_mismatch": (ValueError, r"k has batch dimensions \(3,\) but q has \(2,\)", {"k": _t(3, 2, 7, 8)}),
    "q_k_dtype": (TypeError, r"k has dtype torch\.float32 but q has torch\.float64", {"k": K.float()}),
    "q_v_dtype": (TypeError, r"v has dtype torch\.float16 but q has torch\.float64", {"v": V.half()}),
    "head_dim": (ValueError, r"k has head dimension D=9 but q has D=8", {"k": _t(2, 2, 7, 9)}),
    "kv_len": (ValueError, r"v has S=6 keys/values but k has S=7", {"v": _t(2, 2, 6, 6)}),
    "v_heads": (ValueError, r"v has 1 heads but k has 2", {"v": _t(2, 1, 7, 6)}),
    "gqa_multiple": (
        ValueError,
        r"q has 4 heads but k has 3; 4 must be a multiple of 3",
        {"k": _t(2, 3, 7, 8), "v": _t(2, 3, 7, 6)},
    ),
    "k_on_meta": (ValueError, r"k is on meta but q is on cpu", {"k": K.to("meta")}),
    "v_on_meta": (ValueError, r"v is on meta but q is on cpu", {"v": V.to("meta")}),
    # mask
    "mask_not_tensor": (TypeError, r"mask must be a torch\.Tensor.*; got list", {"mask": [[True]]}),
    "mask_not_broadcastable": (
        ValueError,
        r"mask of shape \(3, 7\) is not broadcastable to .*\(2, 4, 5, 7\)",
        {"mask": _t(3, 7, dtype=torch.bool)},
    ),
    "mask_too_many_dims": (
        ValueError,
        r"mask of shape \(1, 2, 4, 5, 7\) is not broadcastable",
        {"mask": _t(1, 2, 4, 5, 7)},
    ),
    "mask_float64_for_float32_q": (
        TypeError,
        r"mask has dtype torch\.float64; expected torch\.bool, torch\.float32",
        {"q": Q.float(), "k": K.float(), "v": V.float(), "mask": _t(5, 7)},
    ),
    "mask_bfloat16_for_float16_q": (
        TypeError,
        r"mask has dtype torch\.bfloat16; expected torch\.bool, torch\.float16 \(q's dtype\) or "
        r"torch\.float32",
        {"q": Q.half(), "k": K.half(), "v": V.half(), "mask": _t(5, 7, dtype=torch.bfloat16)},
    ),
    "mask_int": (TypeError, r"mask has dtype torch\.int64; expected torch\.bool", {"mask": _t(5, 7).long()}),
    "mask_on_meta": (
        ValueError,
        r"mask is on meta but q is on cpu",
        {"mask": _t(5, 7, dtype=torch.bool, device="meta")},
    ),
    # key_lengths
    "key_lengths_shape": (
        ValueError,
        r"key_lengths has shape \(3,\); expected the batch shape of q, \(2,\)",
        {"key_lengths": torch.tensor([1, 2, 3])},
    ),
    "key_lengths_2d": (ValueError, r"key_lengths has shape \(2, 1\)", {"key_lengths": torch.tensor([[1], [2]])}),
    "key_lengths_float": (
        TypeError,
        r"key_lengths must be an integer tensor; got dtype torch\.float32",
        {"key_lengths": torch.tensor([1.0, 2.0])},
    ),
    "key_lengths_bool": (
        TypeError,
        r"key_lengths must be an integer tensor; got dtype torch\.bool",
        {"key_lengths": torch.tensor([True, False])},
    ),
    "key_lengths_negative": (
        ValueError,
        r"key_lengths must lie in \[0, S=7\]; got values from -1 to 3",
        {"key_lengths": torch.tensor([-1, 3])},
    ),
    "key_lengths_above_S": (
        ValueError,
        r"key_lengths must lie in \[0, S=7\]; got values from 2 to 8",
        {"key_lengths": torch.tensor([8, 2])},
    ),
    "key_lengths_not_a_tensor": (
        TypeError,
        r"key_lengths must be an integer tensor of shape \(B,\); got 'abc'",
        {"key_lengths": "abc"},
    ),
    "key_lengths_on_meta": (
        ValueError,
        r"key_lengths is on meta but q is on cpu",
        {"key_lengths": torch.tensor([1, 2], device="meta")},
    ),
    # positional options
    "causal_string": (
        ValueError,
        r"causal must be False, True, 'bottom_right' or 'top_left'; got 'bottom'",
        {"causal": "bottom"},
    ),
    "causal_int": (ValueError, r"causal must be .*; got 1", {"causal": 1}),
    "causal_none": (ValueError, r"causal must be .*; got None", {"causal": None}),
    "window_not_pair": (TypeError, r"window must be a pair of ints \(left, right\).*; got \(3,\)", {"window": (3,)}),
    "window_float": (TypeError, r"window must be a pair of ints.*; got \(1\.5, 2\)", {"window": (1.5, 2)}),
    "window_bool": (TypeError, r"window must be a pair of ints.*; got \(True, 2\)", {"window": (True, 2)}),
    "window_int": (TypeError, r"window must be a pair of ints.*; got 4", {"window": 4}),
    "window_below_minus_one": (
        ValueError,
        r"window sides must be >= 0, or -1 for unbounded; got \(-2, 0\)",
        {"window": (-2, 0)},
    ),
    # numbers
    "scale_nan": (ValueError, r"scale must be a finite number; got nan", {"scale": float("nan")}),
    "scale_inf": (ValueError, r"scale must be a finite number; got inf", {"scale": float("inf")}),
    "scale_string": (ValueError, r"scale must be a finite number; got '2'", {"scale": "2"}),
    "softcap_zero": (ValueError, r"softcap must be a positive finite number or None; got 0", {"softcap": 0}),
    "softcap_negative": (ValueError, r"softcap must be a positive finite number or None; got -1\.0", {"softcap": -1.0}),
    "softcap_nan": (
        ValueError,
        r"softcap must be a positive finite number or None; got nan",
        {"softcap": float("nan")},
    ),
    "softcap_bool": (ValueError, r"softcap must be a positive finite number or None; got True", {"softcap": True}),
    "dropout_negative": (ValueError, r"dropout must be a probability in \[0, 1\); got -0\.1", {"dropout": -0.1}),
    "dropout_one": (ValueError, r"dropout must be a probability in \[0, 1\); got 1\.0", {"dropout": 1.0}),
    "dropout_string": (ValueError, r"dropout must be a probability in \[0, 1\); got '0\.1'", {"dropout": "0.1"}),
    # ALiBi
    "alibi_wrong_heads": (
        ValueError,
        r"alibi_slopes has shape \(3,\); expected \(H,\) = \(4,\) or \(\.\.\., H\) = \(2, 4\)",
        {"alibi_slopes": _t(3)},
    ),
    "alibi_wrong_batch": (ValueError, r"alibi_slopes has shape \(3, 4\); expected", {"alibi_slopes": _t(3, 4)}),
    "alibi_3d": (ValueError, r"alibi_slopes has shape \(2, 4, 1\)", {"alibi_slopes": _t(2, 4, 1)}),
    "alibi_int": (
        TypeError,
        r"alibi_slopes must be a float tensor of shape \(H,\) or \(B, H\); got torch\.int64",
        {"alibi_slopes": torch.ones(4, dtype=torch.long)},
    ),
    "alibi_list": (TypeError, r"alibi_slopes must be a float tensor.*; got list", {"alibi_slopes": [0.5] * 4}),
    "alibi_on_meta": (ValueError, r"alibi_slopes is on meta but q is on cpu", {"alibi_slopes": _t(4, device="meta")}),
    # backend
    "backend_unknown": (
        ValueError,
        r"backend must be one of 'auto', 'math', 'torch'.*; got 'flash'",
        {"backend": "flash"},
    ),
    "backend_not_string": (ValueError, r"backend must be one of .*; got None", {"backend": None}),
    "torch_backend_weights": (
        ValueError,
        r"backend='torch' cannot run this call: SDPA does not return the attention weights "
        r"\(return_weights=True\)",
        {"backend": "torch", "return_weights": True},
    ),
    "torch_backend_lse": (
        ValueError,
        r"backend='torch' cannot run this call: SDPA does not return the log-sum-exp",
        {"backend": "torch", "return_lse": True},
    ),
    "torch_backend_softcap": (
        ValueError,
        r"backend='torch' cannot run this call: SDPA has no soft-capping",
        {"backend": "torch", "softcap": 30.0},
    ),
    "torch_backend_generator": (
        ValueError,
        r"backend='torch' cannot run this call: SDPA's dropout cannot take a torch\.Generator",
        {"backend": "torch", "dropout": 0.1, "generator": make_gen(0)},
    ),
}


def _split(kwargs: dict[str, Any]) -> tuple[tuple[Any, Any, Any], dict[str, Any]]:
    rest = dict(kwargs)
    return (rest.pop("q", Q), rest.pop("k", K), rest.pop("v", V)), rest


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_explained(case: tuple[type[Exception], str, dict[str, Any]]) -> None:
    error, pattern, kwargs = case
    (q, k, v), rest = _split(kwargs)
    with pytest.raises(error, match=pattern):
        qkv.attention(q, k, v, **rest)


@pytest.mark.parametrize(
    "name",
    [
        "q_2d",
        "mask_not_broadcastable",
        "key_lengths_negative",
        "alibi_wrong_heads",
        "backend_unknown",
        "torch_backend_softcap",
    ],
)
def test_explain_backend_raises_the_same_errors(name: str) -> None:
    error, pattern, kwargs = BAD_INPUTS[name]
    (q, k, v), rest = _split(kwargs)
    with pytest.raises(error, match=pattern):
        qkv.explain_backend(q, k, v, **rest)


def test_errors_leave_generator_untouched() -> None:
    """Validation comes before the dropout seed is drawn: a failed call does not consume randomness."""
    g = make_gen(0)
    state = g.get_state()
    with pytest.raises(ValueError):
        qkv.attention(Q, K, V, dropout=0.1, generator=g, window=(-3, 0))
    assert torch.equal(g.get_state(), state)


VALID_EDGE_INPUTS: dict[str, Callable[[], Any]] = {
    "key_lengths_list": lambda: qkv.attention(Q, K, V, key_lengths=[7, 0]),
    "key_lengths_int32": lambda: qkv.attention(Q, K, V, key_lengths=torch.tensor([7, 0]).int()),
    "window_list": lambda: qkv.attention(Q, K, V, window=[2, -1]),
    "mask_float32_for_float64_q": lambda: qkv.attention(Q, K, V, mask=_t(5, 7, dtype=torch.float32)),
    "mask_0d": lambda: qkv.attention(Q, K, V, mask=torch.tensor(True)),
    "scale_int": lambda: qkv.attention(Q, K, V, scale=1),
    "softcap_int": lambda: qkv.attention(Q, K, V, softcap=5),
    "alibi_float16": lambda: qkv.attention(Q, K, V, alibi_slopes=torch.ones(4, dtype=torch.float16)),
}


@pytest.mark.parametrize("call", VALID_EDGE_INPUTS.values(), ids=VALID_EDGE_INPUTS.keys())
def test_accepted_edge_inputs(call: Callable[[], Any]) -> None:
    """Inputs the checks must not reject (the docstring allows them)."""
    out = call()
    assert out.shape == (2, 4, 5, 6) and not torch.isnan(out).any()


def test_message_patterns_are_specific() -> None:
    """Every pattern names its argument, so a message about another argument cannot match by accident."""
    arguments = (
        "q",
        "k",
        "v",
        "mask",
        "key_lengths",
        "causal",
        "window",
        "scale",
        "softcap",
        "dropout",
        "alibi_slopes",
        "backend",
    )
    for name, (_, pattern, _) in BAD_INPUTS.items():
        assert any(re.search(rf"(^|[^a-z_]){a}\b", pattern) for a in arguments), name
