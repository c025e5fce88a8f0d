"""The prompt side of text to image: words → token ids (a closed vocabulary, no ``<unk>``) → vectors.

::

    tokens, lengths = encode_prompts(["a red circle", "a blue square above a red circle"], vocabulary, 16)
    memory = PromptEncoder(len(vocabulary), 16, 128, 4, 512, layers=2, eps=1e-6)(tokens, lengths)  # (B, 1 + S, E)

A prompt is lower-cased and split on whitespace; every word must be in the model's vocabulary (a word
outside it is an error naming it and listing the vocabulary: the model has never seen it, so there is
nothing sensible to draw). Prompts of different lengths are padded with id 0 and their ``lengths`` mask the
padding wherever it is read, so the vocabulary needs no padding token either.
"""

from __future__ import annotations

import torch
from torch import nn

from qkv.checks import ConfigError, text
from qkv.nn import TransformerEncoderLayer


def prompt_words(prompt: object) -> list[str]:
    """The words of a prompt: lower-cased, split on whitespace. ``ConfigError`` for an empty prompt."""
    return text("prompt", prompt).lower().split()


def encode_prompts(prompts: list[str], vocabulary: list[str], max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts → ``(tokens (B, S) int64, lengths (B,) int64)``, ``S`` the longest; padding ids are 0 (masked).

    Raises:
        ConfigError: an empty prompt, a word outside ``vocabulary`` (the message lists the vocabulary), or
            more than ``max_words`` words.
    """
    index = {word: i for i, word in enumerate(vocabulary)}
    rows = []
    for prompt in prompts:
        words = prompt_words(prompt)
        unknown = [w for w in dict.fromkeys(words) if w not in index]
        if unknown:
            raise ConfigError(
                f"prompt {prompt!r} has word(s) outside the model's vocabulary: {', '.join(map(repr, unknown))}; "
                f"the model knows: {' '.join(vocabulary)}"
            )
        if len(words) > max_words:
            raise ConfigError(f"prompt {prompt!r} has {len(words)} words; the model takes at most {max_words}")
        rows.append([index[w] for w in words])
    if not rows:
        raise ConfigError("prompts must hold at least one prompt; got none")
    tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    return tokens, torch.tensor([len(r) for r in rows], dtype=torch.long)


DIRECTIONS = ("bidirectional", "causal", "anticausal")  # which words a word reads in the encoder layers


class PromptEncoder(nn.Module):
    """Words → ``(B, 1 + S, E)``: the start token, then the words' embeddings and learned positions through
    pre-LN encoder layers and a final LayerNorm.

    The start token is one learned vector, key 0 of every prompt and, alone, the null prompt of
    classifier-free guidance. It gives a patch somewhere to put the attention that no word claims (the
    background's), as CLIP's start token does in Stable Diffusion, so that a word's cross-attention is spent
    where the word acts.

    Args:
        vocab_size: ``V``. max_words: the longest prompt. d_model: ``E``. num_heads, ffn_dim, layers, eps: the
            encoder layers' heads, feed-forward width, count (0: none) and LayerNorm epsilon.
        direction: which words a word reads in the encoder layers: ``"bidirectional"`` (all), ``"causal"``
            (itself and those before it, as CLIP's text encoder: a noun has read its adjectives) or
            ``"anticausal"`` (itself and those after it: an adjective has read its noun; a sliding ``window``
            of ``(0, S)`` in :func:`qkv.attention`).

    Attributes:
        embed_tokens: ``(V, E)``. embed_positions: ``(max_prompt_words, E)``.
        layers: ``text_layers`` :class:`~qkv.nn.TransformerEncoderLayer` s. norm: the final LayerNorm.
        start: ``(1, E)``, the start token.
    """

    def __init__(
        self,
        vocab_size: int,
        max_words: int,
        d_model: int,
        num_heads: int,
        ffn_dim: int,
        layers: int,
        eps: float,
        *,
        direction: str = "bidirectional",
    ) -> None:
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}")
        self.direction = direction
        self.embed_tokens = nn.Embedding(vocab_size, d_model)
        self.embed_positions = nn.Embedding(max_words, d_model)
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(
                d_model, num_heads, ffn_dim, dropout=0.0, activation="gelu", norm_first=True, layer_norm_eps=eps
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.start = nn.Parameter(torch.zeros(1, d_model))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``tokens (B, S)`` ids, ``lengths (B,)`` words per prompt → ``(B, 1 + S, E)``: the start token, then
        the words (rows past ``1 + lengths[b]`` are padding: masked wherever they are read)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed_tokens(tokens) + self.embed_positions(positions)
        window = (0, tokens.shape[1]) if self.direction == "anticausal" else None
        for layer in self.layers:
            x, _ = layer(x, key_lengths=lengths, causal=self.direction == "causal", window=window)
        words: torch.Tensor = self.norm(x)
        return torch.cat([self.start.expand(tokens.shape[0], 1, -1).to(words.dtype), words], dim=1)
