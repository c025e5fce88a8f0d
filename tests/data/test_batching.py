"""Batching: token budget, every example once, determinism under a seed, exact resume, evaluation order."""

from __future__ import annotations

import json
import random

import pytest
import torch

from qkv.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    BatchPosition,
    DataError,
    SequentialBatcher,
    TokenBatcher,
    collate,
    restore_order,
)


def make_examples(n: int = 600, seed: int = 0, longest: int = 40) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        src_len = rng.randint(1, longest)
        tgt_len = max(0, src_len + rng.randint(-5, 5))
        examples.append(([rng.randint(4, 50) for _ in range(src_len)], [rng.randint(4, 50) for _ in range(tgt_len)]))
    return examples


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.src, y.src) and torch.equal(x.tgt_out, y.tgt_out) and torch.equal(x.indices, y.indices)
        for x, y in zip(a, b, strict=True)
    )


def test_collate_pads_and_shifts():
    batch = collate([([5, 6, 7], [8, 9]), ([5], [])], [10, 3])
    assert batch.src.tolist() == [[5, 6, 7], [5, PAD_ID, PAD_ID]]
    assert batch.src_lengths.tolist() == [3, 1]
    assert batch.tgt_in.tolist() == [[BOS_ID, 8, 9], [BOS_ID, PAD_ID, PAD_ID]]
    assert batch.tgt_out.tolist() == [[8, 9, EOS_ID], [EOS_ID, PAD_ID, PAD_ID]]
    assert batch.tgt_lengths.tolist() == [3, 1]
    assert batch.indices.tolist() == [10, 3]
    assert batch.src.dtype == batch.tgt_in.dtype == batch.src_lengths.dtype == torch.long
    assert batch.size == 2 and batch.num_tgt_tokens == 4
    moved = batch.to("cpu")
    assert torch.equal(moved.tgt_out, batch.tgt_out)


def test_each_batch_matches_its_examples():
    examples = make_examples(200)
    for batch in TokenBatcher(examples, max_tokens=300, seed=1):
        for row, i in enumerate(batch.indices.tolist()):
            src, tgt = examples[i]
            n, t = len(src), len(tgt)
            assert batch.src[row, :n].tolist() == src and (batch.src[row, n:] == PAD_ID).all()
            assert batch.src_lengths[row] == n
            assert batch.tgt_in[row, : t + 1].tolist() == [BOS_ID, *tgt]
            assert batch.tgt_out[row, : t + 1].tolist() == [*tgt, EOS_ID]
            assert (batch.tgt_in[row, t + 1 :] == PAD_ID).all() and (batch.tgt_out[row, t + 1 :] == PAD_ID).all()


@pytest.mark.parametrize("max_tokens", [46, 256, 2000])
def test_token_budget_counts_padding_and_every_example_appears_once(max_tokens):
    examples = make_examples()
    batcher = TokenBatcher(examples, max_tokens=max_tokens, seed=0, bucket_size=128)
    for _ in range(2):  # two epochs
        seen = []
        for batch in batcher:
            assert batch.src.numel() <= max_tokens and batch.tgt_in.numel() <= max_tokens
            seen += batch.indices.tolist()
        assert sorted(seen) == list(range(len(examples)))


def test_bucketing_keeps_padding_low():
    examples = make_examples(2000)
    real = sum(len(s) for s, _ in examples)
    padded = sum(b.src.numel() for b in TokenBatcher(examples, max_tokens=1000, seed=0, bucket_size=2000))
    assert real / padded > 0.85
    # Without sorting, batches of random lengths, the padding is far larger.
    unsorted = sum(b.src.numel() for b in SequentialBatcher(examples, max_tokens=1000))
    assert real / unsorted < 0.7


@pytest.mark.parametrize("bucket_size", [1, 7, 40])
def test_buckets_smaller_than_a_batch_still_give_full_batches(bucket_size):
    """A bucket's partly filled last batch joins the next bucket: with every example 10 tokens and room for
    12, all batches but one hold 12 examples, whatever the bucket size."""
    rng = random.Random(0)
    examples = [([rng.randint(4, 50) for _ in range(10)], [4] * 9) for _ in range(100)]
    batcher = TokenBatcher(examples, max_tokens=120, seed=0, bucket_size=bucket_size)
    for epoch in range(2):
        sizes = sorted(len(b) for b in batcher.plan(epoch))
        assert sizes == [4] + [12] * 8
        assert sorted(i for b in batcher.plan(epoch) for i in b) == list(range(100))


def test_same_seed_same_batches_other_epoch_or_seed_other_order():
    examples = make_examples()
    a = TokenBatcher(examples, max_tokens=400, seed=7)
    b = TokenBatcher(examples, max_tokens=400, seed=7)
    epoch0_a, epoch0_b = list(a), list(b)
    assert same_batches(epoch0_a, epoch0_b)
    assert a.plan(0) == b.plan(0)
    epoch1 = list(a)
    assert a.position.epoch == 1
    assert not same_batches(epoch0_a, epoch1)
    assert a.plan(1) != a.plan(0)
    assert TokenBatcher(examples, max_tokens=400, seed=8).plan(0) != a.plan(0)


@pytest.mark.parametrize("stop_after", [0, 1, 7, 21])
def test_resume_from_a_position_gives_the_same_remaining_batches(stop_after):
    examples = make_examples()
    reference = TokenBatcher(examples, max_tokens=500, seed=3)
    first_epoch = list(reference)
    second_epoch = list(reference)

    run = TokenBatcher(examples, max_tokens=500, seed=3)
    iterator = iter(run)
    for _ in range(stop_after):
        next(iterator)
    state = json.loads(json.dumps(run.state_dict()))  # as a checkpoint would store it
    assert (state["epoch"], state["batch"]) == (0, stop_after)

    resumed = TokenBatcher(examples, max_tokens=500, seed=3)
    resumed.load_state_dict(state)
    assert same_batches(list(resumed), first_epoch[stop_after:])
    assert same_batches(list(resumed), second_epoch)


def test_resume_at_the_end_of_an_epoch_starts_the_next():
    examples = make_examples()
    reference = TokenBatcher(examples, max_tokens=500, seed=3)
    list(reference)
    next_epoch = list(reference)
    run = TokenBatcher(examples, max_tokens=500, seed=3)
    list(run)
    assert run.position == BatchPosition(0, run.num_batches(0))
    resumed = TokenBatcher(examples, max_tokens=500, seed=3)
    resumed.load_state_dict(run.state_dict())
    assert same_batches(list(resumed), next_epoch)
    resumed.position = BatchPosition(0, resumed.num_batches(0) + 1)
    with pytest.raises(DataError, match=r"past the end of epoch 0"):
        next(iter(resumed))


def test_resume_refuses_other_data_or_settings():
    examples = make_examples()
    state = TokenBatcher(examples, max_tokens=500, seed=3).state_dict()
    with pytest.raises(DataError, match="cannot resume: the saved batcher had seed 3 but this one has 4"):
        TokenBatcher(examples, max_tokens=500, seed=4).load_state_dict(state)
    other = [(src, tgt[:-1] if tgt else tgt) for src, tgt in examples]
    with pytest.raises(DataError, match="cannot resume: the saved batcher had fingerprint"):
        TokenBatcher(other, max_tokens=500, seed=3).load_state_dict(state)
    older = {key: value for key, value in state.items() if key != "plan_version"}  # before the rule had a number
    with pytest.raises(DataError, match="cannot resume: the saved batcher planned its batches by rule 1"):
        TokenBatcher(examples, max_tokens=500, seed=3).load_state_dict(older)


def test_bad_examples_are_named():
    message = r"example 1 alone needs 21 tokens \(source 3, target 20 \+ 1\) but max_tokens is 16"
    with pytest.raises(DataError, match=message):
        TokenBatcher([([5], [6]), ([5, 6, 7], [8] * 20)], max_tokens=16)
    with pytest.raises(DataError, match="example 0 has an empty source"):
        TokenBatcher([([], [6])], max_tokens=16)
    with pytest.raises(DataError, match="no examples to batch"):
        SequentialBatcher([], max_tokens=16)
    with pytest.raises(DataError, match="max_tokens must be an integer >= 2"):
        TokenBatcher([([5], [6])], max_tokens=0)


def test_sequential_batches_keep_input_order():
    examples = make_examples(300)
    batcher = SequentialBatcher(examples, max_tokens=300)
    order = [i for batch in batcher for i in batch.indices.tolist()]
    assert order == list(range(300))
    assert len(batcher) == len(list(batcher))
    assert all(b.src.numel() <= 300 and b.tgt_in.numel() <= 300 for b in batcher)


def test_sorted_evaluation_batches_restore_to_input_order():
    examples = make_examples(300)
    batcher = SequentialBatcher(examples, max_tokens=300, sort_by_length=True)
    indices, outputs = [], []
    for batch in batcher:
        assert batch.src.numel() <= 300
        indices += batch.indices.tolist()
        outputs += [row[: int(n)].tolist() for row, n in zip(batch.src, batch.src_lengths, strict=True)]  # "output"
    assert indices != list(range(300))
    lengths = [len(examples[i][0]) for i in indices]
    assert lengths == sorted(lengths, reverse=True)
    assert restore_order(outputs, indices) == [src for src, _ in examples]


def test_source_only_examples_for_translation():
    batch = next(iter(SequentialBatcher([([5, 6], []), ([7], [])], max_tokens=10)))
    assert batch.tgt_in.tolist() == [[BOS_ID], [BOS_ID]] and batch.tgt_out.tolist() == [[EOS_ID], [EOS_ID]]


def test_restore_order_checks_the_indices():
    assert restore_order(["b", "c", "a"], [1, 2, 0]) == ["a", "b", "c"]
    with pytest.raises(DataError, match=r"indices must be a permutation of 0 \.\. 2"):
        restore_order(["b", "c", "a"], [1, 1, 0])
