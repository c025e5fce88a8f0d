"""A tiny random translation model whose outputs differ from input to input."""

from __future__ import annotations

import pytest
import torch

from qkv.data.tokenizer import CharTokenizer
from qkv.models import TransformerConfig, TransformerSeq2Seq
from qkv.train.translate import Translator

ALPHABET = "abcdefghij ,.0123456789"


def tiny_translator() -> Translator:
    """16 wide, one layer each side, weights N(0, 0.3): the default initialization gives nearly the same
    output for every input, which would hide a result handed to the wrong request."""
    tokenizer = CharTokenizer.train([ALPHABET])
    v = tokenizer.vocab_size
    torch.manual_seed(0)
    config = TransformerConfig(
        src_vocab_size=v, tgt_vocab_size=v, d_model=16, num_heads=2, encoder_layers=1, decoder_layers=1, ffn_dim=32
    )
    model = TransformerSeq2Seq(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.3)
    return Translator(model.eval(), tokenizer, tokenizer)


@pytest.fixture(scope="module")
def translator() -> Translator:
    return tiny_translator()
