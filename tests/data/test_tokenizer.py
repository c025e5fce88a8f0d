"""Tokenizers: special ids, round trips, save/load as JSON (+ .model), SentencePiece on the built-in corpus."""

from __future__ import annotations

import json
import tempfile
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    CharTokenizer,
    DataError,
    SentencePieceTokenizer,
    Tokenizer,
    WordTokenizer,
    encode_pairs,
    generate_corpus,
    load_tokenizer,
    train_tokenizer,
)
from qkv.data.tokenizer import UNK_TEXT

ALPHABET = "abcdefghijklmnopqrstuvwxyzäöüß ,.-0123456789"


@pytest.fixture(scope="module")
def numbers():
    return generate_corpus("numbers", 1200, seed=0)


@pytest.fixture(scope="module")
def spm_unigram(numbers):
    return SentencePieceTokenizer.train([tgt for _, tgt in numbers.train], vocab_size=120, model_type="unigram")


def test_special_ids_are_the_same_for_every_tokenizer(spm_unigram):
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    char = CharTokenizer.train(["abc"])
    word = WordTokenizer.train(["a b c"])
    for tok in (char, word, spm_unigram):
        assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
        assert tok.vocab_size > 4
        # Ordinary text never encodes to pad, bos or eos.
        assert not {PAD_ID, BOS_ID, EOS_ID} & set(tok.encode("a b c"))
    assert char.tokens[:4] == list(SPECIAL_TOKENS) == word.tokens[:4]
    assert [spm_unigram._sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]


def test_char_vocabulary_is_ordered_by_frequency():
    tok = CharTokenizer.train(["abbccc", "c"])
    assert tok.tokens[4:] == ["c", "b", "a"]
    assert tok.encode("cab") == [4, 6, 5]
    assert CharTokenizer.train(["abbccc"], vocab_size=6).tokens[4:] == ["c", "b"]
    assert CharTokenizer.train(["abbccc"], min_count=2).tokens[4:] == ["c", "b"]


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=60))
def test_char_round_trip_within_the_vocabulary(text):
    tok = CharTokenizer.train([ALPHABET])
    ids = tok.encode(text)
    assert len(ids) == len(text) and UNK_ID not in ids
    assert tok.decode(ids) == text


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=5))
def test_char_round_trip_of_any_text_through_json(texts):
    tok = CharTokenizer.train(texts)
    with tempfile.TemporaryDirectory() as directory:
        loaded = load_tokenizer(tok.save(directory))
    assert loaded == tok
    for text in texts:
        assert loaded.decode(loaded.encode(text)) == text


def test_unknown_units_become_unk_and_decode_as_a_mark():
    tok = CharTokenizer.train(["abc"])
    assert tok.encode("axb") == [tok.encode("a")[0], UNK_ID, tok.encode("b")[0]]
    assert tok.decode(tok.encode("axb")) == f"a{UNK_TEXT}b"
    word = WordTokenizer.train(["the cat sat"])
    assert word.decode(word.encode("the dog sat")) == f"the {UNK_TEXT} sat"


def test_decode_stops_at_eos_and_skips_pad_and_bos():
    tok = CharTokenizer.train(["ab"])
    a, b = tok.encode("ab")
    assert tok.decode([BOS_ID, a, PAD_ID, b, EOS_ID, a, a]) == "ab"
    import torch

    assert tok.decode(torch.tensor([BOS_ID, b, a, EOS_ID, PAD_ID])) == "ba"
    with pytest.raises(DataError, match=r"id 6 is outside the vocabulary: expected 0 \.\. 5"):
        tok.decode([a, 6])


def test_word_round_trip_and_whitespace():
    tok = WordTokenizer.train(["the cat sat on the mat", "a cat"])
    assert tok.tokens[4:6] == ["cat", "the"]
    assert tok.decode(tok.encode("the cat sat on a mat")) == "the cat sat on a mat"
    assert tok.decode(tok.encode("  the   cat\tsat ")) == "the cat sat"  # words, single spaces


def test_a_literal_special_name_in_text_is_an_ordinary_word():
    tok = WordTokenizer.train(["<unk> is a word here"])
    ids = tok.encode("<unk> is")
    assert UNK_ID not in ids
    assert tok.decode(ids) == "<unk> is"


@pytest.mark.parametrize("target", ["dir", "file.json"])
def test_save_and_load_each_tokenizer(tmp_path, spm_unigram, target):
    texts = ["drei hundert", "ein und zwanzig"]
    for tok in (CharTokenizer.train(texts), WordTokenizer.train(texts), spm_unigram):
        where = tmp_path / tok.kind / target
        json_path = tok.save(where)
        assert json_path == (where if target.endswith(".json") else where / "tokenizer.json")
        config = json.loads(json_path.read_text(encoding="utf-8"))  # JSON, not pickle
        assert config["type"] == tok.kind and config["format"] == 1
        loaded = load_tokenizer(where)
        assert type(loaded) is type(tok) and loaded == tok
        assert type(tok).load(where) == tok
        for text in [*texts, "dreihunderteinundzwanzig"]:
            assert loaded.encode(text) == tok.encode(text)
        if tok.kind == "sentencepiece":
            assert json_path.with_suffix(".model").is_file()
            assert config["model_file"] == json_path.with_suffix(".model").name


def test_load_errors_name_the_file(tmp_path, spm_unigram):
    path = CharTokenizer.train(["ab"]).save(tmp_path / "char.json")
    with pytest.raises(DataError, match=r"char.json is a char tokenizer, not word"):
        WordTokenizer.load(path)
    with pytest.raises(DataError, match=r"cannot read tokenizer .*missing/tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "bad.json").write_text('{"type": "bpe-magic", "format": 1}', encoding="utf-8")
    with pytest.raises(
        DataError, match=r"bad.json: expected a \"type\" of char, word, byte, sentencepiece; got 'bpe-magic'"
    ):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "two.json").write_text(
        '{"type": "char", "format": 1, "tokens": ["<pad>", "<s>", "</s>", "<unk>", "ab"]}', encoding="utf-8"
    )
    with pytest.raises(DataError, match=r"two.json: 'ab' is not one char unit"):
        load_tokenizer(tmp_path / "two.json")
    sp_json = spm_unigram.save(tmp_path / "sp")
    sp_json.with_suffix(".model").write_bytes(CharTokenizer.train(["x"]).save(tmp_path / "x.json").read_bytes())
    with pytest.raises(DataError, match=r"tokenizer.model has SHA-256 .* but .*tokenizer.json expects"):
        load_tokenizer(tmp_path / "sp")


def test_sentencepiece_round_trips_every_corpus_sentence(numbers):
    for model_type in ("unigram", "bpe"):
        for side in (0, 1):
            train_text = [pair[side] for pair in numbers.train]
            tok = SentencePieceTokenizer.train(train_text, vocab_size=50, model_type=model_type)
            assert tok.vocab_size == 50
            for pair in numbers.train + numbers.valid + numbers.test:
                ids = tok.encode(pair[side])
                assert UNK_ID not in ids
                assert tok.decode(ids) == pair[side]
            # Subwords: fewer pieces than characters.
            assert sum(len(tok.encode(t)) for t in train_text) < 0.7 * sum(len(t) for t in train_text)


@pytest.mark.filterwarnings("ignore:vocab_size 20 is more than")
def test_sentencepiece_keeps_spaces_exactly():
    tok = SentencePieceTokenizer.train(["a b  c", "ab c", "  lead and trail  "] * 20, vocab_size=20)
    for text in ("a b  c", "  lead and trail  ", "c b a"):
        assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_training_is_deterministic(numbers, spm_unigram):
    again = SentencePieceTokenizer.train([tgt for _, tgt in numbers.train], vocab_size=120, model_type="unigram")
    assert again == spm_unigram


def test_sentencepiece_lowers_a_too_large_vocabulary_with_a_warning():
    texts = ["ein", "zwei", "drei", "vier", "fünf"] * 4
    with pytest.warns(UserWarning, match=r"vocab_size 8000 is more than the training text supports; .* has \d+ ids"):
        tok = SentencePieceTokenizer.train(texts, vocab_size=8000)
    assert 4 < tok.vocab_size < 8000
    assert tok.decode(tok.encode("dreizwei")) == "dreizwei"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SentencePieceTokenizer.train(texts, vocab_size=tok.vocab_size)  # what it supports: no warning


def test_sentencepiece_errors():
    texts = ["abcdefghij", "klmnopqrst"]
    # 20 letters, the word-start mark "▁" and 4 special ids: 25.
    with pytest.raises(DataError, match=r"vocab_size 24 is too small .*expected at least 25"):
        SentencePieceTokenizer.train(texts, vocab_size=24)
    assert SentencePieceTokenizer.train(texts, vocab_size=25).vocab_size == 25
    with pytest.raises(DataError, match="no text to train the SentencePiece model on"):
        SentencePieceTokenizer.train(["", "  "], vocab_size=50)
    with pytest.raises(DataError, match="model_type must be one of unigram, bpe; got 'char'"):
        SentencePieceTokenizer.train(texts, model_type="char")
    with pytest.raises(DataError, match="vocab_size must be an integer >= 5"):
        SentencePieceTokenizer.train(texts, vocab_size=3)


def test_vocab_tokenizer_errors():
    with pytest.raises(DataError, match="no text to build the char vocabulary from"):
        CharTokenizer.train([])
    with pytest.raises(DataError, match="vocab_size must be an integer >= 5"):
        WordTokenizer.train(["a"], vocab_size=4)


@pytest.mark.filterwarnings("ignore:vocab_size 20 is more than")
def test_train_tokenizer_and_encode_pairs():
    pairs = [("one two", "eins zwei"), ("two", "zwei")]
    src = train_tokenizer("word", [s for s, _ in pairs])
    tgt = train_tokenizer("char", [t for _, t in pairs])
    assert isinstance(src, WordTokenizer) and isinstance(tgt, CharTokenizer) and isinstance(src, Tokenizer)
    examples = encode_pairs(pairs, src, tgt)
    assert examples == [(src.encode(s), tgt.encode(t)) for s, t in pairs]
    assert isinstance(train_tokenizer("sentencepiece", ["eins zwei drei"] * 5, vocab_size=20), SentencePieceTokenizer)
    with pytest.raises(DataError, match="unknown tokenizer 'bytes'; expected one of char, word, byte, sentencepiece"):
        train_tokenizer("bytes", ["a"])
    with pytest.raises(DataError, match="model_type is for the sentencepiece tokenizer"):
        train_tokenizer("char", ["a"], model_type="bpe")


def test_byte_tokenizer_round_trips_any_text_and_saves(tmp_path) -> None:
    from qkv.data import ByteTokenizer

    tok = train_tokenizer("byte", ["ignored"])
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 260
    text = "naïve café, 東京 🙂\n<unk>\ttabs"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and min(ids) >= 4 and max(ids) < 260
    assert tok.decode(ids) == text
    assert tok.decode([BOS_ID, *ids, EOS_ID, 5]) == text
    assert load_tokenizer(tok.save(tmp_path)) == tok
    with pytest.raises(DataError, match="fixed vocabulary of 260 ids; got vocab_size 300"):
        train_tokenizer("byte", [], vocab_size=300)


def test_byte_tokenizer_decodes_invalid_utf8_with_replacement_characters() -> None:
    from qkv.data import ByteTokenizer

    tok = ByteTokenizer()
    cut = tok.encode("é")[:1]  # the first of its two bytes
    assert tok.decode([*tok.encode("a"), *cut, *tok.encode("b")]) == "a\ufffdb"
    assert tok.decode([*tok.encode("a"), UNK_ID, *tok.encode("b")]) == f"a{UNK_TEXT}b"


def test_sentencepiece_keeps_line_breaks_as_a_user_defined_symbol() -> None:
    lines = [f"line {i} of some running text, with words" for i in range(200)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plain = SentencePieceTokenizer.train(lines, vocab_size=60, model_type="bpe")
        keeps = SentencePieceTokenizer.train(lines, vocab_size=60, model_type="bpe", user_defined_symbols=("\n",))
    text = "line 3 of\nsome  text\n\nwords"
    assert plain.decode(plain.encode(text)) != text  # "\n" never appears in one-line training sentences
    assert keeps.decode(keeps.encode(text)) == text
