"""``TransformerEncoder``: a BERT-style encoder (token + position + token-type embeddings, post-LN, GELU).

The embeddings carry Hugging Face ``BertModel``'s names exactly (``embeddings.word_embeddings``,
``embeddings.position_embeddings``, ``embeddings.token_type_embeddings``, ``embeddings.LayerNorm``); the
layers are :class:`qkv.nn.TransformerEncoderLayer` under ``encoder.layer.{i}``, whose names differ from
BERT's only inside a layer. :func:`bert_to_qkv_state_dict` and :func:`qkv_to_bert_state_dict` translate::

    BERT  encoder.layer.{i}.                       qkv  encoder.layer.{i}.
          attention.self.query                           self_attn.q_proj
          attention.self.key                             self_attn.k_proj
          attention.self.value                           self_attn.v_proj
          attention.output.dense                         self_attn.out_proj
          attention.output.LayerNorm                     norm1
          intermediate.dense                             linear1
          output.dense                                   linear2
          output.LayerNorm                               norm2

BERT's pooler (``pooler.dense``, a tanh layer on the first token) has no counterpart here; see
:func:`mean_pool` for sentence vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qkv.models.config import EncoderConfig
from qkv.models.transformer import check_lengths, check_positions, check_tokens, stack_layers
from qkv.nn import LearnedPositionalEmbedding, TransformerEncoderLayer
from qkv.nn.multi_head import unstack_projections

BERT_LAYER_NAMES = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "linear1",
    "output.dense": "linear2",
    "output.LayerNorm": "norm2",
}
# In BertModel checkpoints but not part of this model: the pooler, and a buffer of position ids.
BERT_IGNORED_PREFIXES = ("pooler.", "embeddings.position_ids")


@dataclass
class EncoderModelOutput:
    """What :meth:`TransformerEncoder.forward` returns.

    Attributes:
        last_hidden_state: ``(B, L, E)``.
        hidden_states: with ``need_hidden_states``, ``(B, layers + 1, L, E)``: the embeddings' output, then
            each layer's.
        attentions: with ``need_attention``, ``(B, layers, heads, L, L)``.
    """

    last_hidden_state: torch.Tensor
    hidden_states: torch.Tensor | None = None
    attentions: torch.Tensor | None = None


class BertEmbeddings(nn.Module):
    """``LayerNorm(word + position + token_type)``, then dropout; names as BERT's."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        c = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = LearnedPositionalEmbedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids, token_type_ids (B, L)`` → ``(B, L, E)``."""
        x = self.word_embeddings(input_ids) + self.position_embeddings(input_ids.shape[1])
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class _Layers(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        c = config
        self.layer = nn.ModuleList(
            TransformerEncoderLayer(
                c.hidden_size,
                c.num_attention_heads,
                c.intermediate_size,
                dropout=c.hidden_dropout_prob,
                attention_dropout=c.attention_probs_dropout_prob,
                activation=c.hidden_act,
                norm_first=False,
                layer_norm_eps=c.layer_norm_eps,
            )
            for _ in range(c.num_hidden_layers)
        )


class TransformerEncoder(nn.Module):
    """BERT-style encoder-only Transformer.

    Args:
        config: an :class:`~qkv.models.EncoderConfig`.

    Example::

        enc = TransformerEncoder(
            EncoderConfig(
                vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
            )
        ).eval()
        h = enc(input_ids, attention_mask).last_hidden_state  # (B, L, E)
        sentence = mean_pool(h, attention_mask)  # (B, E)
    """

    model_type = "transformer_encoder"

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        if not isinstance(config, EncoderConfig):
            raise TypeError(f"config must be an EncoderConfig; got {type(config).__name__}")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = _Layers(config)
        self.apply(_init_bert)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        lengths: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        need_attention: bool = False,
        need_hidden_states: bool = False,
    ) -> EncoderModelOutput:
        """Encode ``input_ids (B, L)``.

        Args:
            input_ids: ``(B, L)`` token ids.
            attention_mask: ``(B, L)``, ``1``/``True`` = real token, ``0``/``False`` = padding (as in
                BERT; any pattern). Mutually exclusive with ``lengths``.
            lengths: ``(B,)`` real tokens per row of a right-padded batch.
            token_type_ids: ``(B, L)`` segment ids; default all 0.
            need_attention: also return ``attentions (B, layers, heads, L, L)``.
            need_hidden_states: also return ``hidden_states (B, layers + 1, L, E)``.

        Returns:
            :class:`EncoderModelOutput`. Padded positions get hidden states too; ignore them (as
            :func:`mean_pool` does).
        """
        c = self.config
        input_ids = check_tokens("input_ids", input_ids, c.vocab_size, shape="(B, L)")
        batch, length = input_ids.shape
        check_positions("input_ids", self.embeddings.position_embeddings, length)
        if attention_mask is not None and lengths is not None:
            raise ValueError("pass attention_mask or lengths, not both")
        mask = None
        if attention_mask is not None:
            mask = _check_attention_mask(attention_mask, input_ids)[:, None, None, :]
        if lengths is not None:
            lengths = check_lengths("lengths", lengths, batch, length).to(input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        else:
            token_type_ids = check_tokens(
                "token_type_ids", token_type_ids, c.type_vocab_size, shape="(B, L)", vocab_name="type_vocab_size"
            )
            if token_type_ids.shape != input_ids.shape:
                raise ValueError(
                    f"token_type_ids has shape {tuple(token_type_ids.shape)} but input_ids has "
                    f"{tuple(input_ids.shape)}; they must be equal"
                )

        x = self.embeddings(input_ids, token_type_ids)
        hidden, weights = [x], []
        for layer in self.encoder.layer:
            x, w = layer(x, mask=mask, key_lengths=lengths, need_weights=need_attention)
            hidden.append(x)
            weights.append(w)
        return EncoderModelOutput(
            last_hidden_state=x,
            hidden_states=torch.stack(hidden, dim=1) if need_hidden_states else None,
            attentions=stack_layers(weights),
        )


def mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Average ``hidden_states (B, L, E)`` over the real tokens of ``attention_mask (B, L)`` (default all): ``(B, E)``.

    A row without real tokens gives zeros.
    """
    if hidden_states.ndim != 3:
        raise ValueError(f"hidden_states must have shape (B, L, E); got {tuple(hidden_states.shape)}")
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    if tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected (B, L) = "
            f"{tuple(hidden_states.shape[:2])}"
        )
    weights = attention_mask.to(hidden_states.dtype)[..., None]
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def bert_to_qkv_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ``BertModel`` state dict (optionally ``bert.``-prefixed) to this model's names.

    The pooler and ``embeddings.position_ids`` are dropped; any other unknown key is a ``ValueError`` naming it.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in state_dict.items():
        key = name.removeprefix("bert.")
        if key.startswith(BERT_IGNORED_PREFIXES):
            continue
        if key.startswith("embeddings."):
            out[key] = tensor
            continue
        renamed = _rename_layer_key(key, BERT_LAYER_NAMES)
        if renamed is None:
            unknown.append(name)
        else:
            out[renamed] = tensor
    if unknown:
        raise ValueError(f"not BertModel keys this model can take: {', '.join(unknown)}")
    return out


def qkv_to_bert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`bert_to_qkv_state_dict` (no ``bert.`` prefix, no pooler; each fused ``in_proj``
    split into BERT's query, key and value)."""
    inverse = {ours: theirs for theirs, ours in BERT_LAYER_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in unstack_projections(state_dict).items():
        renamed = key if key.startswith("embeddings.") else _rename_layer_key(key, inverse)
        if renamed is None:
            raise ValueError(f"{key!r} is not a TransformerEncoder parameter name")
        out[renamed] = tensor
    return out


def _rename_layer_key(key: str, names: dict[str, str]) -> str | None:
    """``encoder.layer.{i}.{module}.{param}`` with ``module`` renamed by ``names``, or ``None``."""
    parts = key.split(".")
    if len(parts) < 5 or parts[:2] != ["encoder", "layer"] or not parts[2].isdigit():
        return None
    module, param = ".".join(parts[3:-1]), parts[-1]
    if module not in names:
        return None
    return ".".join([*parts[:3], names[module], param])


def _check_attention_mask(attention_mask: object, input_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype.is_floating_point:
        got = attention_mask.dtype if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise TypeError(f"attention_mask must be a bool or 0/1 integer tensor (B, L); got {got}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected (B, L) = {tuple(input_ids.shape)}"
        )
    if attention_mask.dtype != torch.bool:
        if attention_mask.numel() and (int(attention_mask.min()) < 0 or int(attention_mask.max()) > 1):
            raise ValueError("attention_mask must hold 0 (padding) and 1 (real token) only")
        attention_mask = attention_mask.bool()
    return attention_mask.to(input_ids.device)


def _init_bert(module: nn.Module) -> None:
    """BERT's initialization: ``N(0, 0.02²)`` weights, zero biases, the padding embedding zero."""
    if isinstance(module, (nn.Linear, nn.Embedding, LearnedPositionalEmbedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()
