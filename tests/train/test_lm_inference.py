"""Using a language model directory: loading, streaming generation, scoring against a hand computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from qkv.data import ByteTokenizer, CharTokenizer
from qkv.models import LMConfig, TransformerConfig, TransformerLM, TransformerSeq2Seq
from qkv.models.checkpoint import save_model
from qkv.train.lm_inference import LanguageModel, special_ids
from qkv.train.model_dir import ModelDirectoryError

TEXT = "the cat sat on the mat. the dog sat on the log.\n" * 3


def lm_dir(tmp_path: Path, tokenizer=None, **overrides: object) -> Path:
    tokenizer = tokenizer or CharTokenizer.train([TEXT])
    args = {"vocab_size": tokenizer.vocab_size, "d_model": 16, "num_heads": 2, "num_layers": 2, "ffn_dim": 32}
    args.update(dropout=0.0, max_positions=32, **overrides)
    torch.manual_seed(0)
    model = TransformerLM(LMConfig(**args))  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():  # larger than GPT-2's init, so that predictions differ by position
            p.copy_(torch.randn_like(p) * 0.3)
    directory = tmp_path / "lm"
    save_model(model, directory)
    tokenizer.save(directory)
    return directory


def test_evaluate_matches_a_hand_computation(tmp_path: Path) -> None:
    lm = LanguageModel.load(lm_dir(tmp_path), block_size=8)
    text = "the cat sat on the log. the dog"  # 31 characters: windows of 8 targets, the last of 7
    ids = [lm.tokenizer.bos_id, *lm.tokenizer.encode(text)]
    nats = 0.0
    for start in range(0, len(ids) - 1, 8):
        window = torch.tensor([ids[start : start + 9]])
        with torch.no_grad():
            logp = lm.model(window[:, :-1]).log_softmax(-1)[0]
        nats -= sum(float(logp[i, int(window[0, i + 1])]) for i in range(window.shape[1] - 1))
    score = lm.evaluate(text)
    assert (score.tokens, score.chars, score.bytes) == (31, 31, 31)
    assert score.loss == pytest.approx(nats / 31, rel=1e-5)
    assert score.ppl == pytest.approx(math.exp(nats / 31), rel=1e-5)
    assert score.bpc == pytest.approx(nats / 31 / math.log(2), rel=1e-5)
    with pytest.raises(ValueError, match="the text is empty"):
        lm.evaluate("")


def test_bits_per_byte_differ_from_bits_per_character_for_multibyte_text(tmp_path: Path) -> None:
    lm = LanguageModel.load(lm_dir(tmp_path, ByteTokenizer()), block_size=16)
    score = lm.evaluate("héllo wörld")
    assert (score.tokens, score.chars, score.bytes) == (13, 11, 13)
    assert score.bpb == pytest.approx(score.bpc * 11 / 13)


def test_generation_is_reproducible_streams_and_uses_the_cache(tmp_path: Path) -> None:
    lm = LanguageModel.load(lm_dir(tmp_path, positional="rotary"))
    pieces = list(lm.generate("the ", 12, seed=3))
    assert len(pieces) == 12 and all(len(p) == 1 for p in pieces)  # one character a token
    assert "".join(lm.generate("the ", 12, seed=3)) == "".join(pieces)
    assert "".join(lm.generate("the ", 12, seed=4)) != "".join(pieces)
    # what is streamed is what generate() samples through the KV cache, and what an uncached loop gives
    prompt = torch.tensor([lm.tokenizer.encode("the ")])
    special = list(special_ids(lm.tokenizer))  # never sampled: pad, bos, eos, unk
    cached = lm.model.generate(prompt, 12, temperature=0, suppress_ids=special)
    uncached = prompt
    for _ in range(12):
        logits = lm.model(uncached)[:, -1]
        logits[:, special] = -torch.inf
        uncached = torch.cat([uncached, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, uncached)
    assert "".join(lm.generate("the ", 12, temperature=0)) == lm.tokenizer.decode(cached[0, 4:].tolist())


def test_byte_pieces_wait_for_whole_characters(tmp_path: Path) -> None:
    lm = LanguageModel.load(lm_dir(tmp_path, ByteTokenizer()))
    forced = iter(torch.tensor([[t]]) for t in ByteTokenizer().encode("é!"))
    assert list(lm._pieces(ByteTokenizer().encode("a"), (t[0] for t in forced))) == ["é", "!"]


def test_an_empty_prompt_starts_from_bos_and_a_long_prompt_is_an_error(tmp_path: Path) -> None:
    lm = LanguageModel.load(lm_dir(tmp_path))  # learned positions: at most 32 tokens
    assert lm.prompt_ids("") == [lm.tokenizer.bos_id]
    assert len("".join(lm.generate("", 5, seed=0))) == 5
    with pytest.raises(
        ValueError,
        match=r"the prompt has 30 tokens and max_new_tokens is 5, but this model sees at "
        r"most 32 tokens \(learned positions\); ask for at most 3 new tokens",
    ):
        lm.generate("t" * 30, 5)
    with pytest.raises(ValueError, match="shorten the prompt to 32 tokens"):
        lm.generate("t" * 40, 5)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        list(lm.generate("the", 5, top_k=0))
    rotary = LanguageModel.load(lm_dir(tmp_path / "r", positional="rotary"))
    assert len("".join(rotary.generate("t" * 40, 5, seed=0))) == 5  # rotary positions have no limit


def test_a_translation_directory_is_refused(tmp_path: Path) -> None:
    tokenizer = CharTokenizer.train([TEXT])
    model = TransformerSeq2Seq(
        TransformerConfig(
            src_vocab_size=tokenizer.vocab_size,
            tgt_vocab_size=tokenizer.vocab_size,
            d_model=16,
            num_heads=2,
            encoder_layers=1,
            decoder_layers=1,
            ffn_dim=32,
        )
    )
    save_model(model, tmp_path)
    tokenizer.save(tmp_path)
    with pytest.raises(
        ModelDirectoryError, match="holds a transformer_seq2seq model, not a language model.*qkv translate"
    ):
        LanguageModel.load(tmp_path)


def test_a_tokenizer_from_another_run_is_refused(tmp_path: Path) -> None:
    directory = lm_dir(tmp_path)
    ByteTokenizer().save(directory)
    with pytest.raises(ModelDirectoryError, match="vocab_size is .* but the tokenizer has 260 ids"):
        LanguageModel.load(directory)
