"""Validation of an attention call into an :class:`AttentionSpec` every backend reads.

Everything a backend needs to know about a call, checked once: shapes, dtypes, devices, the masks
and their alignment. Errors name the argument, what was given and what was expected.

Conventions (shared by every backend):

* ``q: (..., H, L, D)``, ``k: (..., Hkv, S, D)``, ``v: (..., Hkv, S, Dv)``; ``H`` a multiple of ``Hkv``
  (query head ``h`` reads key/value head ``h // (H // Hkv)``, as SDPA's ``enable_gqa``).
* The *diagonal* of the score matrix is where query ``i`` meets key ``i + offset``. ``offset = S - L``
  (bottom-right, FlashAttention's and a KV-cached decoder's alignment) unless ``causal="top_left"``,
  where ``offset = 0`` (SDPA's ``is_causal``). Causal masking, sliding windows and ALiBi distances are
  all measured from that diagonal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeGuard

import torch

from qkv.checks import finite_number, positive_number, probability

HALF_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionSpec:
    """A validated attention call. Tensors keep the caller's layout; nothing is expanded.

    Attributes:
        batch_shape: the leading ``...`` dimensions shared by q, k and v.
        heads, kv_heads: ``H`` and ``Hkv``.
        q_len, kv_len: ``L`` and ``S``.
        head_dim, value_dim: ``D`` and ``Dv``.
        scale: multiplier of ``q·k`` (default ``1/sqrt(D)``).
        causal: whether keys after the diagonal are masked.
        offset: the key index of query 0's diagonal (see module docstring).
        window_left, window_right: sliding-window reach from the diagonal; ``None`` = unbounded.
        mask: the user's mask, boolean (``True`` = may attend) or float (added to the scores), with
            ``ndim == q.ndim`` after left-padding with size-1 dimensions, broadcastable to
            ``(..., H, L, S)``.
        key_lengths: ``batch_shape`` integer tensor of valid key counts, or ``None``.
        alibi_slopes: ``(... or 1s, H, 1, 1)``, or ``None``.
        softcap: ``c`` in ``c·tanh(scores/c)``, or ``None``.
        dropout: probability of dropping a weight.
    """

    batch_shape: tuple[int, ...]
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    scale: float
    causal: bool
    offset: int
    window_left: int | None
    window_right: int | None
    mask: torch.Tensor | None
    key_lengths: torch.Tensor | None
    alibi_slopes: torch.Tensor | None
    softcap: float | None
    dropout: float

    @property
    def groups(self) -> int:
        """Query heads per key/value head, ``H // Hkv``."""
        return self.heads // self.kv_heads

    @property
    def has_positional_mask(self) -> bool:
        """Whether causal or window masking depends only on (row, column) positions."""
        return self.causal or self.window_left is not None or self.window_right is not None

    @property
    def score_shape(self) -> tuple[int, ...]:
        """``(..., H, L, S)``."""
        return (*self.batch_shape, self.heads, self.q_len, self.kv_len)

    @property
    def batch_size(self) -> int:
        """The product of the batch dimensions."""
        return math.prod(self.batch_shape)

    @property
    def is_empty(self) -> bool:
        """Whether some dimension of the call is 0 (nothing to compute block by block)."""
        return 0 in (*self.batch_shape, self.heads, self.q_len, self.kv_len, self.head_dim, self.value_dim)

    @property
    def top_left_causal(self) -> bool:
        """Causal from the top-left corner and no window: what fused kernels call ``is_causal``."""
        return self.causal and self.offset == 0 and self.window_left is None and self.window_right is None

    @property
    def only_top_left_causal(self) -> bool:
        """:attr:`top_left_causal` with no other mask or bias: ``is_causal=True`` is the whole call."""
        return self.top_left_causal and self.mask is None and self.key_lengths is None and self.alibi_slopes is None


def flatten_batch(t: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """A ``(..., X, Y, Z)`` tensor of the call (or broadcastable to it, like a mask) as the 4-D
    ``(B|1, X, Y, Z)`` that fused kernels take; a view when the layout allows."""
    if t.ndim == 4 and len(spec.batch_shape) == 1 and t.shape[0] in (1, spec.batch_shape[0]):
        return t  # already (B|1, X, Y, Z): no view op (each one is an autograd node on every call)
    t = t.reshape((1,) * (len(spec.batch_shape) + 3 - t.ndim) + tuple(t.shape))
    lead = tuple(t.shape[:-3])
    if all(n == 1 for n in lead):
        return t.reshape(1, *t.shape[-3:])
    if lead != spec.batch_shape:
        t = t.expand(*spec.batch_shape, *t.shape[-3:])
    return t.reshape(spec.batch_size, *t.shape[-3:])


def is_integer_tensor(x: object) -> TypeGuard[torch.Tensor]:
    """Whether ``x`` is a tensor of an integer dtype (not floating point, complex or bool)."""
    return isinstance(x, torch.Tensor) and not (x.dtype.is_floating_point or x.is_complex() or x.dtype == torch.bool)


def check_values_between(name: str, values: torch.Tensor, low: int, high: int, expected: str) -> None:
    """Raise ``ValueError`` unless every value of the integer tensor ``values`` lies in ``[low, high]``.

    Reading values on the host synchronizes with an accelerator, which a check run at every decoding step
    must not do. So the values are read only on CPU, where the error names the smallest and largest one:
    ``"{name} must lie in {expected}; got values from {lo} to {hi}"``. On CUDA the check is queued on the
    device (``torch._assert_async``): a bad value stops the program with a device-side assertion at a later
    synchronization. On ``meta`` the same call is shape-only; other devices are not checked.
    """
    if not values.numel():
        return
    device = values.device.type
    if device == "cpu":
        lo, hi = int(values.min()), int(values.max())
        if lo < low or hi > high:
            raise ValueError(f"{name} must lie in {expected}; got values from {lo} to {hi}")
    elif device in ("cuda", "meta"):
        torch._assert_async(((values >= low) & (values <= high)).all(), f"{name} must lie in {expected}")


def _shape(t: torch.Tensor | Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in t) + ")" if len(t) != 1 else f"({t[0]},)"


def _check_qkv(q: object, k: object, v: object) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {t.dtype}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    if q.ndim < 3:
        raise ValueError(f"q must have shape (..., H, L, D) with at least 3 dimensions; got {_shape(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.ndim != q.ndim:
            raise ValueError(
                f"{name} must have as many dimensions as q ({q.ndim}: (..., H, L, D)); "
                f"got {t.ndim} with shape {_shape(t.shape)}"
            )
        if t.shape[:-3] != q.shape[:-3]:
            raise ValueError(
                f"{name} has batch dimensions {_shape(t.shape[:-3])} but q has {_shape(q.shape[:-3])}; "
                "they must be equal"
            )
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; they must be on one device")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k has head dimension D={k.shape[-1]} but q has D={q.shape[-1]}; q·k needs them equal")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v has S={v.shape[-2]} keys/values but k has S={k.shape[-2]}; they must be equal")
    if v.shape[-3] != k.shape[-3]:
        raise ValueError(f"v has {v.shape[-3]} heads but k has {k.shape[-3]}; they must be equal")
    h, hkv = q.shape[-3], k.shape[-3]
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"q has {h} heads but k has {hkv}; {h} must be a multiple of {hkv} (grouped-query attention)")


def _check_mask(mask: object, q: torch.Tensor, target: tuple[int, ...]) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor (bool or float) or None; got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype not in (q.dtype, torch.float32):
        allowed = "torch.bool, " + (
            f"{q.dtype} (q's dtype) or torch.float32" if q.dtype != torch.float32 else "torch.float32"
        )
        raise TypeError(f"mask has dtype {mask.dtype}; expected {allowed}")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but q is on {q.device}; they must be on one device")
    try:
        ok = mask.ndim <= len(target) and torch.broadcast_shapes(mask.shape, target) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"mask of shape {_shape(mask.shape)} is not broadcastable to (..., H, L, S) = {_shape(target)}"
        )
    return mask.reshape((1,) * (len(target) - mask.ndim) + tuple(mask.shape))


def _check_key_lengths(
    key_lengths: object, batch_shape: tuple[int, ...], kv_len: int, device: torch.device
) -> torch.Tensor | None:
    if key_lengths is None:
        return None
    if not isinstance(key_lengths, torch.Tensor):
        try:
            key_lengths = torch.as_tensor(key_lengths, device=device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"key_lengths must be an integer tensor of shape (B,); got {key_lengths!r}") from e
    assert isinstance(key_lengths, torch.Tensor)
    if not is_integer_tensor(key_lengths):
        raise TypeError(f"key_lengths must be an integer tensor; got dtype {key_lengths.dtype}")
    if tuple(key_lengths.shape) != batch_shape:
        raise ValueError(
            f"key_lengths has shape {_shape(key_lengths.shape)}; expected the batch shape of q, {_shape(batch_shape)}"
        )
    if key_lengths.device != device:
        raise ValueError(f"key_lengths is on {key_lengths.device} but q is on {device}; they must match")
    check_values_between("key_lengths", key_lengths, 0, kv_len, f"[0, S={kv_len}]")
    return key_lengths


def _check_window(window: object) -> tuple[int | None, int | None]:
    if window is None:
        return None, None
    if (
        not isinstance(window, (tuple, list))
        or len(window) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)
    ):
        raise TypeError(f"window must be a pair of ints (left, right), -1 for unbounded; got {window!r}")
    left, right = window
    if left < -1 or right < -1:
        raise ValueError(f"window sides must be >= 0, or -1 for unbounded; got {tuple(window)}")
    return (None if left == -1 else left), (None if right == -1 else right)


def _check_alibi(slopes: object, batch_shape: tuple[int, ...], heads: int, device: torch.device) -> torch.Tensor | None:
    if slopes is None:
        return None
    if not isinstance(slopes, torch.Tensor) or not slopes.dtype.is_floating_point:
        got = slopes.dtype if isinstance(slopes, torch.Tensor) else type(slopes).__name__
        raise TypeError(f"alibi_slopes must be a float tensor of shape (H,) or (B, H); got {got}")
    if slopes.device != device:
        raise ValueError(f"alibi_slopes is on {slopes.device} but q is on {device}; they must match")
    if tuple(slopes.shape) == (heads,):
        return slopes.reshape((1,) * len(batch_shape) + (heads, 1, 1))
    if tuple(slopes.shape) == (*batch_shape, heads):
        return slopes.reshape(*batch_shape, heads, 1, 1)
    raise ValueError(
        f"alibi_slopes has shape {_shape(slopes.shape)}; expected (H,) = ({heads},) or "
        f"(..., H) = {_shape((*batch_shape, heads))}"
    )


def build_spec(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    causal: bool | str = False,
    window: tuple[int, int] | None = None,
    scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
) -> AttentionSpec:
    """Check every argument of :func:`qkv.attention` and return the normalized call."""
    _check_qkv(q, k, v)
    batch_shape = tuple(q.shape[:-3])
    heads, q_len, head_dim = q.shape[-3:]
    kv_heads, kv_len = k.shape[-3], k.shape[-2]
    target = (*batch_shape, heads, q_len, kv_len)

    if not (isinstance(causal, bool) or causal in ("bottom_right", "top_left")):
        raise ValueError(f"causal must be False, True, 'bottom_right' or 'top_left'; got {causal!r}")
    is_causal = causal is not False
    offset = 0 if causal == "top_left" else kv_len - q_len

    left, right = _check_window(window)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    else:
        scale = finite_number("scale", scale)
    if softcap is not None:
        softcap = positive_number("softcap", softcap, expected="a positive finite number or None")
    dropout = probability("dropout", dropout)

    return AttentionSpec(
        batch_shape=batch_shape,
        heads=heads,
        kv_heads=kv_heads,
        q_len=q_len,
        kv_len=kv_len,
        head_dim=head_dim,
        value_dim=v.shape[-1],
        scale=scale,
        causal=is_causal,
        offset=offset,
        window_left=left,
        window_right=right,
        mask=_check_mask(mask, q, target),
        key_lengths=_check_key_lengths(key_lengths, batch_shape, kv_len, q.device),
        alibi_slopes=_check_alibi(alibi_slopes, batch_shape, heads, q.device),
        softcap=softcap,
        dropout=dropout,
    )
