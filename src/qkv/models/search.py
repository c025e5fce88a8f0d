"""Greedy and beam search for any :class:`~qkv.models.interface.Seq2SeqModel`.

Both use only the interface: ``encode`` once, ``start_state``, then the cached ``decode_step`` with one
new token per row per step. Finished rows leave the batch (``state.reorder`` and
``EncoderOutput.reorder`` with the rows kept), so a batch costs what its live sentences cost. Both run
under ``torch.no_grad()`` in eval mode and restore the model's mode afterwards.

Length limit: a sentence gets at most ``max_len`` decoding steps (EOS included), or
``int(max_len_ratio · src_len + max_len_extra)`` when ``max_len`` is ``None``, and never more than
``max_len_cap`` when given (so a very long source, or a model that never says EOS, cannot decode for hours);
a hypothesis that reaches it without EOS ends there with ``finished=False``.

``length_penalty`` (GNMT ``alpha``) must lie in ``[0, MAX_LENGTH_PENALTY]``: NaN would rank every
hypothesis equal, a negative alpha prefers ever shorter outputs, and a huge one overflows the penalty.
"""

from __future__ import annotations

import functools
import math

import torch

from qkv.checks import int_at_least, number_between
from qkv.models.hypothesis import (
    AttentionTrace,
    Hypothesis,
    eval_no_grad,
    gnmt_length_penalty,
    last_log_probs,
    length_limits,
)
from qkv.models.interface import Seq2SeqModel

__all__ = ["MAX_LENGTH_PENALTY", "Hypothesis", "beam_search", "gnmt_length_penalty", "greedy_search"]

MAX_LENGTH_PENALTY = 10.0  # ((5 + 10**6) / 6) ** 10 is ~1e52: finite for any output length that can occur


def check_length_penalty(alpha: float, name: str = "length_penalty") -> float:
    """``alpha`` as a float after checking it is a finite number in ``[0, MAX_LENGTH_PENALTY]``; ``ValueError``
    naming ``name`` otherwise."""
    return number_between(
        name, alpha, 0, MAX_LENGTH_PENALTY, expected=f"a number in [0, {MAX_LENGTH_PENALTY:g}] (GNMT alpha)"
    )


def search_limits(
    src: torch.Tensor,
    src_lengths: torch.Tensor,
    max_len: int | None,
    max_len_ratio: float,
    max_len_extra: int,
    max_len_cap: int | None,
) -> list[int]:
    """The most decoding steps for each sentence (see the module docstring)."""
    limits = length_limits(src, src_lengths, max_len, max_len_ratio, max_len_extra)
    if max_len_cap is None:
        return limits
    int_at_least("max_len_cap", max_len_cap, expected="a positive int or None")
    return [min(limit, max_len_cap) for limit in limits]


def greedy_search(
    model: Seq2SeqModel,
    src: torch.Tensor,
    src_lengths: torch.Tensor,
    *,
    max_len: int | None = None,
    max_len_ratio: float = 1.5,
    max_len_extra: int = 10,
    max_len_cap: int | None = None,
    length_penalty: float = 1.0,
    need_attention: bool = False,
    need_self_attention: bool = False,
) -> list[Hypothesis]:
    """The most probable next token at every step, for each sentence of the batch.

    Args:
        model: any :class:`~qkv.models.interface.Seq2SeqModel`.
        src: ``(B, S)`` source ids; ``src_lengths``: integer ``(B,)``.
        max_len, max_len_ratio, max_len_extra, max_len_cap: the length limit (see the module docstring).
        length_penalty: ``alpha`` of the reported ``score`` (it does not change greedy's choices), so
            scores compare with :func:`beam_search`'s.
        need_attention, need_self_attention: attach the cross-/self-attention to each hypothesis.

    Returns:
        One :class:`Hypothesis` per sentence, in input order.
    """
    length_penalty = check_length_penalty(length_penalty)
    limits = search_limits(src, src_lengths, max_len, max_len_ratio, max_len_extra, max_len_cap)
    src_lens = src_lengths.tolist()
    results: list[Hypothesis | None] = [None] * len(limits)
    trace = AttentionTrace(need_attention, need_self_attention)
    with eval_no_grad(model):
        encoder_out = model.encode(src, src_lengths)
        state = model.start_state(encoder_out)
        device = encoder_out.memory.device
        sids = list(range(len(limits)))  # the sentence of each live row
        tokens: list[list[int]] = [[] for _ in sids]
        last = torch.full((len(sids), 1), model.bos_id, dtype=torch.long, device=device)
        total: torch.Tensor | None = None
        step = 0
        while sids:
            out = model.decode_step(last, encoder_out, state, need_attention=trace.wanted)
            trace.add_step(out)
            best, best_tokens = last_log_probs(out).max(dim=-1)
            total = best if total is None else total + best
            keep = []
            for row, (sid, token, log_prob) in enumerate(zip(sids, best_tokens.tolist(), total.tolist(), strict=True)):
                ended = token == model.eos_id
                if not ended:
                    tokens[row].append(token)
                if ended or step + 1 == limits[sid]:
                    results[sid] = trace.hypothesis(row, tokens[row], log_prob, ended, length_penalty, src_lens[sid])
                else:
                    keep.append(row)
            trace.add_parents(keep)
            if keep and len(keep) < len(sids):
                index = torch.tensor(keep, dtype=torch.long, device=device)
                state.reorder(index)
                encoder_out = encoder_out.reorder(index)
                best_tokens, total = best_tokens[index], total[index]
            sids, tokens = [sids[r] for r in keep], [tokens[r] for r in keep]
            last = best_tokens.unsqueeze(1)
            step += 1
    return [h for h in results if h is not None]


def beam_search(
    model: Seq2SeqModel,
    src: torch.Tensor,
    src_lengths: torch.Tensor,
    *,
    beam_size: int = 5,
    n_best: int = 1,
    length_penalty: float = 1.0,
    max_len: int | None = None,
    max_len_ratio: float = 1.5,
    max_len_extra: int = 10,
    max_len_cap: int | None = None,
    no_repeat_ngram: int = 0,
    need_attention: bool = False,
    need_self_attention: bool = False,
) -> list[list[Hypothesis]]:
    """Beam search, batched over sentences (``B · beam_size`` decoder rows).

    Each step extends every live hypothesis by every token and ranks the candidates of a sentence by
    summed log-probability. EOS candidates among the ``beam_size`` best end a hypothesis, which is set
    aside with its length-penalized score; the best ``beam_size`` other candidates stay live. A sentence
    stops when it has ``beam_size`` ended hypotheses and no live one can still beat the ``beam_size``-th
    best of them (its log-probability can only fall, so its best possible score is at the shortest or
    the longest remaining length), or at its length limit.

    Args:
        model: any :class:`~qkv.models.interface.Seq2SeqModel`.
        src: ``(B, S)`` source ids; ``src_lengths``: integer ``(B,)``.
        beam_size: live hypotheses per sentence; ``1`` with ``length_penalty=0`` equals greedy search.
        n_best: hypotheses returned per sentence, ``<= beam_size``.
        length_penalty: GNMT ``alpha``: ``score = log_prob / ((5 + length) / 6) ** alpha``.
        max_len, max_len_ratio, max_len_extra, max_len_cap: the length limit (see the module docstring).
        no_repeat_ngram: ``n > 0`` forbids any n-gram of output tokens to occur twice.
        need_attention, need_self_attention: attach each hypothesis' cross-/self-attention, following its
            ancestry through the beam reorderings.

    Returns:
        For each sentence, up to ``n_best`` hypotheses sorted by score, best first (fewer only when
        ``no_repeat_ngram`` or a tiny vocabulary leaves fewer candidates).
    """
    for name, value, low in (
        ("beam_size", beam_size, 1),
        ("n_best", n_best, 1),
        ("no_repeat_ngram", no_repeat_ngram, 0),
    ):
        int_at_least(name, value, low)
    if n_best > beam_size:
        raise ValueError(f"n_best must be <= beam_size; got n_best={n_best}, beam_size={beam_size}")
    length_penalty = check_length_penalty(length_penalty)
    limits = search_limits(src, src_lengths, max_len, max_len_ratio, max_len_extra, max_len_cap)
    src_lens = src_lengths.tolist()
    ended: list[list[Hypothesis]] = [[] for _ in limits]
    trace = AttentionTrace(need_attention, need_self_attention)
    with eval_no_grad(model):
        encoder_out = model.encode(src, src_lengths)
        state = model.start_state(encoder_out)
        device = encoder_out.memory.device
        sids = list(range(len(limits)))  # the sentence of each block of `width` rows
        width = 1  # one row per sentence at the first step, beam_size afterwards
        histories: list[list[int]] = [[] for _ in sids]
        last = torch.full((len(sids), 1), model.bos_id, dtype=torch.long, device=device)
        totals: torch.Tensor | None = None
        step = 0
        while sids:
            out = model.decode_step(last, encoder_out, state, need_attention=trace.wanted)
            trace.add_step(out)
            log_probs = last_log_probs(out)
            if no_repeat_ngram:
                _block_repeated_ngrams(log_probs, histories, no_repeat_ngram)
            vocab = log_probs.shape[-1]
            candidates = log_probs if totals is None else totals[:, None] + log_probs
            top_scores, top_ids = candidates.view(len(sids), width * vocab).topk(min(2 * beam_size, width * vocab))
            parents, new_tokens, new_totals, new_sids = [], [], [], []
            for block, (sid, scores, ids) in enumerate(zip(sids, top_scores.tolist(), top_ids.tolist(), strict=True)):
                hypothesis = functools.partial(trace.hypothesis, alpha=length_penalty, src_len=src_lens[sid])
                live, eos = _split_candidates(scores, ids, block * width, vocab, beam_size, model.eos_id)
                ended[sid].extend(hypothesis(row, histories[row], score, True) for row, score in eos)
                if step + 1 == limits[sid]:
                    ended[sid].extend(hypothesis(row, histories[row] + [tok], score, False) for row, tok, score in live)
                    continue
                if not live or _settled(ended[sid], live[0][2], step + 1, limits[sid], beam_size, length_penalty):
                    continue
                # Too few candidates (tiny vocabulary, blocked n-grams): pad with rows that can never win.
                live += [(live[0][0], live[0][1], -math.inf)] * (beam_size - len(live))
                new_sids.append(sid)
                for row, token, score in live:
                    parents.append(row)
                    new_tokens.append(token)
                    new_totals.append(score)
            if not new_sids:
                break
            trace.add_parents(parents)
            index = torch.tensor(parents, dtype=torch.long, device=device)
            state.reorder(index)
            encoder_out = encoder_out.reorder(index)
            histories = [histories[p] + [t] for p, t in zip(parents, new_tokens, strict=True)]
            totals = torch.tensor(new_totals, dtype=log_probs.dtype, device=log_probs.device)
            last = torch.tensor(new_tokens, dtype=torch.long, device=device).unsqueeze(1)
            sids, width = new_sids, beam_size
            step += 1
    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:n_best] for hyps in ended]


def _split_candidates(
    scores: list[float], ids: list[int], first_row: int, vocab: int, beam: int, eos_id: int
) -> tuple[list[tuple[int, int, float]], list[tuple[int, float]]]:
    """A sentence's ranked candidates (``ids`` into its ``(width · vocab)`` scores) → the ``beam`` best
    non-EOS ones as ``(row, token, score)``, and the EOS ones ranked among the ``beam`` best as
    ``(row, score)``."""
    live: list[tuple[int, int, float]] = []
    eos: list[tuple[int, float]] = []
    for rank, (score, index) in enumerate(zip(scores, ids, strict=True)):
        if score == -math.inf or len(live) == beam:
            break
        row, token = first_row + index // vocab, index % vocab
        if token != eos_id:
            live.append((row, token, score))
        elif rank < beam:
            eos.append((row, score))
    return live, eos


def _settled(ended: list[Hypothesis], best_live: float, length: int, limit: int, beam: int, alpha: float) -> bool:
    """Whether ``beam`` hypotheses have ended and none of the live ones (of summed log-probability at most
    ``best_live``, ``length`` steps so far) can end with a score above the ``beam``-th best of them."""
    if len(ended) < beam:
        return False
    threshold = sorted((h.score for h in ended), reverse=True)[beam - 1]
    # log-probabilities only fall; for a fixed one the score is monotone in the length, so the best
    # possible final score is at the shortest (one more step) or the longest (the limit) length.
    best = max(best_live / gnmt_length_penalty(length + 1, alpha), best_live / gnmt_length_penalty(limit, alpha))
    return best <= threshold


def _block_repeated_ngrams(log_probs: torch.Tensor, histories: list[list[int]], n: int) -> None:
    """Set to ``-inf``, in place, each token that would complete an n-gram already in a row's history."""
    for row, tokens in enumerate(histories):
        if len(tokens) < n:  # no earlier n-gram to repeat
            continue
        prefix = tokens[len(tokens) - n + 1 :] if n > 1 else []
        banned = {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i : i + n - 1] == prefix}
        if banned:
            log_probs[row, list(banned)] = -math.inf
