"""Configurations of the Transformer models: small dataclasses, validated on construction.

``Config.from_dict(d)`` builds one from a parsed JSON/YAML mapping and rejects unknown keys (naming them
and the valid ones), so a typo in a config file is an error, not a silently ignored option;
``config.to_dict()`` is the inverse (what ``config.json`` of a checkpoint holds).

:class:`EncoderConfig` uses the field names of Hugging Face's ``BertConfig``, so a BERT ``config.json``
maps onto it key for key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, TypeVar

POSITIONALS = ("sinusoidal", "learned", "rotary")
ACTIVATIONS = ("relu", "gelu")

C = TypeVar("C", bound="_Config")


def _int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return value


def _probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1); got {value!r}")
    return float(value)


def _positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number; got {value!r}")
    return float(value)


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false; got {value!r}")
    return value


def _choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    assert isinstance(value, str)
    return value


def _heads(d_model: int, num_heads: int, kv_heads: int | None, positional: str | None = None) -> None:
    """Cross-field checks of the attention geometry (names as in the seq2seq and LM configs)."""
    if d_model % num_heads:
        raise ValueError(f"d_model={d_model} must be a multiple of num_heads={num_heads}")
    if kv_heads is not None and num_heads % kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of kv_heads={kv_heads}")
    if positional == "sinusoidal" and d_model % 2:
        raise ValueError(f"sinusoidal positions need an even d_model; got d_model={d_model}")
    if positional == "rotary" and (d_model // num_heads) % 2:
        raise ValueError(
            f"rotary positions need an even head dimension; got d_model/num_heads = {d_model}/{num_heads} "
            f"= {d_model // num_heads}"
        )


def _id(name: str, value: object, vocab_name: str, vocab_size: int) -> int:
    value = _int(name, value, minimum=0)
    if value >= vocab_size:
        raise ValueError(f"{name}={value} must be < {vocab_name}={vocab_size}")
    return value


class _Config:
    """``from_dict`` / ``to_dict`` shared by the config dataclasses."""

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build from a mapping; unknown or missing keys are a ``ValueError`` naming them."""
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict needs a mapping; got {type(data).__name__}")
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = [key for key in data if key not in names]
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} key(s): {', '.join(map(repr, unknown))}; valid keys: {', '.join(names)}"
            )
        required = [f.name for f in fields(cls) if f.default is MISSING]  # type: ignore[arg-type]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"{cls.__name__} needs key(s) {', '.join(map(repr, missing))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``from_dict(to_dict())`` is an equal config)."""
        return asdict(self)  # type: ignore[call-overload]


@dataclass
class TransformerConfig(_Config):
    """An encoder-decoder Transformer (:class:`~qkv.models.TransformerSeq2Seq`).

    Attributes:
        src_vocab_size, tgt_vocab_size: vocabulary sizes.
        d_model: ``E``, the model width.
        num_heads: attention heads; must divide ``d_model``.
        kv_heads: key/value heads (grouped-query attention); ``None`` = ``num_heads``.
        encoder_layers, decoder_layers: number of layers.
        ffn_dim: feed-forward hidden width.
        dropout: residual and embedding dropout.
        attention_dropout: dropout on the attention weights.
        activation_dropout: dropout after the feed-forward activation.
        activation: ``"relu"`` or ``"gelu"``.
        norm_first: pre-LN (plus a final LayerNorm after each stack) if true, post-LN (the paper) if false.
        positional: ``"sinusoidal"`` (the paper; any length), ``"learned"`` (up to ``max_positions``) or
            ``"rotary"`` (RoPE in every self-attention; any length).
        max_positions: the number of learned positions (used by ``positional="learned"`` only).
        tie_embeddings: the output projection is the target embedding matrix.
        shared_vocab: source and target share one embedding matrix (needs equal vocabulary sizes).
        layer_norm_eps: LayerNorm epsilon.
        pad_id, bos_id, eos_id: special token ids (``pad_id`` in both vocabularies).
    """

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 512
    num_heads: int = 8
    kv_heads: int | None = None
    encoder_layers: int = 6
    decoder_layers: int = 6
    ffn_dim: int = 2048
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation: str = "relu"
    norm_first: bool = False
    positional: str = "sinusoidal"
    max_positions: int = 1024
    tie_embeddings: bool = True
    shared_vocab: bool = False
    layer_norm_eps: float = 1e-5
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        for name in ("src_vocab_size", "tgt_vocab_size", "d_model", "num_heads", "ffn_dim", "max_positions"):
            _int(name, getattr(self, name))
        for name in ("encoder_layers", "decoder_layers"):
            _int(name, getattr(self, name))
        if self.kv_heads is not None:
            _int("kv_heads", self.kv_heads)
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            setattr(self, name, _probability(name, getattr(self, name)))
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("positional", self.positional, POSITIONALS)
        for name in ("norm_first", "tie_embeddings", "shared_vocab"):
            _bool(name, getattr(self, name))
        self.layer_norm_eps = _positive_float("layer_norm_eps", self.layer_norm_eps)
        _heads(self.d_model, self.num_heads, self.kv_heads, self.positional)
        if self.shared_vocab and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(
                f"shared_vocab=True needs src_vocab_size == tgt_vocab_size; got {self.src_vocab_size} and "
                f"{self.tgt_vocab_size}"
            )
        _id("pad_id", self.pad_id, "src_vocab_size", self.src_vocab_size)
        for name in ("pad_id", "bos_id", "eos_id"):
            _id(name, getattr(self, name), "tgt_vocab_size", self.tgt_vocab_size)


@dataclass
class LMConfig(_Config):
    """A decoder-only causal language model (:class:`~qkv.models.TransformerLM`), GPT-2-like defaults.

    Attributes:
        vocab_size: vocabulary size.
        d_model, num_heads, kv_heads, ffn_dim, dropout, attention_dropout, activation_dropout, activation,
            norm_first, positional, max_positions, layer_norm_eps: as in :class:`TransformerConfig`.
        num_layers: number of layers.
        tie_embeddings: the output projection (``lm_head``) is the token embedding matrix.
        pad_id: the token ``generate`` writes after a row's ``eos_id``.
        eos_id: the default end-of-sequence token of ``generate`` (``None``: none).
    """

    vocab_size: int
    d_model: int = 768
    num_heads: int = 12
    kv_heads: int | None = None
    num_layers: int = 12
    ffn_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation: str = "gelu"
    norm_first: bool = True
    positional: str = "learned"
    max_positions: int = 1024
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    pad_id: int = 0
    eos_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "ffn_dim", "max_positions"):
            _int(name, getattr(self, name))
        if self.kv_heads is not None:
            _int("kv_heads", self.kv_heads)
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            setattr(self, name, _probability(name, getattr(self, name)))
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("positional", self.positional, POSITIONALS)
        for name in ("norm_first", "tie_embeddings"):
            _bool(name, getattr(self, name))
        self.layer_norm_eps = _positive_float("layer_norm_eps", self.layer_norm_eps)
        _heads(self.d_model, self.num_heads, self.kv_heads, self.positional)
        _id("pad_id", self.pad_id, "vocab_size", self.vocab_size)
        if self.eos_id is not None:
            _id("eos_id", self.eos_id, "vocab_size", self.vocab_size)


@dataclass
class EncoderConfig(_Config):
    """A BERT-style encoder (:class:`~qkv.models.TransformerEncoder`); field names as Hugging Face's ``BertConfig``.

    Attributes:
        vocab_size: vocabulary size.
        hidden_size: ``E``.
        num_hidden_layers: number of layers.
        num_attention_heads: attention heads; must divide ``hidden_size``.
        intermediate_size: feed-forward hidden width.
        hidden_act: ``"gelu"`` (BERT) or ``"relu"``.
        hidden_dropout_prob: embedding and residual dropout.
        attention_probs_dropout_prob: dropout on the attention weights.
        max_position_embeddings: the number of learned positions.
        type_vocab_size: the number of token types (segments).
        layer_norm_eps: LayerNorm epsilon.
        pad_token_id: the padding token (its embedding gets no gradient, as in BERT).
    """

    vocab_size: int
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            _int(name, getattr(self, name))
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            setattr(self, name, _probability(name, getattr(self, name)))
        _choice("hidden_act", self.hidden_act, ACTIVATIONS)
        self.layer_norm_eps = _positive_float("layer_norm_eps", self.layer_norm_eps)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be a multiple of num_attention_heads={self.num_attention_heads}"
            )
        _id("pad_token_id", self.pad_token_id, "vocab_size", self.vocab_size)
