"""qkv models as CTranslate2 model specifications: what maps to what, and what cannot be exported.

CTranslate2 describes a model as a tree of *specs* (``ctranslate2.specs``) whose variables a converter
fills; ``spec.validate(); spec.optimize(quantization=...); spec.save(dir)`` then writes its binary format.
This module fills them from a :class:`~qkv.models.TransformerSeq2Seq` (a ``TransformerSpec``) or a
:class:`~qkv.models.TransformerLM` (a ``TransformerDecoderModelSpec``), as CTranslate2's own converters
(``opennmt_py.py``, ``fairseq.py``) do. The mapping, qkv → CTranslate2::

    embed_tokens.weight (V, E)            embeddings/weight; scale_embeddings = × √E (seq2seq), off (LM)
    embed_positions.weight (P, E)         position_encodings/encodings            positional="learned"
    sinusoidal positions                  position_encodings/encodings, the table qkv computes, P rows
    rotary                                rotary_dim=0 (whole head), rotary_interleave=False (rotate-half)
    layers.i.self_attn  q, k, v, out      self_attention/linear_0 = [q; k; v], linear_1 = out
    layers.i.multihead_attn q, k, v, out  attention/linear_0 = q, linear_1 = [k; v], linear_2 = out
    layers.i.norm1, norm2 (, norm3)       self_attention/layer_norm, (attention/layer_norm,) ffn/layer_norm
    layers.i.linear1, linear2             ffn/linear_0, ffn/linear_1
    norm (pre-LN only)                    layer_norm
    output_projection / lm_head           projection (tied weights are stored once: CTranslate2 aliases them)

Sinusoidal positions go in as a table because CTranslate2's built-in sinusoids differ from qkv's (sines in
the first half and cosines in the second, with tensor2tensor's frequencies; qkv interleaves them as the
paper does), so an export holds a fixed number of positions. :func:`check_exportable` goes through the
config's fields one by one and names any option (or option it does not know) that CTranslate2 cannot
express. The projections are read with :meth:`~qkv.nn.MultiHeadAttention.projection_weights`, whatever
the module stores.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from qkv.checks import ConfigError
from qkv.models.config import LMConfig, TransformerConfig
from qkv.models.lm import TransformerLM
from qkv.models.transformer import TransformerSeq2Seq
from qkv.nn import (
    MultiHeadAttention,
    SinusoidalPositionalEncoding,
    TransformerDecoderLayer,
    TransformerEncoderLayer,
)

INSTALL_HINT = "pip install 'qkv[deploy]'"
ACTIVATIONS = {"relu": "RELU", "gelu": "GELU"}  # qkv's exact (erf) GELU is CTranslate2's GELU, not GELUTanh
POSITIONALS = ("sinusoidal", "learned", "rotary")
ROTARY_BASE = 10000.0  # qkv.models.transformer.positional_modules builds RotaryEmbedding with the default base


def require_ctranslate2() -> Any:
    """The ``ctranslate2`` module; ``ImportError`` saying how to install it when it is missing."""
    try:
        return importlib.import_module("ctranslate2")
    except ImportError:
        raise ImportError(
            f"the CTranslate2 export and engine need the ctranslate2 package, which is not installed: {INSTALL_HINT}"
        ) from None


def _any(value: Any) -> str | None:
    return None


def _activation(value: Any) -> str | None:
    return None if value in ACTIVATIONS else f"expected one of {', '.join(map(repr, ACTIVATIONS))}"


def _positional(value: Any) -> str | None:
    return None if value in POSITIONALS else f"expected one of {', '.join(map(repr, POSITIONALS))}"


def _no_window(value: Any) -> str | None:
    if value is None:
        return None
    return (
        "CTranslate2 has no sliding-window attention mask (its sliding_window is a rolling KV cache, which "
        "scores differently); expected None"
    )


# Every field of the configs, and whether a value can be exported (None) or why not. A field missing here
# (one added to the config later) is refused until someone checks how it maps. Dropout is off in inference.
_SHARED: dict[str, Callable[[Any], str | None]] = {
    "d_model": _any,
    "num_heads": _any,
    "kv_heads": _any,  # CTranslate2's num_heads_kv, in self- and cross-attention
    "ffn_dim": _any,
    "dropout": _any,
    "attention_dropout": _any,
    "activation_dropout": _any,
    "activation": _activation,
    "norm_first": _any,  # pre_norm (with the final LayerNorm) or post-LN
    "positional": _positional,
    "max_positions": _any,
    "tie_embeddings": _any,
    "layer_norm_eps": _any,  # the model config's layer_norm_epsilon
    "pad_id": _any,
}
SEQ2SEQ_OPTIONS = {
    **_SHARED,
    "src_vocab_size": _any,
    "tgt_vocab_size": _any,
    "encoder_layers": _any,
    "decoder_layers": _any,
    "shared_vocab": _any,
    "bos_id": _any,
    "eos_id": _any,
}
LM_OPTIONS = {**_SHARED, "vocab_size": _any, "num_layers": _any, "eos_id": _any, "window": _no_window}


def check_exportable(config: TransformerConfig | LMConfig) -> None:
    """``ConfigError`` naming the first option of ``config`` that CTranslate2 cannot express, its value and why."""
    table = SEQ2SEQ_OPTIONS if isinstance(config, TransformerConfig) else LM_OPTIONS
    for f in fields(config):
        value = getattr(config, f.name)
        check = table.get(f.name)
        if check is None:
            raise ConfigError(
                f"cannot export to CTranslate2: {type(config).__name__} option {f.name}={value!r} is not known to "
                "the exporter (qkv.deploy.ctranslate2_spec); add how it maps to CTranslate2 first"
            )
        reason = check(value)
        if reason is not None:
            raise ConfigError(f"cannot export to CTranslate2: {f.name}={value!r} is not supported; {reason}")


def _tensor(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _linear(spec: Any, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    spec.weight = _tensor(weight)
    if bias is not None:
        spec.bias = _tensor(bias)


def _fused(spec: Any, projections: dict[str, tuple[torch.Tensor, torch.Tensor | None]], names: str) -> None:
    """``spec`` = the projections ``names`` (e.g. ``"qkv"``) stacked along the output rows."""
    weights = [projections[n][0] for n in names]
    biases = [projections[n][1] for n in names]
    bias = None
    if any(b is not None for b in biases):  # a missing bias is a zero one
        bias = torch.cat([w.new_zeros(w.shape[0]) if b is None else b for w, b in zip(weights, biases, strict=True)])
    _linear(spec, torch.cat(weights), bias)


def _attention(spec: Any, module: MultiHeadAttention, *, self_attention: bool) -> None:
    projections = module.projection_weights()
    if self_attention:
        _fused(spec.linear[0], projections, "qkv")
    else:
        _fused(spec.linear[0], projections, "q")
        _fused(spec.linear[1], projections, "kv")
    _linear(spec.linear[-1], *projections["out"])


def _layer_norm(spec: Any, norm: nn.LayerNorm) -> None:
    spec.gamma = _tensor(norm.weight)
    spec.beta = _tensor(norm.bias)


def _feed_forward(spec: Any, layer: TransformerEncoderLayer | TransformerDecoderLayer, norm: nn.LayerNorm) -> None:
    _layer_norm(spec.layer_norm, norm)
    _linear(spec.linear_0, layer.linear1.weight, layer.linear1.bias)
    _linear(spec.linear_1, layer.linear2.weight, layer.linear2.bias)


def _layer(spec: Any, layer: nn.Module) -> None:
    """One layer: a :class:`TransformerEncoderLayer` (of an encoder or a language model) or a
    :class:`TransformerDecoderLayer`."""
    if isinstance(layer, TransformerDecoderLayer):
        _attention(spec.self_attention, layer.self_attn, self_attention=True)
        _layer_norm(spec.self_attention.layer_norm, layer.norm1)
        _attention(spec.attention, layer.multihead_attn, self_attention=False)
        _layer_norm(spec.attention.layer_norm, layer.norm2)
        _feed_forward(spec.ffn, layer, layer.norm3)
    elif isinstance(layer, TransformerEncoderLayer):
        _attention(spec.self_attention, layer.self_attn, self_attention=True)
        _layer_norm(spec.self_attention.layer_norm, layer.norm1)
        _feed_forward(spec.ffn, layer, layer.norm2)
    else:
        raise TypeError(f"cannot export a {type(layer).__name__} layer; expected qkv.nn's Transformer layers")


def _positions(spec: Any, embed_positions: nn.Module | None, rows: int) -> None:
    """The position table of one stack: learned weights, or ``rows`` sinusoids; rotary needs none."""
    if embed_positions is None:  # rotary: the attention rotates queries and keys itself
        if hasattr(spec, "position_encodings"):  # an encoder spec always declares one
            del spec.position_encodings
        return
    if isinstance(embed_positions, SinusoidalPositionalEncoding):
        table = embed_positions(rows, dtype=torch.float32)
    else:
        table = embed_positions.weight
    spec.position_encodings.encodings = _tensor(table)


def _stack_options(ct2: Any, config: TransformerConfig | LMConfig) -> dict[str, Any]:
    """The keyword arguments the encoder and decoder specs share."""
    options: dict[str, Any] = {
        "pre_norm": config.norm_first,
        "activation": getattr(ct2.specs.Activation, ACTIVATIONS[config.activation]),
        "num_heads_kv": config.kv_heads,
    }
    if config.positional == "rotary":
        options.update(rotary_dim=0, rotary_interleave=False, rotary_base=ROTARY_BASE)
    return options


def seq2seq_spec(model: TransformerSeq2Seq, sinusoidal_positions: int) -> Any:
    """A ``ctranslate2.specs.TransformerSpec`` holding ``model``'s weights (vocabularies not registered yet).

    Args:
        model: the model; its config must pass :func:`check_exportable`.
        sinusoidal_positions: rows of the position tables of a sinusoidal model (the longest source, and
            the most decoding steps, the export can take).
    """
    ct2 = require_ctranslate2()
    c = model.config
    check_exportable(c)
    specs = ct2.specs
    options = _stack_options(ct2, c)
    encoder = specs.TransformerEncoderSpec(c.encoder_layers, c.num_heads, **options)
    # alignment_heads = all: return_attention gives the last layer's cross-attention averaged over heads.
    decoder = specs.TransformerDecoderSpec(
        c.decoder_layers, c.num_heads, alignment_layer=-1, alignment_heads=c.num_heads, **options
    )
    spec = specs.TransformerSpec(encoder, decoder)
    spec.config.layer_norm_epsilon = c.layer_norm_eps

    encoder.embeddings[0].weight = _tensor(model.encoder.embed_tokens.weight)
    _positions(encoder, model.encoder.embed_positions, sinusoidal_positions)
    for layer_spec, layer in zip(encoder.layer, model.encoder.layers, strict=True):
        _layer(layer_spec, layer)
    if model.encoder.norm is not None:
        _layer_norm(encoder.layer_norm, model.encoder.norm)

    decoder.embeddings.weight = _tensor(model.decoder.embed_tokens.weight)
    _positions(decoder, model.decoder.embed_positions, sinusoidal_positions)
    for layer_spec, layer in zip(decoder.layer, model.decoder.layers, strict=True):
        _layer(layer_spec, layer)
    if model.decoder.norm is not None:
        _layer_norm(decoder.layer_norm, model.decoder.norm)
    _linear(decoder.projection, model.decoder.output_projection.weight, model.decoder.output_projection.bias)
    return spec


def lm_spec(model: TransformerLM, sinusoidal_positions: int) -> Any:
    """A ``ctranslate2.specs.TransformerDecoderModelSpec`` holding ``model``'s weights (vocabulary not
    registered yet); ``sinusoidal_positions`` as in :func:`seq2seq_spec`."""
    ct2 = require_ctranslate2()
    c = model.config
    check_exportable(c)
    spec = ct2.specs.TransformerDecoderModelSpec.from_config(c.num_layers, c.num_heads, **_stack_options(ct2, c))
    spec.config.layer_norm_epsilon = c.layer_norm_eps
    decoder = spec.decoder
    decoder.scale_embeddings = False  # GPT-2-like: token embeddings are added to the positions unscaled
    decoder.embeddings.weight = _tensor(model.embed_tokens.weight)
    _positions(decoder, model.embed_positions, sinusoidal_positions)
    for layer_spec, layer in zip(decoder.layer, model.layers, strict=True):
        _layer(layer_spec, layer)
    if model.norm is not None:
        _layer_norm(decoder.layer_norm, model.norm)
    _linear(decoder.projection, model.lm_head.weight, model.lm_head.bias)
    return spec
