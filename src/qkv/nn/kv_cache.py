"""``KVCache``: the projected keys and values of past tokens, for incremental decoding.

One cache belongs to one attention layer. It holds ``k: (B, Hkv, S, D)`` and ``v: (B, Hkv, S, Dv)`` in the
layout :func:`qkv.attention` reads, and is used in one of two ways:

* **Self-attention** (``static=False``): every :meth:`update` appends the new keys/values along ``S``
  and returns everything cached. A decoder feeds its tokens one at a time (or in chunks) with
  ``causal=True``; bottom-right alignment lets query ``i`` of the new chunk see every cached key and the
  new ones up to itself, so the outputs equal one causal call over the whole sequence.
* **Cross-attention** (``static=True``): the first :meth:`update` stores the projected encoder
  keys/values; later calls return them unchanged, so the encoder output is projected once per source.

Appending concatenates (``torch.cat``), which copies the cache at every step: simple, and cheap next to
the attention itself for the sequence lengths this library targets. For beam search, :meth:`reorder`
selects batch rows (``index_select`` along ``B``). The cache keeps whatever autograd graph its tensors
carry: decode under ``torch.no_grad()`` unless gradients through past steps are wanted.
"""

from __future__ import annotations

import torch

from qkv.ops.spec import is_integer_tensor


class KVCache:
    """Keys ``(B, Hkv, S, D)`` and values ``(B, Hkv, S, Dv)`` of one attention layer.

    Args:
        static: ``False`` (self-attention): each update appends. ``True`` (cross-attention): the first
            update stores, later ones reuse what is stored.

    Example::

        cache = KVCache()
        for t in range(x.shape[1]):
            y, _ = mha(x[:, t : t + 1], cache=cache, causal=True)  # y: (B, 1, E)
    """

    def __init__(self, *, static: bool = False) -> None:
        self.static = static
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def __repr__(self) -> str:
        shape = None if self.k is None else tuple(self.k.shape)
        return f"KVCache(static={self.static}, k={shape})"

    @property
    def is_empty(self) -> bool:
        """Whether nothing has been stored yet."""
        return self.k is None

    @property
    def seq_len(self) -> int:
        """``S``, the number of cached keys (0 when empty)."""
        return 0 if self.k is None else self.k.shape[-2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add new keys/values and return all of them.

        Args:
            k: ``(B, Hkv, S_new, D)`` new keys.
            v: ``(B, Hkv, S_new, Dv)`` new values.

        Returns:
            ``(k, v)`` of shapes ``(B, Hkv, S, D)`` and ``(B, Hkv, S, Dv)``: the concatenation of the cached
            and new ones (``static=False``), or what a static cache stores (``k, v`` on its first call).
        """
        _check_pair(k, v)
        if self.k is None or self.v is None:
            self.k, self.v = k, v
            return k, v
        if self.static:
            return self.k, self.v
        for name, new, old in (("k", k, self.k), ("v", v, self.v)):
            if new.shape[:2] != old.shape[:2] or new.shape[-1] != old.shape[-1]:
                raise ValueError(
                    f"{name} has shape {tuple(new.shape)} but the cache holds {tuple(old.shape)}; "
                    "new entries must match it in every dimension but S (dim 2)"
                )
            if new.dtype != old.dtype or new.device != old.device:
                raise ValueError(
                    f"{name} is {new.dtype} on {new.device} but the cache holds {old.dtype} on {old.device}"
                )
        self.k = torch.cat([self.k, k], dim=-2)
        self.v = torch.cat([self.v, v], dim=-2)
        return self.k, self.v

    def reorder(self, indices: torch.Tensor) -> KVCache:
        """Select batch rows in place (beam search): ``k = k.index_select(0, indices)``, same for ``v``.

        Args:
            indices: integer ``(B_new,)``, each in ``[0, B)``; rows may repeat.

        Returns:
            ``self``, for chaining.
        """
        if self.k is None or self.v is None:
            check_row_indices(indices, None)
            return self
        indices = check_row_indices(indices, self.k.shape[0]).to(self.k.device)
        self.k = self.k.index_select(0, indices)
        self.v = self.v.index_select(0, indices)
        return self


def check_row_indices(indices: object, batch: int | None) -> torch.Tensor:
    """``indices`` for reordering the rows of a decoder state: a 1-D integer tensor ``(B_new,)`` with values in
    ``[0, batch)`` (not checked when ``batch`` is None: nothing is stored yet). Returns it."""
    if not is_integer_tensor(indices) or indices.ndim != 1:
        got = (
            f"{indices.dtype} tensor of shape {tuple(indices.shape)}"
            if isinstance(indices, torch.Tensor)
            else type(indices).__name__
        )
        raise ValueError(f"indices must be a 1-D integer tensor (B_new,); got {got}")
    assert isinstance(indices, torch.Tensor)
    if batch is not None and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= batch):
        raise ValueError(
            f"indices must lie in [0, B={batch}); got values from {int(indices.min())} to {int(indices.max())}"
        )
    return indices


def _check_pair(k: torch.Tensor, v: torch.Tensor) -> None:
    """Check that ``k: (B, Hkv, S, D)`` and ``v: (B, Hkv, S, Dv)`` agree."""
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor (B, Hkv, S, D); got {got}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k has shape {tuple(k.shape)} and v {tuple(v.shape)}; their (B, Hkv, S) must be equal")
