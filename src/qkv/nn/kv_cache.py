"""``KVCache``: the projected keys and values of past tokens, for incremental decoding.

One cache belongs to one attention layer. It holds ``k: (B, Hkv, S, D)`` and ``v: (B, Hkv, S, Dv)`` in the
layout :func:`qkv.attention` reads, and is used in one of two ways:

* **Self-attention** (``static=False``): every :meth:`~KVCache.update` appends the new keys/values along
  ``S`` and returns everything cached. A decoder feeds its tokens one at a time (or in chunks) with
  ``causal=True``; bottom-right alignment lets query ``i`` of the new chunk see every cached key and the
  new ones up to itself, so the outputs equal one causal call over the whole sequence.
* **Cross-attention** (``static=True``): the first update stores the projected encoder keys/values;
  later calls return them unchanged, so the encoder output is projected once per source.

**Preallocation.** A self-attention cache writes into buffers ``(B, Hkv, capacity, D)`` and exposes
their first ``S`` positions as views, so a step of ``n`` tokens copies ``n`` positions, not the whole
cache as ``torch.cat`` would. The capacity is ``max_len`` when it is given (allocated once; going past it
is an error), else it starts at ``max(S, INITIAL_CAPACITY)`` and doubles when full (amortized O(n) per
step). For beam search, :meth:`~KVCache.reorder` copies the ``S`` valid positions of the selected rows
into the buffers held before the previous reorder, so a search allocates nothing step after step. The
tensors :meth:`~KVCache.update` returns are views of the buffers: appends never write over them, but
they hold their values only until the second reorder after they were returned (``.clone()`` one to keep
it longer).

**Autograd.** Every view of a buffer shares its version counter, so a write anywhere in it would fail
the backward of any earlier view autograd saved: the cached keys themselves when they require grad, but
also keys that do not, saved for the gradient of a query that does (which a cache cannot see). So
**while grad mode is on an update concatenates**, as before preallocation, and keeps the graph; the
buffers are used only with grad mode off. Decode under ``torch.no_grad()`` or ``torch.inference_mode()``
(as :mod:`qkv.models.search` and ``TransformerLM.generate`` do) to get the preallocated path.

``preallocate=False``, or building caches inside :func:`concatenating_caches`, always concatenates: the
behaviour before preallocation, kept for comparisons and benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from qkv.checks import boolean, int_at_least, optional
from qkv.ops.spec import check_values_between, is_integer_tensor

INITIAL_CAPACITY = 16
"""Positions allocated at first for a self-attention cache without ``max_len`` (more if the first update
holds more)."""

_PREALLOCATE: ContextVar[bool] = ContextVar("qkv_kv_cache_preallocate", default=True)


@contextmanager
def concatenating_caches() -> Iterator[None]:
    """Within this block, a ``KVCache()`` built without ``preallocate=`` concatenates at every update.

    For comparing with (and benchmarking against) the cache before preallocation without changing the
    models that build caches::

        with concatenating_caches():
            before = beam_search(model, src, src_lengths)  # start_state builds concatenating caches
    """
    token = _PREALLOCATE.set(False)
    try:
        yield
    finally:
        _PREALLOCATE.reset(token)


class KVCache:
    """Keys ``(B, Hkv, S, D)`` and values ``(B, Hkv, S, Dv)`` of one attention layer.

    Args:
        static: ``False`` (self-attention): each update appends. ``True`` (cross-attention): the first
            update stores, later ones reuse what is stored.
        max_len: the most positions ``S`` a self-attention cache will hold: its buffers are allocated once
            at that size, and an update past it raises ``ValueError``. ``None``: grow by doubling.
        preallocate: ``False`` concatenates at every update (the behaviour before preallocation);
            ``None`` takes the default, ``True`` unless built inside :func:`concatenating_caches`.

    Example::

        cache = KVCache()
        for t in range(x.shape[1]):
            y, _ = mha(x[:, t : t + 1], cache=cache, causal=True)  # y: (B, 1, E)
    """

    def __init__(self, *, static: bool = False, max_len: int | None = None, preallocate: bool | None = None) -> None:
        self.static = boolean("static", static)
        self.max_len: int | None = optional(int_at_least)("max_len", max_len, expected="an int >= 1 or None")
        if static and max_len is not None:
            raise ValueError(f"max_len applies to a self-attention cache (static=False); got max_len={max_len}")
        self.preallocate = _PREALLOCATE.get() if preallocate is None else boolean("preallocate", preallocate)
        # Buffers (rows >= B, Hkv, capacity, D|Dv), their valid views (B, Hkv, S, D|Dv), None when empty, and
        # the buffers held before the last reorder, which the next one writes into.
        self._k_buf: torch.Tensor | None = None
        self._v_buf: torch.Tensor | None = None
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None

    def __repr__(self) -> str:
        shape = None if self._k is None else tuple(self._k.shape)
        extra = "" if self.static else f", capacity={self.capacity}"
        return f"KVCache(static={self.static}, k={shape}{extra})"

    @property
    def k(self) -> torch.Tensor | None:
        """The cached keys ``(B, Hkv, S, D)`` (a view of the buffer), or ``None`` when empty."""
        return self._k

    @property
    def v(self) -> torch.Tensor | None:
        """The cached values ``(B, Hkv, S, Dv)`` (a view of the buffer), or ``None`` when empty."""
        return self._v

    @property
    def is_empty(self) -> bool:
        """Whether nothing has been stored yet."""
        return self._k is None

    @property
    def seq_len(self) -> int:
        """``S``, the number of cached keys (0 when empty)."""
        return 0 if self._k is None else self._k.shape[-2]

    @property
    def capacity(self) -> int:
        """The positions the buffers hold before they must grow (``seq_len`` after a concatenation)."""
        return 0 if self._k_buf is None else self._k_buf.shape[-2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add new keys/values and return all of them.

        Args:
            k: ``(B, Hkv, S_new, D)`` new keys.
            v: ``(B, Hkv, S_new, Dv)`` new values.

        Returns:
            ``(k, v)`` of shapes ``(B, Hkv, S, D)`` and ``(B, Hkv, S, Dv)``: the cached and the new ones
            (``static=False``), or what a static cache stores (``k, v`` themselves on its first call). From a
            preallocated cache, views of its buffers (see the module docstring for how long they hold).
        """
        _check_pair(k, v)
        if self._k is None or self._v is None:
            if self.static or self._concatenates():
                self._check_room(0, k.shape[2])
                return self._keep(k, v)
            return self._write(k, v)
        if self.static:
            return self._k, self._v
        _check_like(k, v, self._k, self._v)
        if self._concatenates():
            self._check_room(self.seq_len, k.shape[2])
            return self._keep(torch.cat([self._k, k], dim=-2), torch.cat([self._v, v], dim=-2))
        return self._write(k, v)

    def reorder(self, indices: torch.Tensor) -> KVCache:
        """Select batch rows in place (beam search): ``k = k.index_select(0, indices)``, same for ``v``.

        A preallocated cache copies only the ``S`` valid positions, into the buffers it held before its
        previous reorder when they are large enough (so a beam search allocates nothing step after step).
        When ``indices`` is a CPU tensor equal to ``arange(B)``, nothing is copied at all; that comparison
        is made on CPU tensors only, since on an accelerator it would synchronize with the device (pass CPU
        indices to get it: they are moved to the cache's device when rows are copied).

        Args:
            indices: integer ``(B_new,)``, each in ``[0, B)``; rows may repeat. The range is checked as
                :func:`~qkv.ops.spec.check_values_between` says (on CUDA without a synchronization).

        Returns:
            ``self``, for chaining.
        """
        if self._k is None or self._v is None:
            check_row_indices(indices, None)
            return self
        batch = self._k.shape[0]
        indices = check_row_indices(indices, batch)
        if indices.device.type == "cpu" and indices.shape[0] == batch and torch.equal(indices, torch.arange(batch)):
            return self
        indices = indices.to(self._k.device)
        k, v, rows, s = self._k, self._v, indices.shape[0], self.seq_len
        if self._k_buf is None or self._v_buf is None or self._k_buf is k or torch.is_grad_enabled():
            self._keep(k.index_select(0, indices), v.index_select(0, indices))
            return self
        k_buf, v_buf = self._spare if self._spare is not None else (self._k_buf[:0], self._v_buf[:0])
        if (
            k_buf.shape[0] < rows
            or k_buf.shape[1:] != self._k_buf.shape[1:]
            or v_buf.shape[1:] != self._v_buf.shape[1:]
        ):
            k_buf = self._k_buf.new_empty(rows, *self._k_buf.shape[1:])
            v_buf = self._v_buf.new_empty(rows, *self._v_buf.shape[1:])
        k_new, v_new = k_buf[:rows, :, :s], v_buf[:rows, :, :s]
        torch.index_select(k, 0, indices, out=k_new)
        torch.index_select(v, 0, indices, out=v_new)
        self._spare = (self._k_buf, self._v_buf)
        self._k_buf, self._v_buf, self._k, self._v = k_buf, v_buf, k_new, v_new
        return self

    def _concatenates(self) -> bool:
        """Whether an update concatenates: no preallocation, or grad mode on (see the module docstring)."""
        return not self.preallocate or torch.is_grad_enabled()

    def _keep(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hold ``k (B, Hkv, S, D)``, ``v (B, Hkv, S, Dv)`` themselves as the buffers (full: the next update
        or reorder copies them); return them."""
        self._k_buf, self._v_buf, self._k, self._v, self._spare = k, v, k, v, None
        return k, v

    def _write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k (B, Hkv, S_new, D)``, ``v (B, Hkv, S_new, Dv)`` after the cached positions, into new
        buffers of more capacity first when they are full; return the valid views."""
        rows, start, end = k.shape[0], self.seq_len, self.seq_len + k.shape[2]
        self._check_room(start, k.shape[2])
        k_buf, v_buf = self._k_buf, self._v_buf
        if k_buf is None or v_buf is None or end > k_buf.shape[2]:
            capacity = self.max_len if self.max_len is not None else max(end, 2 * self.capacity, INITIAL_CAPACITY)
            k_buf = k.new_empty(rows, k.shape[1], capacity, k.shape[3])
            v_buf = v.new_empty(rows, v.shape[1], capacity, v.shape[3])
            if self._k is not None and self._v is not None:
                k_buf[:, :, :start].copy_(self._k)
                v_buf[:, :, :start].copy_(self._v)
            self._k_buf, self._v_buf, self._spare = k_buf, v_buf, None
        k_buf[:rows, :, start:end].copy_(k)
        v_buf[:rows, :, start:end].copy_(v)
        self._k, self._v = k_buf[:rows, :, :end], v_buf[:rows, :, :end]
        return self._k, self._v

    def _check_room(self, cached: int, new: int) -> None:
        if self.max_len is not None and cached + new > self.max_len:
            raise ValueError(
                f"the cache holds S={cached} positions and {new} more would exceed max_len={self.max_len}; "
                "build the KVCache with a larger max_len (or None to grow as needed)"
            )


def check_row_indices(indices: object, batch: int | None) -> torch.Tensor:
    """``indices`` for reordering the rows of a decoder state: a 1-D integer tensor ``(B_new,)`` with values in
    ``[0, batch)`` (not checked when ``batch`` is None: nothing is stored yet; on an accelerator, checked as
    :func:`~qkv.ops.spec.check_values_between` says, without a synchronization). Returns it."""
    if not is_integer_tensor(indices) or indices.ndim != 1:
        got = (
            f"{indices.dtype} tensor of shape {tuple(indices.shape)}"
            if isinstance(indices, torch.Tensor)
            else type(indices).__name__
        )
        raise ValueError(f"indices must be a 1-D integer tensor (B_new,); got {got}")
    assert isinstance(indices, torch.Tensor)
    if batch is not None:
        check_values_between("indices", indices, 0, batch - 1, f"[0, B={batch})")
    return indices


def _check_pair(k: torch.Tensor, v: torch.Tensor) -> None:
    """Check that ``k: (B, Hkv, S, D)`` and ``v: (B, Hkv, S, Dv)`` agree."""
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor (B, Hkv, S, D); got {got}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k has shape {tuple(k.shape)} and v {tuple(v.shape)}; their (B, Hkv, S) must be equal")


def _check_like(k: torch.Tensor, v: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor) -> None:
    """New ``k, v`` must match the cached ones in every dimension but ``S``, in dtype and in device."""
    for name, new, old in (("k", k, k_old), ("v", v, v_old)):
        if new.shape[:2] != old.shape[:2] or new.shape[-1] != old.shape[-1]:
            raise ValueError(
                f"{name} has shape {tuple(new.shape)} but the cache holds {tuple(old.shape)}; "
                "new entries must match it in every dimension but S (dim 2)"
            )
        if new.dtype != old.dtype or new.device != old.device:
            raise ValueError(f"{name} is {new.dtype} on {new.device} but the cache holds {old.dtype} on {old.device}")
