"""Fixtures shared by every test directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from qkv.data.tokenizer import CharTokenizer
from qkv.models import TransformerConfig, TransformerSeq2Seq
from qkv.train.translate import Translator

TINY_ALPHABET = "abcdefghij ,.0123456789"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test. Tiny models are overhead-bound: extra threads only add hand-offs,
    and on a busy 2-core machine they make such tests up to ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_translator() -> Translator:
    """A tiny random translation model whose outputs differ from input to input: 16 wide, one layer each side,
    character tokens of :data:`TINY_ALPHABET`, weights N(0, 0.3) (the default initialization gives nearly the
    same output for every input, which would hide a result handed to the wrong request)."""
    tokenizer = CharTokenizer.train([TINY_ALPHABET])
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
    """:func:`tiny_translator`, once per test module."""
    return tiny_translator()
