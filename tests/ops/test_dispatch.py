"""``qkv.explain_backend``: which backend a call runs on and why, and that ``attention`` agrees."""

from __future__ import annotations

import importlib
import re
from typing import Any

import pytest
import torch

import qkv

from .helpers import make_gen, make_qkv

# ``qkv.ops.attention`` the attribute is the function; the module is needed to spy on the backends.
attention_module = importlib.import_module("qkv.ops.attention")
Q, K, V = make_qkv()

# Calls SDPA's fused kernel computes exactly as qkv defines them: auto must delegate them.
SDPA_CALLS: dict[str, dict[str, Any]] = {
    "plain": {},
    "bool_mask": {"mask": torch.ones(5, 7, dtype=torch.bool)},
    "float_mask": {"mask": torch.zeros(2, 1, 5, 7, dtype=torch.float64)},
    "top_left": {"causal": "top_left"},
    "causal_square": {"q": make_qkv(q_len=7)[0], "causal": True},
    "scale": {"scale": 0.3},
    "generator_without_dropout": {"generator": make_gen(0)},
}

# Calls SDPA cannot compute: auto picks another backend and the reason names the feature.
NOT_SDPA_CALLS: dict[str, tuple[dict[str, Any], str]] = {
    "weights": ({"return_weights": True}, r"weights"),
    "lse": ({"return_lse": True}, r"log-sum-exp"),
    "softcap": ({"softcap": 20.0}, r"soft-capping"),
    "generator": ({"dropout": 0.1, "generator": make_gen(0)}, r"Generator"),
    "softcap_with_masks": ({"softcap": 5.0, "causal": True, "key_lengths": torch.tensor([2, 7])}, r"soft-capping"),
}

# Calls whose auto routing is a performance choice (the dispatch policy may send them anywhere that is
# exact); only the agreement of explain_backend and attention is tested for them.
OTHER_CALLS: dict[str, dict[str, Any]] = {
    "key_lengths": {"key_lengths": torch.tensor([3, 7])},
    "window": {"window": (2, 0)},
    "alibi": {"alibi_slopes": torch.ones(4)},
    "bottom_right_L<S": {"causal": True},
    "dropout_global_rng": {"dropout": 0.1},
    "learned_bias_softcap": {"mask": torch.zeros(5, 7, dtype=torch.float64, requires_grad=True), "softcap": 2.0},
}


def _split(kwargs: dict[str, Any]) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    rest = dict(kwargs)
    return (rest.pop("q", Q), K, V), rest


@pytest.mark.parametrize("kwargs", SDPA_CALLS.values(), ids=SDPA_CALLS.keys())
def test_auto_chooses_torch_when_sdpa_covers_the_call(kwargs: dict[str, Any]) -> None:
    qkv_, rest = _split(kwargs)
    choice = qkv.explain_backend(*qkv_, **rest)
    assert isinstance(choice, qkv.BackendChoice)
    assert choice.backend == "torch"
    assert "SDPA" in choice.reason
    assert str(choice) == f"torch: {choice.reason}"


@pytest.mark.parametrize("case", NOT_SDPA_CALLS.values(), ids=NOT_SDPA_CALLS.keys())
def test_auto_avoids_torch_and_says_why(case: tuple[dict[str, Any], str]) -> None:
    kwargs, feature = case
    choice = qkv.explain_backend(Q, K, V, **kwargs)
    assert choice.backend in qkv.ops.BACKENDS and choice.backend not in ("auto", "torch")
    assert feature in choice.reason
    assert str(choice) == f"{choice.backend}: {choice.reason}"


def test_auto_falls_back_to_math_for_a_learned_bias_sdpa_cannot_take() -> None:
    """Only the reference differentiates with respect to the mask (a learned bias) under soft-capping."""
    mask = torch.zeros(5, 7, dtype=torch.float64, requires_grad=True)
    choice = qkv.explain_backend(Q, K, V, mask=mask, softcap=2.0)
    assert choice.backend == "math" and "soft-capping" in choice.reason


@pytest.mark.parametrize("backend", ["math", "torch"])
def test_explicit_backend_is_reported_as_requested(backend: str) -> None:
    choice = qkv.explain_backend(Q, K, V, causal=True, backend=backend)
    assert choice.backend == backend and "requested" in choice.reason


def test_explicit_math_takes_everything() -> None:
    choice = qkv.explain_backend(Q, K, V, softcap=3.0, return_weights=True, return_lse=True, backend="math")
    assert choice.backend == "math"


def test_known_backends_are_the_documented_ones() -> None:
    """``backend=`` accepts exactly the names ``qkv.attention``'s docstring documents, no more, no fewer."""
    documented = re.findall(r'``"(\w+)"``', (qkv.attention.__doc__ or "").split("backend:")[1])
    assert sorted(documented) == sorted(qkv.ops.BACKENDS)


ALL_CALLS = {**SDPA_CALLS, **{name: kw for name, (kw, _) in NOT_SDPA_CALLS.items()}, **OTHER_CALLS}
BACKEND_FUNCTIONS = {"sdpa_attention": "torch", "math_attention": "math", "tiled_attention": "tiled"}


@pytest.mark.parametrize("kwargs", ALL_CALLS.values(), ids=ALL_CALLS.keys())
def test_attention_runs_the_backend_it_explains(kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    for name, backend in BACKEND_FUNCTIONS.items():
        if not hasattr(attention_module, name):
            assert backend not in qkv.ops.BACKENDS, f"cannot spy on backend {backend!r}"
            continue
        original = getattr(attention_module, name)

        def spy(*args: Any, _original: Any = original, _backend: str = backend, **kw: Any) -> Any:
            ran.append(_backend)
            return _original(*args, **kw)

        monkeypatch.setattr(attention_module, name, spy)
    qkv_, rest = _split(kwargs)
    expected = qkv.explain_backend(*qkv_, **rest).backend
    qkv.attention(*qkv_, **rest)
    assert ran == [expected]
