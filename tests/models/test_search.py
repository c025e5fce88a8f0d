"""Greedy and beam search: exact results on a model whose next-token distribution is a table, and
consistency with teacher forcing (scores, attention through the beam reorderings) on a random RNN."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch

from qkv.models.config import TransformerConfig
from qkv.models.hypothesis import Hypothesis, gnmt_length_penalty
from qkv.models.interface import DecoderOutput, EncoderOutput
from qkv.models.rnn import RNNConfig, RNNSeq2Seq
from qkv.models.search import beam_search, greedy_search
from qkv.models.transformer import TransformerSeq2Seq

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}
PAD, BOS, EOS, A, B, C = 0, 1, 2, 3, 4, 5
Dist = Callable[[int, tuple[int, ...]], dict[int, float]]


def pseudo_random(n: int, *key: object) -> torch.Tensor:
    """``n`` positive weights summing to 1, a fixed function of ``key``."""
    g = torch.Generator().manual_seed(hash(key) % 2**31)
    w = torch.rand(n, generator=g, dtype=F64) + 0.1
    return w / w.sum()


class TableState:
    """Each row's decoder inputs so far (BOS first)."""

    def __init__(self, batch: int) -> None:
        self.inputs: list[tuple[int, ...]] = [() for _ in range(batch)]

    def reorder(self, indices: torch.Tensor) -> None:
        self.inputs = [self.inputs[i] for i in indices.tolist()]


class TableModel:
    """A Seq2SeqModel whose next-token probabilities are ``dist(key, outputs so far)``, ``key`` being the
    sentence's first source token, read from the (reordered) encoder output. Its attention is a fixed
    function of the key and the decoder inputs, so misaligned rows show up as wrong attention."""

    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def __init__(self, dist: Dist, vocab: int = 6) -> None:
        self.dist = dist
        self.vocab = vocab
        self.step_widths: list[int] = []

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor, *, need_attention: bool = False) -> EncoderOutput:
        memory = torch.zeros(*src.shape, 1, dtype=F64)
        return EncoderOutput(memory=memory, src_lengths=src_lengths, extras={"key": src[:, 0]})

    def start_state(self, encoder_out: EncoderOutput) -> TableState:
        return TableState(encoder_out.memory.shape[0])

    def decode_step(
        self, tokens: torch.Tensor, encoder_out: EncoderOutput, state: TableState, *, need_attention: bool = False
    ) -> DecoderOutput:
        self.step_widths.append(tokens.shape[1])
        batch, steps = tokens.shape
        src_len = encoder_out.memory.shape[1]
        total = len(state.inputs[0]) + steps
        logits = torch.empty(batch, steps, self.vocab, dtype=F64)
        cross = torch.zeros(batch, 1, 2, steps, src_len, dtype=F64)
        self_attention = torch.zeros(batch, 1, 2, steps, total, dtype=F64)
        for b in range(batch):
            key, n_src = int(encoder_out.extras["key"][b]), int(encoder_out.src_lengths[b])
            for t in range(steps):
                state.inputs[b] += (int(tokens[b, t]),)
                inputs = state.inputs[b]
                probs = torch.zeros(self.vocab, dtype=F64)
                for token, p in self.dist(key, inputs[1:]).items():
                    probs[token] = p
                logits[b, t] = probs.log()
                for head in range(2):
                    cross[b, 0, head, t, :n_src] = pseudo_random(n_src, key, inputs, head)
                    self_attention[b, 0, head, t, : len(inputs)] = pseudo_random(len(inputs), key, inputs, head, "self")
        return DecoderOutput(logits, cross, self_attention)

    def forward(
        self, src: torch.Tensor, src_lengths: torch.Tensor, tgt: torch.Tensor, *, need_attention: bool = False
    ) -> DecoderOutput:
        encoder_out = self.encode(src, src_lengths)
        return self.decode_step(tgt, encoder_out, self.start_state(encoder_out), need_attention=need_attention)


def table(entries: dict[tuple[int, ...], dict[int, float]], default: dict[int, float] | None = None) -> Dist:
    return lambda key, outputs: entries.get(outputs, default or {EOS: 1.0})


def random_dist(key: int, outputs: tuple[int, ...]) -> dict[int, float]:
    """Random probabilities over EOS, A, B, C (none for PAD and BOS)."""
    return dict(zip((EOS, A, B, C), pseudo_random(4, key, outputs, "dist").tolist(), strict=True))


def src_batch(keys: list[int], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.full((len(keys), max(lengths)), PAD)
    for b, (key, n) in enumerate(zip(keys, lengths, strict=True)):
        src[b, :n] = key
    return src, torch.tensor(lengths)


def make_rnn(seed: int = 0, cell: str = "gru", attention: str = "bahdanau") -> RNNSeq2Seq:
    torch.manual_seed(seed)
    config = RNNConfig(10, 9, embed_dim=6, hidden_dim=8, cell=cell, attention=attention)
    model = RNNSeq2Seq(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


def rnn_batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), PAD)
    for b, n in enumerate(lengths):
        src[b, :n] = torch.randint(3, 10, (n,), generator=g)
    return src, torch.tensor(lengths)


def teacher_forced(model: object, src: torch.Tensor, length: int, hyp: Hypothesis) -> DecoderOutput:
    """The model's output on the decoder inputs that produced ``hyp`` (BOS, then all tokens but an
    unfinished hypothesis' last)."""
    inputs = [BOS] + (hyp.tokens if hyp.finished else hyp.tokens[:-1])
    with torch.no_grad():
        return model.forward(  # type: ignore[attr-defined]
            src[None, :length], torch.tensor([length]), torch.tensor([inputs]), need_attention=True
        )


def teacher_forced_log_prob(out: DecoderOutput, hyp: Hypothesis) -> float:
    targets = hyp.tokens + ([EOS] if hyp.finished else [])
    log_probs = out.logits[0].double().log_softmax(-1)
    return float(sum(log_probs[t, token] for t, token in enumerate(targets)))


def test_beam_finds_the_best_sequence_greedy_misses() -> None:
    # Greedy takes A (0.6) and then ends with 0.34: 0.204. B (0.4) then EOS (0.9) is 0.36.
    model = TableModel(table({(): {A: 0.6, B: 0.4}, (A,): {EOS: 0.34, A: 0.33, B: 0.33}, (B,): {EOS: 0.9, A: 0.1}}))
    src, lengths = src_batch([3], [2])
    greedy = greedy_search(model, src, lengths, length_penalty=0.0)[0]
    assert greedy.tokens == [A] and greedy.log_prob == pytest.approx(math.log(0.6 * 0.34))
    best = beam_search(model, src, lengths, beam_size=2, n_best=2, length_penalty=0.0)[0]
    assert [h.tokens for h in best] == [[B], [A]]
    assert best[0].score == best[0].log_prob == pytest.approx(math.log(0.4 * 0.9))
    assert best[1].score == pytest.approx(math.log(0.6 * 0.34))
    assert all(h.finished for h in best)
    assert set(model.step_widths) == {1}, "search must feed one new token per step (cached decoding)"


def test_length_penalty_changes_the_ranking() -> None:
    # Short: A EOS, p = 0.5 (2 steps). Long: B B B B B B EOS, p = 0.5 · 0.95^5 ≈ 0.387 (7 steps).
    entries = {(): {A: 0.5, B: 0.5}, (A,): {EOS: 1.0}, (B,) * 6: {EOS: 1.0}}
    entries.update({(B,) * k: {B: 0.95, EOS: 0.05} for k in range(1, 6)})
    model = TableModel(table(entries))
    src, lengths = src_batch([3], [2])
    short, long = [A], [B] * 6
    p_short, p_long = math.log(0.5), math.log(0.5 * 0.95**5)
    for alpha, order in ((0.0, [short, long]), (1.0, [long, short])):
        hyps = beam_search(model, src, lengths, beam_size=3, n_best=3, length_penalty=alpha, max_len=10)[0]
        ranked = [h.tokens for h in hyps]
        assert ranked.index(order[0]) < ranked.index(order[1])
        assert hyps[0].tokens == order[0]
        by_tokens = {tuple(h.tokens): h for h in hyps}
        assert by_tokens[tuple(short)].score == pytest.approx(p_short / gnmt_length_penalty(2, alpha))
        assert by_tokens[tuple(long)].score == pytest.approx(p_long / gnmt_length_penalty(7, alpha))
    assert gnmt_length_penalty(7, 1.0) == 2.0


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_equals_exhaustive_search_when_the_beam_holds_everything(alpha: float) -> None:
    # 3 non-EOS tokens, at most 4 steps: 40 hypotheses end with EOS and 81 reach the limit; a beam of
    # 128 keeps every candidate, so beam search must find the exact n-best list.
    model = TableModel(random_dist)
    src, lengths = src_batch([7], [3])
    hyps = beam_search(model, src, lengths, beam_size=128, n_best=10, length_penalty=alpha, max_len=4)[0]
    every = []
    for n in range(4):
        for tokens in itertools.product((A, B, C), repeat=n):
            every.append((list(tokens), True))
    every += [(list(tokens), False) for tokens in itertools.product((A, B, C), repeat=4)]
    scored = []
    for tokens, finished in every:
        log_prob = sum(math.log(random_dist(7, tuple(tokens[:t]))[tok]) for t, tok in enumerate(tokens))
        if finished:
            log_prob += math.log(random_dist(7, tuple(tokens))[EOS])
        length = len(tokens) + finished
        scored.append((log_prob / gnmt_length_penalty(length, alpha), tokens, finished))
    scored.sort(key=lambda s: -s[0])
    assert [(h.tokens, h.finished) for h in hyps] == [(t, f) for _, t, f in scored[:10]]
    for h, (score, _, _) in zip(hyps, scored, strict=False):
        assert h.score == pytest.approx(score, rel=1e-12)


def test_eos_ends_hypotheses_and_search_stops_early() -> None:
    # EOS has probability 0.9 everywhere: once two hypotheses have ended, no live one can beat them.
    model = TableModel(table({}, default={EOS: 0.9, A: 0.06, B: 0.04}))
    src, lengths = src_batch([3], [4])
    hyps = beam_search(model, src, lengths, beam_size=2, n_best=2, length_penalty=0.0, max_len=50)[0]
    assert [h.tokens for h in hyps] == [[], [A]]
    assert all(h.finished for h in hyps)
    assert hyps[1].log_prob == pytest.approx(math.log(0.06 * 0.9))
    assert len(model.step_widths) == 2, "search should stop once no live hypothesis can win"
    model.step_widths.clear()
    assert greedy_search(model, src, lengths)[0].tokens == []
    assert len(model.step_widths) == 1


def test_max_length_is_respected() -> None:
    model = TableModel(table({}, default={A: 0.7, B: 0.3}))  # never ends
    src, lengths = src_batch([3, 4], [2, 5])
    for hyp in greedy_search(model, src, lengths, max_len=3, need_attention=True):
        assert hyp.tokens == [A] * 3 and not hyp.finished
        assert hyp.cross_attention is not None and hyp.cross_attention.shape[2] == 3
    hyps = greedy_search(model, src, lengths, max_len_ratio=1.0, max_len_extra=1)  # 1·len + 1
    assert [len(h.tokens) for h in hyps] == [3, 6]
    for n_best, limit in zip(beam_search(model, src, lengths, beam_size=3, n_best=3, max_len=4), (4, 4), strict=True):
        assert len(n_best) == 3
        assert all(len(h.tokens) == limit and not h.finished for h in n_best)
        assert n_best[0].tokens == [A] * 4


def test_no_repeat_ngram_blocks_repeats() -> None:
    # The model loves A B A B ...; blocking bigrams forces other continuations.
    def alternate(key: int, outputs: tuple[int, ...]) -> dict[int, float]:
        nxt = B if outputs and outputs[-1] == A else A
        return {nxt: 0.8, C: 0.1, A + B - nxt: 0.05, EOS: 0.05}

    model = TableModel(alternate)
    src, lengths = src_batch([3], [4])
    free = beam_search(model, src, lengths, beam_size=3, n_best=3, max_len=8)[0]
    assert free[0].tokens[:4] == [A, B, A, B]
    for n in (1, 2, 3):
        hyps = beam_search(model, src, lengths, beam_size=3, n_best=3, max_len=8, no_repeat_ngram=n)[0]
        assert hyps
        for h in hyps:
            grams = [tuple(h.tokens[i : i + n]) for i in range(len(h.tokens) - n + 1)]
            assert len(grams) == len(set(grams)), f"{n}-gram repeated in {h.tokens}"
    rnn = make_rnn(3)
    src, lengths = rnn_batch([5, 3])
    for hyps in beam_search(rnn, src, lengths, beam_size=4, n_best=4, no_repeat_ngram=2):
        for h in hyps:
            grams = list(zip(h.tokens, h.tokens[1:], strict=False))
            assert len(grams) == len(set(grams))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_of_one_equals_greedy(seed: int) -> None:
    model = make_rnn(seed, cell="lstm" if seed % 2 else "gru")
    src, lengths = rnn_batch([6, 3, 5, 1], seed)
    greedy = greedy_search(model, src, lengths, length_penalty=0.0, need_attention=True)
    beam = beam_search(model, src, lengths, beam_size=1, length_penalty=0.0, need_attention=True)
    for g, (b,) in zip(greedy, beam, strict=True):
        assert g.tokens == b.tokens and g.finished == b.finished
        assert g.score == b.score and g.log_prob == b.log_prob
        torch.testing.assert_close(g.cross_attention, b.cross_attention, rtol=0, atol=0)
    # With a length penalty the beam may go on after greedy's hypothesis ended, but never does worse
    # (up to rounding: the rows batched together differ, and so do the matrix products' last bits).
    greedy = greedy_search(model, src, lengths, length_penalty=1.0)
    beam = beam_search(model, src, lengths, beam_size=1, length_penalty=1.0)
    assert all(b.score >= g.score - 1e-12 for g, (b,) in zip(greedy, beam, strict=True))


def test_n_best_sorted_and_consistent_with_teacher_forcing() -> None:
    model = make_rnn(4, attention="luong_general")
    src, lengths = rnn_batch([6, 2, 4], seed=5)
    results = beam_search(model, src, lengths, beam_size=5, n_best=5, length_penalty=0.8, need_attention=True)
    reordered = False
    for b, hyps in enumerate(results):
        assert len(hyps) == 5
        assert len({tuple(h.tokens) for h in hyps}) == 5
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        n_src = int(lengths[b])
        for h in hyps:
            steps = len(h.tokens) + h.finished
            assert h.score == pytest.approx(h.log_prob / gnmt_length_penalty(steps, 0.8), rel=1e-12)
            out = teacher_forced(model, src[b], n_src, h)
            assert h.log_prob == pytest.approx(teacher_forced_log_prob(out, h), rel=1e-10)
            # The attention follows the hypothesis' own ancestry through every reordering of the beam.
            assert h.cross_attention is not None and h.cross_attention.shape == (1, 1, steps, n_src)
            assert out.cross_attention is not None
            torch.testing.assert_close(h.cross_attention, out.cross_attention[0], **TOL)
        reordered |= len({tuple(h.tokens[:2]) for h in hyps}) > 1
    assert reordered, "the test needs beams that diverge and get reordered"


def test_attention_through_reordering_on_the_table_model() -> None:
    model = TableModel(random_dist)
    src, lengths = src_batch([7, 8, 9], [3, 5, 2])
    results = beam_search(
        model, src, lengths, beam_size=3, n_best=3, max_len=6, need_attention=True, need_self_attention=True
    )
    for b, hyps in enumerate(results):
        for h in hyps:
            steps = len(h.tokens) + h.finished
            out = teacher_forced(model, src[b], int(lengths[b]), h)
            assert h.cross_attention is not None and h.cross_attention.shape == (1, 2, steps, int(lengths[b]))
            assert h.self_attention is not None and h.self_attention.shape == (1, 2, steps, steps)
            torch.testing.assert_close(h.cross_attention, out.cross_attention[0], **TOL)
            torch.testing.assert_close(h.self_attention, out.self_attention[0], **TOL)
            assert h.log_prob == pytest.approx(teacher_forced_log_prob(out, h), rel=1e-12)
    greedy = greedy_search(model, src, lengths, max_len=6, need_attention=True, need_self_attention=True)
    for b, h in enumerate(greedy):
        out = teacher_forced(model, src[b], int(lengths[b]), h)
        torch.testing.assert_close(h.cross_attention, out.cross_attention[0], **TOL)
        torch.testing.assert_close(h.self_attention, out.self_attention[0], **TOL)


def test_batched_beam_search_equals_one_sentence_at_a_time() -> None:
    model = make_rnn(5, cell="lstm", attention="luong_dot")
    src, lengths = rnn_batch([2, 7, 4, 5], seed=6)
    batched = beam_search(model, src, lengths, beam_size=3, n_best=3, need_attention=True)
    for b, hyps in enumerate(batched):
        n = int(lengths[b])
        alone = beam_search(model, src[b : b + 1, :n], lengths[b : b + 1], beam_size=3, n_best=3, need_attention=True)
        assert [h.tokens for h in hyps] == [h.tokens for h in alone[0]]
        for h, a in zip(hyps, alone[0], strict=True):
            assert h.score == pytest.approx(a.score, rel=1e-10)
            torch.testing.assert_close(h.cross_attention, a.cross_attention, **TOL)
    table_model = TableModel(random_dist)
    src, lengths = src_batch([7, 8, 9], [3, 5, 2])
    batched = beam_search(table_model, src, lengths, beam_size=2, n_best=2, max_len=5)
    for b, hyps in enumerate(batched):
        alone = beam_search(table_model, src[b : b + 1], lengths[b : b + 1], beam_size=2, n_best=2, max_len=5)[0]
        assert [(h.tokens, h.score) for h in hyps] == [(h.tokens, h.score) for h in alone]


def test_search_works_on_the_transformer() -> None:
    """The search knows only the interface: multi-layer, multi-head cross- and self-attention come out
    of the KV-cached Transformer aligned with teacher forcing, and beam 1 equals greedy."""
    torch.manual_seed(0)
    config = TransformerConfig(
        src_vocab_size=10,
        tgt_vocab_size=9,
        d_model=16,
        num_heads=2,
        encoder_layers=2,
        decoder_layers=2,
        ffn_dim=32,
        dropout=0.0,
        tie_embeddings=False,
    )
    model = TransformerSeq2Seq(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    src, lengths = rnn_batch([6, 2, 4], seed=5)
    results = beam_search(model, src, lengths, beam_size=3, n_best=3, need_attention=True, need_self_attention=True)
    for b, hyps in enumerate(results):
        n_src = int(lengths[b])
        for h in hyps:
            steps = len(h.tokens) + h.finished
            out = teacher_forced(model, src[b], n_src, h)
            assert h.cross_attention is not None and h.cross_attention.shape == (2, 2, steps, n_src)
            assert h.self_attention is not None and h.self_attention.shape == (2, 2, steps, steps)
            torch.testing.assert_close(h.cross_attention, out.cross_attention[0, ..., :n_src], **TOL)
            torch.testing.assert_close(h.self_attention, out.self_attention[0], **TOL)
            assert h.log_prob == pytest.approx(teacher_forced_log_prob(out, h), rel=1e-10)
    greedy = greedy_search(model, src, lengths, length_penalty=0.0)
    beam = beam_search(model, src, lengths, beam_size=1, length_penalty=0.0)
    assert [g.tokens for g in greedy] == [b[0].tokens for b in beam]


def test_search_runs_without_gradients_in_eval_mode_and_restores_training() -> None:
    model = make_rnn(6)
    model.config.dropout = 0.0
    model.dropout.p = 0.5
    model.train()
    src, lengths = rnn_batch([4, 3])
    first = beam_search(model, src, lengths, beam_size=2, need_attention=True)
    again = beam_search(model, src, lengths, beam_size=2, need_attention=True)
    assert model.training
    assert [h[0].tokens for h in first] == [h[0].tokens for h in again], "dropout must be off while searching"
    assert first[0][0].cross_attention is not None and not first[0][0].cross_attention.requires_grad


def test_bad_arguments() -> None:
    model = make_rnn()
    src, lengths = rnn_batch([3, 2])
    for kwargs, message in (
        ({"beam_size": 0}, "beam_size must be an int >= 1; got 0"),
        ({"beam_size": 2, "n_best": 3}, "n_best must be <= beam_size"),
        ({"no_repeat_ngram": -1}, "no_repeat_ngram must be an int >= 0"),
        ({"max_len": 0}, "max_len must be a positive int"),
    ):
        with pytest.raises(ValueError, match=message):
            beam_search(model, src, lengths, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"src_lengths must be an integer tensor of shape \(B,\) = \(2,\)"):
        greedy_search(model, src, lengths[:1])
    with pytest.raises(ValueError, match=r"src_lengths must lie in \[1, S=3\]"):
        greedy_search(model, src, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="B >= 1"):
        beam_search(model, src[:0], lengths[:0])


def test_max_len_cap_bounds_the_ratio_limit() -> None:
    model = TableModel(table({}, default={A: 0.7, B: 0.3}))  # never ends
    src, lengths = src_batch([3, 4], [2, 5])  # 1·len + 1: limits 3 and 6
    hyps = greedy_search(model, src, lengths, max_len_ratio=1.0, max_len_extra=1, max_len_cap=4)
    assert [len(h.tokens) for h in hyps] == [3, 4]
    n_best = beam_search(model, src, lengths, beam_size=2, max_len_ratio=1.0, max_len_extra=1, max_len_cap=4)
    assert [len(hyps[0].tokens) for hyps in n_best] == [3, 4]
    with pytest.raises(ValueError, match="max_len_cap must be a positive int or None; got 0"):
        greedy_search(model, src, lengths, max_len_cap=0)


@pytest.mark.parametrize("alpha", [math.nan, -1.0, 1e9, math.inf, True])
def test_length_penalty_outside_its_range_is_refused(alpha: float) -> None:
    model = make_rnn()
    src, lengths = rnn_batch([3, 2])
    message = rf"length_penalty must be a number in \[0, 10\] \(GNMT alpha\); got {alpha!r}"
    with pytest.raises(ValueError, match=message):
        greedy_search(model, src, lengths, length_penalty=alpha)
    with pytest.raises(ValueError, match=message):
        beam_search(model, src, lengths, beam_size=2, length_penalty=alpha)
