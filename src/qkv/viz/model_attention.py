"""The attention of one text through each kind of model qkv trains or loads, as named, labelled maps.

One :class:`AttentionMap` per kind of attention a model has, each ``(layers, heads, L, S)``:

==========================  =======================  =============================================================
model                       map names                rows (L) x columns (S)
==========================  =======================  =============================================================
encoder (BERT, MiniLM)      ``self``                 tokens x tokens
language model (GPT)        ``self`` (causal)        tokens x tokens; token ``i`` sees tokens ``0..i`` only
Transformer translation     ``encoder``              source x source
                            ``decoder`` (causal)     target steps x decoder input (``<s>``, then the target)
                            ``cross``                target steps x source
RNN translation             ``cross``                target steps x source (``layers = heads = 1``)
Vision Transformer          ``self``                 ``[CLS]`` and patches x the same (``p(row,col)``, row-major)
==========================  =======================  =============================================================

A translation is read teacher-forced: the decoder is fed ``<s>`` and the target shifted right, all at once, as
in training, and row ``t`` of its maps is the decoding step that produced target token ``t`` (``</s>``
included), so the rows are labelled by the token each step produced, as :mod:`qkv.viz.alignment` labels
them. The decoder's self-attention keys are its input tokens, so step ``t`` (producing token ``t``) sees
columns ``0..t``: ``<s>`` and the tokens produced before it. Given the tokens a search produced, the weights
are those the search saw (the cached decoder computes the same attention, one step at a time).

An RNN encoder has no self-attention and its decoder none either: its Bahdanau or Luong attention over the
source is the only attention it has, so an RNN model has one map, ``cross``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qkv.models.interface import Seq2SeqModel
from qkv.models.lm import TransformerLM
from qkv.models.vit import VisionTransformer

BOS_LABEL = "<s>"


@dataclass
class AttentionMap:
    """One kind of attention over one text.

    Attributes:
        name: the kind, one word (``self``, ``encoder``, ``decoder``, ``cross``): HTML and JSON keys, ``--kind``.
        label: the kind in words for titles, e.g. ``"decoder self-attention"``.
        weights: ``(layers, heads, L, S)`` float64, row ``i`` = how attending position ``i`` spreads its
            attention over the ``S`` attended-to positions.
        tokens: the ``L`` labels of the rows (attending positions).
        key_tokens: the ``S`` labels of the columns (attended-to positions).
        causal: row ``i`` can see columns ``0..i`` only (the weights beyond are exactly 0).
        same_tokens: rows and columns are the same positions under the same labels, so the diagonal is a
            token attending to itself (encoder and LM self-attention); a summary looks past it.
        query_name, key_name: what a row and a column are, in words (``"target token"``, ``"source token"``).
    """

    name: str
    label: str
    weights: np.ndarray
    tokens: list[str]
    key_tokens: list[str]
    causal: bool = False
    same_tokens: bool = True
    query_name: str = "token"
    key_name: str = "token"

    @property
    def layers(self) -> int:
        return int(self.weights.shape[0])

    @property
    def heads(self) -> int:
        return int(self.weights.shape[1])

    @property
    def described(self) -> str:
        """The label, and ``(causal)`` when it is: ``"decoder self-attention (causal)"``."""
        return f"{self.label} (causal)" if self.causal else self.label


def _one(weights: torch.Tensor | None, what: str) -> np.ndarray:
    """``(1, layers, heads, L, S)`` from a model → ``(layers, heads, L, S)`` float64 on the CPU."""
    if weights is None:
        raise ValueError(f"the model returned no {what}; it was asked for with need_attention=True")
    return weights[0].detach().to("cpu", torch.float64).numpy()


def _device(model: object) -> torch.device:
    """Where the model's weights are (the CPU for a model without any)."""
    if isinstance(model, nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return torch.device("cpu")


def encoder_attention(weights: np.ndarray, tokens: Sequence[str]) -> AttentionMap:
    """A BERT-style encoder's ``(layers, heads, L, L)`` self-attention over ``tokens`` as a map named ``self``."""
    return AttentionMap("self", "self-attention", weights, list(tokens), list(tokens))


@torch.no_grad()
def lm_attention(model: TransformerLM, ids: Sequence[int], tokens: Sequence[str]) -> AttentionMap:
    """The causal self-attention of a language model over one text.

    Args:
        model: the language model (in eval mode, or dropout changes the weights).
        ids: the text's ``T`` token ids, as the model was trained on them (no BOS added).
        tokens: ``T`` labels, one per id.
    Returns:
        the map ``self``: ``(layers, heads, T, T)``, zero above the diagonal.
    """
    if len(ids) != len(tokens):
        raise ValueError(f"{len(ids)} ids but {len(tokens)} token labels; give one label per id")
    batch = torch.tensor([list(ids)], dtype=torch.long, device=_device(model))
    out = model.decode_step(batch, model.start_state(), need_attention=True)
    weights = _one(out.self_attention, "self-attention")
    return AttentionMap("self", "self-attention", weights, list(tokens), list(tokens), causal=True)


@torch.no_grad()
def seq2seq_attention(
    model: Seq2SeqModel,
    src_ids: Sequence[int],
    out_ids: Sequence[int],
    src_tokens: Sequence[str],
    out_tokens: Sequence[str],
) -> list[AttentionMap]:
    """The attention of a translation model reading ``src_ids`` while producing ``out_ids`` (teacher-forced).

    Args:
        model: a sequence-to-sequence model (:class:`~qkv.models.TransformerSeq2Seq` or
            :class:`~qkv.models.RNNSeq2Seq`), in eval mode.
        src_ids: the ``S`` source ids (no BOS/EOS: what the model's tokenizer gives).
        out_ids: the ``T`` target ids the decoder produces, ``eos_id`` last when it ends there.
        src_tokens, out_tokens: ``S`` and ``T`` labels.
    Returns:
        the maps the model has, in this order: ``encoder`` ``(layers, heads, S, S)``, ``decoder``
        ``(layers, heads, T, T)`` (causal; its columns are ``<s>`` and ``out_tokens[:-1]``) and ``cross``
        ``(layers, heads, T, S)``; an RNN has ``cross`` only.
    """
    if len(src_ids) != len(src_tokens) or len(out_ids) != len(out_tokens):
        raise ValueError(
            f"{len(src_ids)} source ids with {len(src_tokens)} labels, {len(out_ids)} target ids with "
            f"{len(out_tokens)} labels; give one label per id"
        )
    if not src_ids or not out_ids:
        raise ValueError(f"the source has {len(src_ids)} and the target {len(out_ids)} tokens; both need one")
    device = _device(model)
    src = torch.tensor([list(src_ids)], dtype=torch.long, device=device)
    lengths = torch.tensor([len(src_ids)], dtype=torch.long, device=device)
    # Step t reads the token produced before it (<s> first) and produces out_ids[t].
    decoder_in = torch.tensor([[model.bos_id, *out_ids[:-1]]], dtype=torch.long, device=device)
    encoded = model.encode(src, lengths, need_attention=True)
    decoded = model.forward(src, lengths, decoder_in, need_attention=True)
    src_tokens, out_tokens = list(src_tokens), list(out_tokens)
    maps = []
    if encoded.self_attention is not None:
        maps.append(
            AttentionMap(
                "encoder",
                "encoder self-attention",
                _one(encoded.self_attention, "encoder self-attention"),
                src_tokens,
                src_tokens,
                query_name="source token",
                key_name="source token",
            )
        )
    if decoded.self_attention is not None:
        maps.append(
            AttentionMap(
                "decoder",
                "decoder self-attention",
                _one(decoded.self_attention, "decoder self-attention"),
                out_tokens,
                [BOS_LABEL, *out_tokens[:-1]],
                causal=True,
                same_tokens=False,
                query_name="target token",
                key_name="decoder input token",
            )
        )
    maps.append(
        AttentionMap(
            "cross",
            "cross-attention",
            _one(decoded.cross_attention, "cross-attention"),
            out_tokens,
            src_tokens,
            same_tokens=False,
            query_name="target token",
            key_name="source token",
        )
    )
    return maps


@torch.no_grad()
def vit_attention(model: VisionTransformer, image: torch.Tensor) -> tuple[AttentionMap, tuple[int, int]]:
    """The self-attention of a Vision Transformer over one image's patches.

    Args:
        model: the ViT (in eval mode, or dropout changes the weights).
        image: ``(C, H, W)`` normalized as the model was trained; ``H`` and ``W`` multiples of its patch size.
    Returns:
        the map ``self`` ``(layers, heads, N, N)`` over ``[CLS]`` (with class-token pooling) and the patches
        ``p(row,col)`` in row-major order, and the grid ``(h, w)`` of patches.
    """
    from qkv.viz.image_attention import patch_labels

    if image.ndim != 3:
        raise ValueError(f"image must have shape (C, H, W); got {tuple(image.shape)}")
    out = model(image[None].to(_device(model)), need_attention=True)
    labels = patch_labels(out.grid, class_token=model.config.pooling == "cls")
    weights = _one(out.attention, "attention")
    return AttentionMap("self", "self-attention over patches", weights, labels, labels, query_name="patch"), out.grid
