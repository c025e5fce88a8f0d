"""CTranslate2 export and engine: every option maps (log-probabilities equal qkv's), greedy outputs equal
qkv's token for token, beam and int8 stay close, and what cannot be exported is a clear error."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ctranslate2 = pytest.importorskip("ctranslate2", reason="the CTranslate2 export needs the deploy extra (ctranslate2)")

from qkv.checks import ConfigError, boolean, option  # noqa: E402
from qkv.data.tokenizer import ByteTokenizer, CharTokenizer, WordTokenizer  # noqa: E402
from qkv.deploy.ctranslate2_engine import CTranslate2Translator  # noqa: E402
from qkv.deploy.ctranslate2_export import (  # noqa: E402
    EXPORT_FILE,
    export_ctranslate2,
    read_export_info,
    vocabulary_tokens,
)
from qkv.deploy.ctranslate2_spec import check_exportable, require_ctranslate2  # noqa: E402
from qkv.models import LMConfig, TransformerConfig, TransformerLM, TransformerSeq2Seq  # noqa: E402
from qkv.models.checkpoint import save_model  # noqa: E402
from qkv.models.config import EncoderConfig  # noqa: E402
from qkv.models.encoder import TransformerEncoder  # noqa: E402
from qkv.train.translate import Translator, load_tokenizers, save_tokenizers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHABET = "abcdefghij "
SENTENCES = ["abc def", "j", "gig bad fed", "", "aaaa bbbb cccc dd", "hij", "ba"]
SMALL = {"d_model": 32, "num_heads": 4, "encoder_layers": 2, "decoder_layers": 2, "ffn_dim": 64, "dropout": 0.0}
# Every option that changes the computation, each in at least one case.
CONFIGS = {
    "post-LN sinusoidal relu, untied": {"tie_embeddings": False},
    "pre-LN learned gelu eps": {
        "norm_first": True,
        "positional": "learned",
        "max_positions": 64,
        "activation": "gelu",
        "layer_norm_eps": 1e-2,
    },
    "rotary grouped-query": {"positional": "rotary", "kv_heads": 2},
    "shared vocabulary, multi-query": {"shared_vocab": True, "kv_heads": 1, "norm_first": True},
}


def _copy_batch(generator: torch.Generator, vocab: int, n: int = 16) -> tuple[torch.Tensor, ...]:
    """A copy task batch: ``src (n, S)``, ``lengths (n,)``, decoder input and target ``(n, S + 1)``."""
    lengths = torch.randint(2, 12, (n,), generator=generator)
    width = int(lengths.max())
    src = torch.zeros(n, width, dtype=torch.long)
    tgt_in = torch.zeros(n, width + 1, dtype=torch.long)
    tgt_out = torch.zeros(n, width + 1, dtype=torch.long)
    for i, length in enumerate(lengths.tolist()):
        ids = torch.randint(4, vocab, (length,), generator=generator)
        src[i, :length], tgt_in[i, 0], tgt_in[i, 1 : length + 1] = ids, 1, ids
        tgt_out[i, :length], tgt_out[i, length] = ids, 2
    return src, lengths, tgt_in, tgt_out


def _fit_copy(model: TransformerSeq2Seq, steps: int) -> None:
    """A few Adam steps on copying: the model then ends its outputs with EOS, at lengths that vary."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        src, lengths, tgt_in, tgt_out = _copy_batch(generator, model.config.tgt_vocab_size)
        logits = model(src, lengths, tgt_in).logits
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _model_dir(path: Path, fit_steps: int = 0, **options: object) -> Path:
    """A model directory (``save_model`` + tokenizers) of a small seeded model with ``options``."""
    src = tgt = CharTokenizer.train([ALPHABET])
    if not options.get("shared_vocab") and not fit_steps:  # (copying needs one vocabulary)
        tgt = CharTokenizer.train([ALPHABET.upper() + ALPHABET])  # another vocabulary, so ids differ by side
    torch.manual_seed(0)
    config = TransformerConfig(src_vocab_size=src.vocab_size, tgt_vocab_size=tgt.vocab_size, **{**SMALL, **options})
    model = TransformerSeq2Seq(config)
    if fit_steps:
        _fit_copy(model, fit_steps)
    save_model(model, path)
    save_tokenizers(path, src, tgt, shared=bool(options.get("shared_vocab")))
    return path


@dataclass
class Exported:
    model_dir: Path
    out: Path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Exported:
    """A model fitted 40 steps to copying (its outputs end with EOS), exported in float32."""
    root = tmp_path_factory.mktemp("ct2_fitted")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains faster on one thread
    try:
        model_dir = _model_dir(root / "model", fit_steps=40, tie_embeddings=False)
    finally:
        torch.set_num_threads(threads)
    return Exported(model_dir, export_ctranslate2(model_dir, root / "ct2"))


def _teacher_forced_log_probs(model: TransformerSeq2Seq, src: list[int], tgt: list[int]) -> list[float]:
    """qkv's log-probability of each token of ``tgt`` and then EOS, given ``src``."""
    with torch.no_grad():
        logits = model(torch.tensor([src]), torch.tensor([len(src)]), torch.tensor([[model.bos_id, *tgt]])).logits
    log_probs = F.log_softmax(logits[0], dim=-1)
    return [log_probs[i, t].item() for i, t in enumerate([*tgt, model.eos_id])]


@pytest.mark.parametrize("options", list(CONFIGS.values()), ids=list(CONFIGS))
def test_every_option_scores_as_in_qkv(options, tmp_path):
    model_dir = _model_dir(tmp_path / "model", **options)
    engine = CTranslate2Translator.load(export_ctranslate2(model_dir, tmp_path / "ct2"), intra_threads=1)
    qkv = Translator.load(model_dir)
    assert isinstance(qkv.model, TransformerSeq2Seq)
    generator = torch.Generator().manual_seed(1)
    for length in (1, 5, 11):
        src = torch.randint(4, qkv.model.config.src_vocab_size, (length,), generator=generator).tolist()
        tgt = torch.randint(0, qkv.model.config.tgt_vocab_size, (7,), generator=generator).tolist()
        (scored,) = engine.translator.score_batch(
            [[engine.src_vocabulary[i] for i in src]], [[engine.tgt_vocabulary[i] for i in tgt]]
        )
        expected = _teacher_forced_log_probs(qkv.model, src, tgt)
        assert scored.log_probs == pytest.approx(expected, abs=1e-4)


def test_the_scoring_comparison_catches_a_wrong_mapping(tmp_path, monkeypatch):
    """With the interleaved rotary layout (a plausible mistake) the comparison above fails."""
    import qkv.deploy.ctranslate2_spec as spec_module

    original = spec_module._stack_options
    monkeypatch.setattr(spec_module, "_stack_options", lambda ct2, c: {**original(ct2, c), "rotary_interleave": True})
    model_dir = _model_dir(tmp_path / "model", positional="rotary")
    engine = CTranslate2Translator.load(export_ctranslate2(model_dir, tmp_path / "ct2"), intra_threads=1)
    model = Translator.load(model_dir).model
    assert isinstance(model, TransformerSeq2Seq)
    src, tgt = [4, 5, 6, 7, 8], [5, 6, 7, 8, 9]
    (scored,) = engine.translator.score_batch(
        [[engine.src_vocabulary[i] for i in src]], [[engine.tgt_vocabulary[i] for i in tgt]]
    )
    assert scored.log_probs != pytest.approx(_teacher_forced_log_probs(model, src, tgt), abs=1e-3)


def test_greedy_equals_qkv_token_for_token(fitted):
    qkv = Translator.load(fitted.model_dir).translate(SENTENCES, beam=1)
    ct2 = CTranslate2Translator.load(fitted.out, intra_threads=1).translate(SENTENCES, beam=1)
    finished = [r.hypothesis.finished for r in qkv if r.hypothesis is not None]
    assert any(finished)  # the EOS path is exercised
    for a, b in zip(qkv, ct2, strict=True):
        assert (b.text, b.src_tokens, b.tgt_tokens) == (a.text, a.src_tokens, a.tgt_tokens)
        if a.hypothesis is None:
            assert b.hypothesis is None and a.source == ""
            continue
        assert b.hypothesis.tokens == a.hypothesis.tokens and b.hypothesis.finished == a.hypothesis.finished
        assert b.hypothesis.log_prob == pytest.approx(a.hypothesis.log_prob, abs=1e-4)


def test_output_length_limit_is_qkvs(fitted):
    """``max_output_length`` caps each sentence as in qkv: unfinished hypotheses of exactly that many tokens."""
    qkv = Translator.load(fitted.model_dir).translate(SENTENCES, beam=1, max_output_length=3)
    ct2 = CTranslate2Translator.load(fitted.out, intra_threads=1).translate(SENTENCES, beam=1, max_output_length=3)
    cut = [r for r in ct2 if r.hypothesis is not None and not r.hypothesis.finished]
    assert cut and all(len(r.hypothesis.tokens) == 3 for r in cut)
    assert [r.text for r in ct2] == [r.text for r in qkv]


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_search_close_to_qkv(fitted, alpha):
    qkv = Translator.load(fitted.model_dir).translate(SENTENCES, beam=4, length_penalty=alpha)
    ct2 = CTranslate2Translator.load(fitted.out, intra_threads=1).translate(SENTENCES, beam=4, length_penalty=alpha)
    # The searches may stop at different times (see qkv.deploy.ctranslate2_engine), but on these sentences
    # they agree; passing alpha to CTranslate2's own length penalty (log_prob / L ** alpha) changes "a" to "aa".
    assert [b.text for b in ct2] == [a.text for a in qkv]
    for a, b in zip(qkv, ct2, strict=True):
        if a.hypothesis is not None:  # the score is qkv's GNMT score, not CTranslate2's
            assert b.hypothesis.score == pytest.approx(a.hypothesis.score, abs=1e-4)


def test_attention_is_the_last_layers_mean_over_heads(fitted):
    qkv = Translator.load(fitted.model_dir).translate(["gig bad fed"], beam=1, need_attention=True)[0]
    ct2 = CTranslate2Translator.load(fitted.out, intra_threads=1).translate(
        ["gig bad fed"], beam=1, need_attention=True
    )[0]
    expected = qkv.hypothesis.cross_attention[-1].mean(dim=0)  # (T, S)
    got = ct2.hypothesis.cross_attention
    assert got.shape == (1, 1, *expected.shape) and expected.shape[0] == len(ct2.tgt_tokens)
    torch.testing.assert_close(got[0, 0], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("quantization", "ratio"), [("int8", 0.4), ("int16", 0.65)])
def test_quantized_exports_are_smaller_and_close(fitted, tmp_path, quantization, ratio):
    # A short position table: it stays float32, and 2048 rows would outweigh this tiny model's weights.
    full = export_ctranslate2(fitted.model_dir, tmp_path / "float32", sinusoidal_positions=32)
    out = export_ctranslate2(
        fitted.model_dir, tmp_path / quantization, quantization=quantization, sinusoidal_positions=32
    )
    assert (out / "model.bin").stat().st_size < ratio * (full / "model.bin").stat().st_size
    assert read_export_info(out).quantization == quantization
    results = CTranslate2Translator.load(out, intra_threads=1).translate(SENTENCES, beam=2)
    reference = CTranslate2Translator.load(fitted.out, intra_threads=1).translate(SENTENCES, beam=2)
    assert sum(a.text == b.text for a, b in zip(results, reference, strict=True)) >= len(SENTENCES) - 2


def test_export_directory_layout(fitted):
    names = {p.name for p in fitted.out.iterdir()}
    assert {"model.bin", "config.json", EXPORT_FILE, "src_tokenizer.json", "tgt_tokenizer.json"} <= names
    info = read_export_info(fitted.out)
    assert info.model_type == "transformer_seq2seq" and info.quantization == "float32"
    assert info.tokens == {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "decoder_start": "<s>"}
    assert (info.source_positions, info.target_positions) == (2048, 2048)  # sinusoidal: the rows written
    assert load_tokenizers(fitted.out) == load_tokenizers(fitted.model_dir)
    config = json.loads((fitted.out / "config.json").read_text())
    assert (config["decoder_start_token"], config["add_source_bos"], config["add_source_eos"]) == ("<s>", False, False)


@pytest.mark.parametrize(
    "tokenizer", [CharTokenizer.train(["<unk> ab"]), WordTokenizer.train(["x"]), ByteTokenizer()], ids=str
)
def test_vocabulary_is_distinct_strings_one_per_id(tokenizer):
    tokens = vocabulary_tokens(tokenizer)
    assert len(tokens) == tokenizer.vocab_size == len(set(tokens))
    assert tokens[:4] == ["<pad>", "<s>", "</s>", "<unk>"]


def test_vocabulary_keeps_units_and_renames_the_taken_ones():
    words = WordTokenizer.train(["<unk> <s> <qkv:4> a b"])  # literal special names and a placeholder-like word
    tokens = vocabulary_tokens(words)
    assert len(set(tokens)) == len(tokens) == words.vocab_size
    for i, unit in enumerate(words.tokens[4:], start=4):
        if unit in ("a", "b"):
            assert tokens[i] == unit
        elif unit in ("<unk>", "<s>"):
            assert tokens[i].startswith("<qkv:")  # the name belongs to the special id
    assert vocabulary_tokens(ByteTokenizer())[4 + ord("a")] == "a"


def test_sentences_longer_than_the_position_table_are_refused(tmp_path):
    model_dir = _model_dir(tmp_path / "model")
    out = export_ctranslate2(model_dir, tmp_path / "ct2", sinusoidal_positions=16)
    engine = CTranslate2Translator.load(out, intra_threads=1)
    with pytest.raises(ValueError, match=r"sentence 2 has 20 source tokens, beyond the 16 sinusoidal positions"):
        engine.translate(["ab", "a" * 20])
    with pytest.raises(ValueError, match="max_output_length 17 exceeds the 16 target positions"):
        engine.translate(["ab"], max_output_length=17)
    assert engine.output_length_cap() == 16


def test_language_model_export_matches_qkv(tmp_path):
    tokenizer = CharTokenizer.train([ALPHABET])
    torch.manual_seed(0)
    config = LMConfig(
        vocab_size=tokenizer.vocab_size, d_model=32, num_heads=4, num_layers=2, ffn_dim=64, max_positions=32
    )
    model = TransformerLM(config).eval()
    save_model(model, tmp_path / "lm")
    tokenizer.save(tmp_path / "lm")
    out = export_ctranslate2(tmp_path / "lm", tmp_path / "ct2", quantization="float32")
    assert read_export_info(out).model_type == "transformer_lm"
    generator = ctranslate2.Generator(str(out), intra_threads=1)
    vocabulary = json.loads((out / "vocabulary.json").read_text())
    tokens = torch.randint(4, tokenizer.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = F.log_softmax(model(tokens), dim=-1)
    scored = generator.score_batch([[vocabulary[i] for i in row] for row in tokens.tolist()])
    for b, (row, result) in enumerate(zip(tokens.tolist(), scored, strict=True)):
        want = [expected[b, j, t].item() for j, t in enumerate(row[1:])]
        assert result.log_probs == pytest.approx(want, abs=1e-4)
    greedy = model.generate(tokens[:, :3], 8, temperature=0.0)[:, 3:].tolist()
    found = generator.generate_batch(
        [[vocabulary[i] for i in r] for r in tokens[:, :3].tolist()],
        max_length=8,
        sampling_topk=1,
        include_prompt_in_result=False,
        end_token=[],
    )
    assert [[vocabulary.index(t) for t in r.sequences[0]] for r in found] == greedy
    with pytest.raises(ValueError, match="holds an exported transformer_lm model, not a translation model"):
        CTranslate2Translator.load(out)


def test_options_ctranslate2_cannot_express_are_named():
    lm = LMConfig(vocab_size=10, d_model=16, num_heads=2, num_layers=1, window=4)
    with pytest.raises(ConfigError, match=r"window=4 is not supported; CTranslate2 has no sliding-window"):
        check_exportable(lm)
    config = TransformerConfig(src_vocab_size=10, tgt_vocab_size=10, d_model=16, num_heads=2)
    config.activation = "swish"  # a value a later qkv might allow
    with pytest.raises(ConfigError, match=r"activation='swish' is not supported; expected one of 'relu', 'gelu'"):
        check_exportable(config)
    config = TransformerConfig(src_vocab_size=10, tgt_vocab_size=10, d_model=16, num_heads=2)
    config.positional = "alibi"
    with pytest.raises(ConfigError, match=r"positional='alibi' is not supported"):
        check_exportable(config)


def test_an_option_the_exporter_does_not_know_is_refused():
    @dataclass
    class WithBias(TransformerConfig):
        attention_bias: bool = option(True, boolean)

    config = WithBias(src_vocab_size=10, tgt_vocab_size=10, d_model=16, num_heads=2)
    with pytest.raises(ConfigError, match=r"option attention_bias=True is not known to the exporter"):
        check_exportable(config)


def test_bad_arguments_and_directories(fitted, tmp_path):
    with pytest.raises(ConfigError, match=r"quantization must be one of 'float32', 'int16', 'int8'; got 'int4'"):
        export_ctranslate2(fitted.model_dir, tmp_path / "a", quantization="int4")
    with pytest.raises(ConfigError, match=r"sinusoidal_positions must be an int >= 1 or None; got 0"):
        export_ctranslate2(fitted.model_dir, tmp_path / "a", sinusoidal_positions=0)
    with pytest.raises(FileExistsError, match="is a directory that is not empty"):
        export_ctranslate2(fitted.model_dir, fitted.out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file; expected a new or empty directory"):
        export_ctranslate2(fitted.model_dir, tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="is not a directory; expected a model directory"):
        export_ctranslate2(tmp_path / "missing", tmp_path / "b")
    with pytest.raises(ConfigError, match=r"sinusoidal_positions=64 is only for models with sinusoidal positions"):
        export_ctranslate2(
            _model_dir(tmp_path / "learned", positional="learned"), tmp_path / "c", sinusoidal_positions=64
        )
    encoder = TransformerEncoder(
        EncoderConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    )
    save_model(encoder, tmp_path / "encoder")
    with pytest.raises(ConfigError, match="cannot export a transformer_encoder model to CTranslate2"):
        export_ctranslate2(tmp_path / "encoder", tmp_path / "d")
    (tmp_path / "empty").mkdir()
    assert export_ctranslate2(fitted.model_dir, tmp_path / "empty") == tmp_path / "empty"  # an empty one is fine
    with pytest.raises(FileNotFoundError, match=f"is not a CTranslate2 export of qkv export: it has no {EXPORT_FILE}"):
        CTranslate2Translator.load(fitted.model_dir)


def test_missing_ctranslate2_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # import ctranslate2 now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'qkv\[deploy\]'"):
        require_ctranslate2()


def test_a_failed_export_leaves_nothing(fitted, tmp_path, monkeypatch):
    import qkv.deploy.ctranslate2_export as export_module

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "save_tokenizers", fail)
    with pytest.raises(OSError, match="disk full"):
        export_ctranslate2(fitted.model_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither out nor the temporary directory beside it
