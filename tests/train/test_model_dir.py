"""check_model_directory: a model config and tokenizers that do not belong together are named."""

from __future__ import annotations

import pytest

from qkv.data.tokenizer import CharTokenizer
from qkv.models import TransformerConfig
from qkv.train.model_dir import ModelDirectoryError, check_model_directory


def test_matching_parts_pass_and_a_foreign_tokenizer_is_named() -> None:
    src = CharTokenizer.train(["abc"])
    tgt = CharTokenizer.train(["abcdef"])
    config = TransformerConfig(src_vocab_size=src.vocab_size, tgt_vocab_size=tgt.vocab_size, d_model=8, num_heads=2)
    check_model_directory("run", config, src, tgt)
    with pytest.raises(
        ModelDirectoryError,
        match=rf"run do not belong together: config.json's tgt_vocab_size is {tgt.vocab_size} but the tgt "
        rf"tokenizer has {src.vocab_size} ids",
    ):
        check_model_directory("run", config, src, src)


def test_special_ids_that_differ_are_named() -> None:
    tok = CharTokenizer.train(["abc"])
    config = TransformerConfig(
        src_vocab_size=tok.vocab_size, tgt_vocab_size=tok.vocab_size, d_model=8, num_heads=2, eos_id=3
    )
    with pytest.raises(ModelDirectoryError, match=r"eos_id is 3 but the tgt tokenizer's is 2"):
        check_model_directory("run", config, tok, tok)
