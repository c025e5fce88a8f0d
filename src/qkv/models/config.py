"""Configurations of the Transformer models: small dataclasses, validated on construction.

``Config.from_dict(d)`` builds one from a parsed JSON/YAML mapping and rejects unknown keys (naming them
and the valid ones), so a typo in a config file is an error, not a silently ignored option;
``config.to_dict()`` is the inverse (what ``config.json`` of a checkpoint holds). Both come from
:class:`qkv.checks.StrictConfig`; each field declares its check, and ``check`` holds those across fields.

:class:`EncoderConfig` uses the field names of Hugging Face's ``BertConfig``, so a BERT ``config.json``
maps onto it key for key.
"""

from __future__ import annotations

from dataclasses import dataclass

from qkv.checks import (
    ConfigError,
    StrictConfig,
    boolean,
    int_at_least,
    one_of,
    option,
    optional,
    positive_number,
    probability,
    required,
)
from qkv.nn.transformer_layers import ACTIVATIONS

POSITIONALS = ("sinusoidal", "learned", "rotary")


def _heads(d_model: int, num_heads: int, kv_heads: int | None, positional: str | None = None) -> None:
    """Cross-field checks of the attention geometry (names as in the seq2seq and LM configs)."""
    if d_model % num_heads:
        raise ConfigError(f"d_model={d_model} must be a multiple of num_heads={num_heads}")
    if kv_heads is not None and num_heads % kv_heads:
        raise ConfigError(f"num_heads={num_heads} must be a multiple of kv_heads={kv_heads}")
    if positional == "sinusoidal" and d_model % 2:
        raise ConfigError(f"sinusoidal positions need an even d_model; got d_model={d_model}")
    if positional == "rotary" and (d_model // num_heads) % 2:
        raise ConfigError(
            f"rotary positions need an even head dimension; got d_model/num_heads = {d_model}/{num_heads} "
            f"= {d_model // num_heads}"
        )


def check_token_ids(vocab_name: str, vocab_size: int, **ids: int | None) -> None:
    """Cross-field check: each special token id of ``ids`` (an int >= 0, or ``None`` for unset) is below
    ``vocab_size``; the message names the id and the vocabulary (``eos_id=40 must be < tgt_vocab_size=30``)."""
    for name, value in ids.items():
        if value is not None and value >= vocab_size:
            raise ConfigError(f"{name}={value} must be < {vocab_name}={vocab_size}")


@dataclass
class TransformerConfig(StrictConfig):
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

    src_vocab_size: int = required(int_at_least)
    tgt_vocab_size: int = required(int_at_least)
    d_model: int = option(512, int_at_least)
    num_heads: int = option(8, int_at_least)
    kv_heads: int | None = option(None, optional(int_at_least))
    encoder_layers: int = option(6, int_at_least)
    decoder_layers: int = option(6, int_at_least)
    ffn_dim: int = option(2048, int_at_least)
    dropout: float = option(0.1, probability)
    attention_dropout: float = option(0.0, probability)
    activation_dropout: float = option(0.0, probability)
    activation: str = option("relu", one_of, ACTIVATIONS)
    norm_first: bool = option(False, boolean)
    positional: str = option("sinusoidal", one_of, POSITIONALS)
    max_positions: int = option(1024, int_at_least)
    tie_embeddings: bool = option(True, boolean)
    shared_vocab: bool = option(False, boolean)
    layer_norm_eps: float = option(1e-5, positive_number)
    pad_id: int = option(0, int_at_least, 0)
    bos_id: int = option(1, int_at_least, 0)
    eos_id: int = option(2, int_at_least, 0)

    def check(self, prefix: str) -> None:
        _heads(self.d_model, self.num_heads, self.kv_heads, self.positional)
        if self.shared_vocab and self.src_vocab_size != self.tgt_vocab_size:
            raise ConfigError(
                f"shared_vocab=True needs src_vocab_size == tgt_vocab_size; got {self.src_vocab_size} and "
                f"{self.tgt_vocab_size}"
            )
        check_token_ids("src_vocab_size", self.src_vocab_size, pad_id=self.pad_id)
        check_token_ids(
            "tgt_vocab_size", self.tgt_vocab_size, pad_id=self.pad_id, bos_id=self.bos_id, eos_id=self.eos_id
        )


@dataclass
class LMConfig(StrictConfig):
    """A decoder-only causal language model (:class:`~qkv.models.TransformerLM`), GPT-2-like defaults.

    Attributes:
        vocab_size: vocabulary size.
        d_model, num_heads, kv_heads, ffn_dim, dropout, attention_dropout, activation_dropout, activation,
            norm_first, positional, max_positions, layer_norm_eps: as in :class:`TransformerConfig`.
        num_layers: number of layers.
        tie_embeddings: the output projection (``lm_head``) is the token embedding matrix.
        pad_id: the token ``generate`` writes after a row's ``eos_id``.
        eos_id: the default end-of-sequence token of ``generate`` (``None``: none).
        window: sliding-window attention: each token sees itself and at most ``window`` earlier tokens
            (``qkv.attention(window=(window, 0))``, in training and in cached decoding); ``None``: all.
    """

    vocab_size: int = required(int_at_least)
    d_model: int = option(768, int_at_least)
    num_heads: int = option(12, int_at_least)
    kv_heads: int | None = option(None, optional(int_at_least))
    num_layers: int = option(12, int_at_least)
    ffn_dim: int = option(3072, int_at_least)
    dropout: float = option(0.1, probability)
    attention_dropout: float = option(0.0, probability)
    activation_dropout: float = option(0.0, probability)
    activation: str = option("gelu", one_of, ACTIVATIONS)
    norm_first: bool = option(True, boolean)
    positional: str = option("learned", one_of, POSITIONALS)
    max_positions: int = option(1024, int_at_least)
    tie_embeddings: bool = option(True, boolean)
    layer_norm_eps: float = option(1e-5, positive_number)
    pad_id: int = option(0, int_at_least, 0)
    eos_id: int | None = option(None, optional(int_at_least), 0)
    window: int | None = option(None, optional(int_at_least))

    def check(self, prefix: str) -> None:
        _heads(self.d_model, self.num_heads, self.kv_heads, self.positional)
        check_token_ids("vocab_size", self.vocab_size, pad_id=self.pad_id, eos_id=self.eos_id)


@dataclass
class EncoderConfig(StrictConfig):
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

    vocab_size: int = required(int_at_least)
    hidden_size: int = option(768, int_at_least)
    num_hidden_layers: int = option(12, int_at_least)
    num_attention_heads: int = option(12, int_at_least)
    intermediate_size: int = option(3072, int_at_least)
    hidden_act: str = option("gelu", one_of, ACTIVATIONS)
    hidden_dropout_prob: float = option(0.1, probability)
    attention_probs_dropout_prob: float = option(0.1, probability)
    max_position_embeddings: int = option(512, int_at_least)
    type_vocab_size: int = option(2, int_at_least)
    layer_norm_eps: float = option(1e-12, positive_number)
    pad_token_id: int = option(0, int_at_least, 0)

    def check(self, prefix: str) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} must be a multiple of num_attention_heads={self.num_attention_heads}"
            )
        check_token_ids("vocab_size", self.vocab_size, pad_token_id=self.pad_token_id)
