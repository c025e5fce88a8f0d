"""``RNNSeq2Seq``: a bidirectional GRU/LSTM encoder and an attentional GRU/LSTM decoder.

The architecture of Luong, Pham & Manning (2015), as JoeyNMT and OpenNMT build it:

* **Encoder**: embeddings → a bidirectional RNN over packed sequences (padding never enters the
  recurrence). Each direction has ``hidden_dim / 2`` units, so ``memory (B, S, hidden_dim)`` has the
  decoder's width and Luong's ``dot`` score needs no projection.
* **Bridge**: the final forward and backward states of each layer, concatenated, through
  ``tanh(Linear)`` give the decoder's initial state (for an LSTM, its hidden and cell states).
* **Decoder**, for each target position ``t``::

      x_t  = [emb(y_{t-1}); h̃_{t-1}]            (input feeding; x_t = emb(y_{t-1}) without it)
      h_t  = RNN(x_t, h_{t-1})                   (top layer's output)
      c_t, a_t = attention(h_t, memory)          (key_lengths = src_lengths masks the padding)
      h̃_t = tanh(W_c [c_t; h_t])                (the attentional hidden state, h̃_0 = 0)
      logits_t = W_out h̃_t

  ``attention="bahdanau"`` scores with :class:`~qkv.nn.AdditiveAttention`, whose key projection is
  computed once per source in :meth:`RNNSeq2Seq.encode`; ``"luong_dot"`` and ``"luong_general"`` with
  :class:`~qkv.nn.LuongAttention`. As in JoeyNMT, the attention type changes the score only: the query is
  the new state ``h_t`` in every case (Bahdanau's paper queries with ``h_{t-1}``).

Attention capture follows :mod:`qkv.models.interface`: ``cross_attention (B, 1, 1, T, S)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from qkv.checks import ConfigError, StrictConfig, boolean, int_at_least, one_of, option, probability, required
from qkv.models.config import check_token_ids
from qkv.models.interface import DecoderOutput, EncoderOutput
from qkv.nn import AdditiveAttention, LuongAttention
from qkv.nn.kv_cache import check_row_indices
from qkv.ops.spec import is_integer_tensor

CELLS = ("gru", "lstm")
ATTENTIONS = ("bahdanau", "luong_dot", "luong_general")


@dataclass
class RNNConfig(StrictConfig):
    """Hyper-parameters of :class:`RNNSeq2Seq`.

    Attributes:
        src_vocab_size, tgt_vocab_size: vocabulary sizes.
        embed_dim: width of the source and target embeddings.
        hidden_dim: decoder state width and encoder output width (each encoder direction has half); even.
        layers: number of stacked RNN layers, in the encoder and in the decoder.
        cell: ``"gru"`` or ``"lstm"``.
        attention: ``"bahdanau"`` (additive), ``"luong_dot"`` or ``"luong_general"``.
        input_feeding: feed the previous attentional vector ``h̃_{t-1}`` to the decoder with the next token.
        dropout: on embeddings, between RNN layers and on the attentional vector (training only).
        pad_id, bos_id, eos_id: special token ids (``pad_id`` in both vocabularies).
    """

    src_vocab_size: int = required(int_at_least)
    tgt_vocab_size: int = required(int_at_least)
    embed_dim: int = option(256, int_at_least)
    hidden_dim: int = option(512, int_at_least)
    layers: int = option(1, int_at_least)
    cell: str = option("gru", one_of, CELLS)
    attention: str = option("bahdanau", one_of, ATTENTIONS)
    input_feeding: bool = option(True, boolean)
    dropout: float = option(0.0, probability)
    pad_id: int = option(0, int_at_least, 0)
    bos_id: int = option(1, int_at_least, 0)
    eos_id: int = option(2, int_at_least, 0)

    def check(self, prefix: str) -> None:
        if self.hidden_dim % 2:
            raise ConfigError(
                f"hidden_dim must be even (each encoder direction has hidden_dim / 2 units); got {self.hidden_dim}"
            )
        check_token_ids("src_vocab_size", self.src_vocab_size, pad_id=self.pad_id)
        check_token_ids(
            "tgt_vocab_size", self.tgt_vocab_size, pad_id=self.pad_id, bos_id=self.bos_id, eos_id=self.eos_id
        )
        if len({self.pad_id, self.bos_id, self.eos_id}) != 3:
            raise ConfigError(f"pad_id, bos_id and eos_id must differ; got {self.pad_id}, {self.bos_id}, {self.eos_id}")


@dataclass
class RNNDecoderState:
    """Incremental state of :class:`RNNSeq2Seq`'s decoder.

    Attributes:
        hidden: ``(layers, B, hidden_dim)`` RNN hidden state.
        cell: ``(layers, B, hidden_dim)`` LSTM cell state, ``None`` for a GRU.
        attentional: ``(B, hidden_dim)`` the last attentional vector ``h̃`` (zeros before the first step).
        steps: number of target tokens decoded so far.
    """

    hidden: torch.Tensor
    cell: torch.Tensor | None
    attentional: torch.Tensor
    steps: int = 0

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[1]

    def reorder(self, indices: torch.Tensor) -> None:
        """Keep batch rows ``indices (B_new,)`` (in that order; rows may repeat), in place."""
        indices = check_row_indices(indices, self.batch_size).to(self.hidden.device)
        self.hidden = self.hidden.index_select(1, indices)
        if self.cell is not None:
            self.cell = self.cell.index_select(1, indices)
        self.attentional = self.attentional.index_select(0, indices)


class RNNSeq2Seq(nn.Module):
    """Attentional RNN encoder-decoder implementing :class:`~qkv.models.interface.Seq2SeqModel`.

    Args:
        config: an :class:`RNNConfig`.

    Parameters: ``src_embed``, ``tgt_embed``, ``encoder_rnn``, ``bridge_hidden`` (and ``bridge_cell`` for an
    LSTM), ``decoder_rnn``, ``attention``, ``attentional_layer`` (``W_c``, no bias, as in Luong's
    paper), ``output_layer``.
    """

    model_type: ClassVar[str] = "rnn"

    def __init__(self, config: RNNConfig) -> None:
        super().__init__()
        if not isinstance(config, RNNConfig):
            raise TypeError(f"config must be an RNNConfig; got {type(config).__name__}")
        self.config = config
        c = config
        rnn_class = nn.GRU if c.cell == "gru" else nn.LSTM
        between = c.dropout if c.layers > 1 else 0.0
        self.src_embed = nn.Embedding(c.src_vocab_size, c.embed_dim, padding_idx=c.pad_id)
        self.tgt_embed = nn.Embedding(c.tgt_vocab_size, c.embed_dim, padding_idx=c.pad_id)
        self.encoder_rnn = rnn_class(
            c.embed_dim, c.hidden_dim // 2, c.layers, batch_first=True, bidirectional=True, dropout=between
        )
        self.bridge_hidden = nn.Linear(c.hidden_dim, c.hidden_dim)
        self.bridge_cell = nn.Linear(c.hidden_dim, c.hidden_dim) if c.cell == "lstm" else None
        decoder_input = c.embed_dim + (c.hidden_dim if c.input_feeding else 0)
        self.decoder_rnn = rnn_class(decoder_input, c.hidden_dim, c.layers, batch_first=True, dropout=between)
        if c.attention == "bahdanau":
            self.attention: nn.Module = AdditiveAttention(c.hidden_dim, c.hidden_dim, c.hidden_dim)
        else:
            self.attention = LuongAttention(c.hidden_dim, c.hidden_dim, score=c.attention.removeprefix("luong_"))
        self.attentional_layer = nn.Linear(2 * c.hidden_dim, c.hidden_dim, bias=False)
        self.output_layer = nn.Linear(c.hidden_dim, c.tgt_vocab_size)
        self.dropout = nn.Dropout(c.dropout)

    @property
    def pad_id(self) -> int:
        return self.config.pad_id

    @property
    def bos_id(self) -> int:
        return self.config.bos_id

    @property
    def eos_id(self) -> int:
        return self.config.eos_id

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor, *, need_attention: bool = False) -> EncoderOutput:
        """Run the bidirectional encoder.

        Args:
            src: ``(B, S)`` token ids, padded with anything after ``src_lengths[b]``.
            src_lengths: integer ``(B,)`` in ``[1, S]``.
            need_attention: ignored (an RNN encoder has no self-attention).

        Returns:
            ``memory (B, S, hidden_dim)`` (zeros at padding) and ``extras``: ``final_hidden``
            ``(B, layers, hidden_dim)`` (forward and backward final states side by side), ``final_cell``
            for an LSTM, and ``projected_keys (B, S, hidden_dim)`` for Bahdanau attention.
        """
        _check_tokens("src", src, self.config.src_vocab_size)
        _check_lengths(src_lengths, src)
        embedded = self.dropout(self.src_embed(src))
        packed = pack_padded_sequence(embedded, src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        outputs, final = self.encoder_rnn(packed)
        memory, _ = pad_packed_sequence(outputs, batch_first=True, total_length=src.shape[1])
        extras: dict[str, torch.Tensor] = {}
        if isinstance(final, tuple):
            extras["final_hidden"] = self._join_directions(final[0])
            extras["final_cell"] = self._join_directions(final[1])
        else:
            extras["final_hidden"] = self._join_directions(final)
        if isinstance(self.attention, AdditiveAttention):
            extras["projected_keys"] = self.attention.precompute_keys(memory)
        return EncoderOutput(memory=memory, src_lengths=src_lengths.to(memory.device), extras=extras)

    def _join_directions(self, final: torch.Tensor) -> torch.Tensor:
        """``(layers·2, B, hidden_dim/2)`` → ``(B, layers, hidden_dim)``, forward then backward per layer."""
        batch = final.shape[1]
        final = final.view(self.config.layers, 2, batch, self.config.hidden_dim // 2)
        return final.permute(2, 0, 1, 3).reshape(batch, self.config.layers, self.config.hidden_dim)

    def start_state(self, encoder_out: EncoderOutput) -> RNNDecoderState:
        """The decoder's initial state: ``tanh(bridge(final encoder state))`` per layer, ``h̃_0 = 0``."""
        hidden = torch.tanh(self.bridge_hidden(encoder_out.extras["final_hidden"])).transpose(0, 1).contiguous()
        cell = None
        if self.bridge_cell is not None:
            cell = torch.tanh(self.bridge_cell(encoder_out.extras["final_cell"])).transpose(0, 1).contiguous()
        attentional = hidden.new_zeros(hidden.shape[1], self.config.hidden_dim)
        return RNNDecoderState(hidden=hidden, cell=cell, attentional=attentional)

    def decode_step(
        self,
        tokens: torch.Tensor,
        encoder_out: EncoderOutput,
        state: RNNDecoderState,
        *,
        need_attention: bool = False,
    ) -> DecoderOutput:
        """Decode ``tokens (B, T)`` after what ``state`` holds; ``state`` is updated in place.

        With input feeding the ``T`` positions run one at a time (each needs the previous ``h̃``); without
        it the RNN runs over the ``T`` tokens in one call and attention over all of them at once.

        Returns:
            ``logits (B, T, tgt_vocab_size)`` and, if ``need_attention``, ``cross_attention (B, 1, 1, T, S)``.
        """
        _check_tokens("tokens", tokens, self.config.tgt_vocab_size)
        if not isinstance(state, RNNDecoderState):
            raise TypeError(f"state must be an RNNDecoderState (from start_state); got {type(state).__name__}")
        batch = encoder_out.memory.shape[0]
        if tokens.shape[0] != batch or state.batch_size != batch:
            raise ValueError(
                f"tokens has batch size {tokens.shape[0]}, the state {state.batch_size} and the encoder output "
                f"{batch}; they must be equal (reorder the state and the encoder output together)"
            )
        embedded = self.dropout(self.tgt_embed(tokens))
        hx = state.hidden if state.cell is None else (state.hidden, state.cell)
        if self.config.input_feeding:
            vectors, weights = [], []
            for t in range(tokens.shape[1]):
                step_input = torch.cat([embedded[:, t], state.attentional], dim=-1).unsqueeze(1)
                top, hx = self.decoder_rnn(step_input, hx)
                vector, w = self._attend(top, encoder_out)
                state.attentional = vector[:, 0]
                vectors.append(vector)
                weights.append(w)
            attentional, attention = torch.cat(vectors, dim=1), torch.cat(weights, dim=1)
        else:
            top, hx = self.decoder_rnn(embedded, hx)
            attentional, attention = self._attend(top, encoder_out)
            state.attentional = attentional[:, -1]
        if isinstance(hx, tuple):  # an LSTM's (hidden, cell); a GRU's hidden alone
            state.hidden, state.cell = hx
        else:
            state.hidden = hx
        state.steps += tokens.shape[1]
        logits = self.output_layer(attentional)
        cross = attention[:, None, None] if need_attention else None
        return DecoderOutput(logits=logits, cross_attention=cross)

    def _attend(self, query: torch.Tensor, encoder_out: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """``query (B, T, H)`` → attentional vectors ``tanh(W_c [c; h]) (B, T, H)`` and weights ``(B, T, S)``."""
        kwargs: dict[str, torch.Tensor] = {}
        if "projected_keys" in encoder_out.extras:
            kwargs["projected_keys"] = encoder_out.extras["projected_keys"]
        context, weights = self.attention(query, encoder_out.memory, key_lengths=encoder_out.src_lengths, **kwargs)
        vector = torch.tanh(self.attentional_layer(torch.cat([context, query], dim=-1)))
        return self.dropout(vector), weights

    def forward(
        self, src: torch.Tensor, src_lengths: torch.Tensor, tgt: torch.Tensor, *, need_attention: bool = False
    ) -> DecoderOutput:
        """Teacher-forced: ``tgt (B, T)`` decoder inputs (``bos_id`` first) → ``logits (B, T, tgt_vocab_size)`` and,
        if ``need_attention``, ``cross_attention (B, 1, 1, T, S)``."""
        encoder_out = self.encode(src, src_lengths)
        if not isinstance(tgt, torch.Tensor) or tgt.ndim != 2 or tgt.shape[0] != src.shape[0]:
            got = tuple(tgt.shape) if isinstance(tgt, torch.Tensor) else type(tgt).__name__
            raise ValueError(f"tgt must have shape (B, T) with B={src.shape[0]} as src; got {got}")
        return self.decode_step(tgt, encoder_out, self.start_state(encoder_out), need_attention=need_attention)


def _check_tokens(name: str, tokens: object, vocab: int) -> None:
    """``tokens`` must be a non-empty integer ``(B, T)`` tensor with ids in ``[0, vocab)``."""
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
        got = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{name} must be an integer (int64 or int32) tensor of token ids (B, T); got {got}")
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise ValueError(f"{name} must have shape (B, T) with B, T >= 1; got {tuple(tokens.shape)}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"{name} ids must lie in [0, {vocab}); got values from {low} to {high}")


def _check_lengths(lengths: object, src: torch.Tensor) -> None:
    """``lengths`` must be an integer ``(B,)`` tensor in ``[1, S]``."""
    if not is_integer_tensor(lengths):
        got = lengths.dtype if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"src_lengths must be an integer tensor of shape (B,); got {got}")
    batch, src_len = src.shape
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"src_lengths must have shape (B,) = ({batch},); got {tuple(lengths.shape)}")
    low, high = int(lengths.min()), int(lengths.max())
    if low < 1 or high > src_len:
        raise ValueError(f"src_lengths must lie in [1, S={src_len}]; got values from {low} to {high}")
