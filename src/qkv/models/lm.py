"""``TransformerLM``: a decoder-only causal language model (GPT-2-like), with KV-cached sampling.

Parameter names::

    embed_tokens.weight        (vocab_size, E)
    embed_positions.weight     (max_positions, E)      positional="learned" only
    layers.{i}.*               qkv.nn.TransformerEncoderLayer, run with causal=True (and config.window)
    norm.*                     norm_first=True only
    lm_head.weight             (vocab_size, E)         = embed_tokens.weight when tied

Weights are initialized as GPT-2's: ``N(0, 0.02²)`` for embeddings and linear weights, zero biases.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qkv.checks import ConfigError, int_at_least, non_negative_number, number_between, optional
from qkv.models.config import LMConfig
from qkv.models.interface import DecoderOutput
from qkv.models.transformer import (
    add_positions,
    check_lengths,
    check_positions,
    check_tokens,
    positional_modules,
    stack_layers,
)
from qkv.nn import KVCache, LearnedPositionalEmbedding, TransformerEncoderLayer


@dataclass
class LMState:
    """Per-layer self-attention caches of an incremental decode, and the position of the next token."""

    caches: list[KVCache]
    position: int = 0

    def reorder(self, indices: torch.Tensor) -> None:
        """Keep batch rows ``indices`` (in that order) of every cache, in place."""
        for cache in self.caches:
            cache.reorder(indices)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row from ``logits (B, V)``: ``(B,)`` ids.

    ``temperature == 0`` is greedy (argmax). Otherwise the logits are divided by ``temperature``, restricted
    to the ``top_k`` largest (ties at the k-th value kept) and then to the smallest set of most probable
    tokens whose probability reaches ``top_p`` (nucleus sampling; the most probable token always stays),
    and a token is drawn with ``torch.multinomial`` from ``generator``.
    """
    check_sampling(temperature, top_k, top_p)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (B, V); got {tuple(logits.shape)}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the more probable tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def check_sampling(temperature: object, top_k: object, top_p: object) -> None:
    """Errors naming the sampling argument that is out of range."""
    non_negative_number("temperature", temperature, expected="a finite number >= 0 (0 = greedy)")
    optional(int_at_least)("top_k", top_k, 1, expected="a positive int or None")
    if top_p is not None:
        # (0, 1]: the closed interval first (types, NaN), then the open end.
        number_between("top_p", top_p, 0.0, 1.0, expected="in (0, 1] or None")
        if top_p == 0:
            raise ConfigError(f"top_p must be in (0, 1] or None; got {top_p!r} (keeps no token)")


class TransformerLM(nn.Module):
    """Decoder-only Transformer language model.

    Args:
        config: an :class:`~qkv.models.LMConfig`.

    Example::

        lm = TransformerLM(LMConfig(vocab_size=100, d_model=64, num_heads=4, num_layers=2)).eval()
        logits = lm(tokens)  # tokens: (B, T) → (B, T, V)
        text = lm.generate(prompt, 20, temperature=0.8, top_p=0.9)
    """

    model_type = "transformer_lm"

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        if not isinstance(config, LMConfig):
            raise TypeError(f"config must be an LMConfig; got {type(config).__name__}")
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.embed_positions, rotary = positional_modules(c.positional, c.d_model, c.num_heads, c.max_positions)
        self.dropout = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(
                c.d_model,
                c.num_heads,
                c.ffn_dim,
                kv_heads=c.kv_heads,
                dropout=c.dropout,
                attention_dropout=c.attention_dropout,
                activation_dropout=c.activation_dropout,
                activation=c.activation,
                norm_first=c.norm_first,
                layer_norm_eps=c.layer_norm_eps,
                rotary=rotary,
            )
            for _ in range(c.num_layers)
        )
        self.norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps) if c.norm_first else None
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        # Bottom-right aligned like causal, so a KV-cached step sees the keys a full forward would.
        self.window = None if c.window is None else (c.window, 0)
        self.apply(_init_gpt2)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def start_state(self) -> LMState:
        """Empty caches (one per layer) for :meth:`decode_step`."""
        return LMState(caches=[KVCache() for _ in self.layers])

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens (B, T)`` → next-token ``logits (B, T, V)`` (no cache).

        ``lengths (B,)``: real tokens per row of a right-padded batch. Causal attention already keeps
        padding out of the real positions, so this changes only the logits at padded positions (which
        then attend to real tokens only); a loss should ignore those.
        """
        tokens = check_tokens("tokens", tokens, self.config.vocab_size)
        if lengths is not None:
            lengths = check_lengths("lengths", lengths, tokens.shape[0], tokens.shape[1]).to(tokens.device)
        return self._run(tokens, None, lengths, need_attention=False).logits

    def decode_step(self, tokens: torch.Tensor, state: LMState, *, need_attention: bool = False) -> DecoderOutput:
        """Feed ``tokens (B, T)``, the positions after those in ``state`` (updated in place).

        Returns:
            :class:`DecoderOutput`: ``logits (B, T, V)``; with ``need_attention``, ``self_attention
            (B, layers, heads, T, T_total)``, ``T_total`` = ``state.position`` after the step.
        """
        if not isinstance(state, LMState):
            raise TypeError(f"state must be an LMState (from start_state); got {type(state).__name__}")
        tokens = check_tokens("tokens", tokens, self.config.vocab_size)
        out = self._run(tokens, state, None, need_attention)
        state.position += tokens.shape[1]
        return out

    def _run(
        self, tokens: torch.Tensor, state: LMState | None, lengths: torch.Tensor | None, need_attention: bool
    ) -> DecoderOutput:
        if state is not None and state.caches and state.caches[0].k is not None:
            cached = state.caches[0].k.shape[0]
            if cached != tokens.shape[0]:
                raise ValueError(f"tokens has batch size {tokens.shape[0]} but the state holds {cached}")
        offset = 0 if state is None else state.position
        check_positions("tokens", self.embed_positions, offset + tokens.shape[1])
        x = self.dropout(add_positions(self.embed_tokens(tokens), self.embed_positions, offset))
        weights = []
        for i, layer in enumerate(self.layers):
            x, w = layer(
                x,
                key_lengths=lengths,
                causal=True,
                window=self.window,
                cache=None if state is None else state.caches[i],
                need_weights=need_attention,
            )
            weights.append(w)
        if self.norm is not None:
            x = self.norm(x)
        return DecoderOutput(logits=self.lm_head(x), self_attention=stack_layers(weights))

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        eos_id: int | None = None,
        suppress_ids: Sequence[int] = (),
    ) -> torch.Tensor:
        """Continue ``prompt (B, T0)`` by up to ``max_new_tokens`` tokens: ``(B, T0 + n)``, ``n <= max_new_tokens``.

        Each step feeds only the newest token through the KV caches (:meth:`stream` yields them one step at
        a time). See :func:`sample_next` for ``temperature`` (0 = greedy), ``top_k``, ``top_p`` and
        ``generator``. After a row samples ``eos_id`` (default ``config.eos_id``), it gets
        ``config.pad_id``; generation stops early once every row has ended. ``suppress_ids`` are never
        sampled (e.g. special ids a model trained on running text never saw as targets). Dropout stays as
        the module's mode has it: call ``.eval()`` first.
        """
        steps = self.stream(
            prompt,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            eos_id=eos_id,
            suppress_ids=suppress_ids,
        )
        return torch.cat([prompt, *(token[:, None] for token in steps)], dim=1)

    def stream(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        eos_id: int | None = None,
        suppress_ids: Sequence[int] = (),
    ) -> Iterator[torch.Tensor]:
        """The tokens :meth:`generate` appends to ``prompt (B, T0)``, one ``(B,)`` tensor per step, each
        yielded as soon as it is sampled (so a caller can print it). Arguments as :meth:`generate`; they are
        checked before the first token (the iterator raises on its first ``next``)."""
        check_sampling(temperature, top_k, top_p)
        prompt = check_tokens("prompt", prompt, self.config.vocab_size, shape="(B, T0)")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
        eos_id = self.config.eos_id if eos_id is None else eos_id
        if eos_id is not None and not 0 <= eos_id < self.config.vocab_size:
            raise ValueError(f"eos_id={eos_id} must be in [0, vocab_size={self.config.vocab_size})")
        suppress = [int(i) for i in suppress_ids]
        if any(not 0 <= i < self.config.vocab_size for i in suppress):
            raise ValueError(f"suppress_ids must be ids in [0, vocab_size={self.config.vocab_size}); got {suppress}")
        if max_new_tokens == 0:
            return iter(())
        if isinstance(self.embed_positions, LearnedPositionalEmbedding):
            fed = prompt.shape[1] + max_new_tokens - 1  # the last sampled token is never fed
            check_positions("prompt + max_new_tokens - 1", self.embed_positions, fed)
        return self._sample(prompt, max_new_tokens, temperature, top_k, top_p, generator, eos_id, suppress)

    def _sample(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        generator: torch.Generator | None,
        eos_id: int | None,
        suppress: list[int],
    ) -> Iterator[torch.Tensor]:
        with torch.no_grad():
            state = self.start_state()
            logits = self.decode_step(prompt, state).logits[:, -1]
            finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
            for step in range(max_new_tokens):
                if suppress:
                    logits[:, suppress] = float("-inf")
                token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
                if eos_id is not None:
                    token = token.masked_fill(finished, self.config.pad_id)
                    finished |= token == eos_id
                yield token
                if step == max_new_tokens - 1 or bool(finished.all()):
                    return
                logits = self.decode_step(token[:, None], state).logits[:, -1]


def _init_gpt2(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding, LearnedPositionalEmbedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
