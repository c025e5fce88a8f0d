"""MicroBatcher without HTTP: a fake translator records every batch it gets.

Concurrent requests share a batch, a batch stays within the token budget and holds one set of options, each
request gets exactly its own results, a failing batch fails only its requests, cancelled requests are
dropped, the model runs in one thread at a time, and close() finishes what waits and stops the thread.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Sequence

import pytest

from qkv.checks import ConfigError
from qkv.deploy.micro_batcher import BatcherClosed, DecodingOptions, MicroBatcher
from qkv.train.translate import Translation

GREEDY = DecodingOptions(beam=1)
BEAM = DecodingOptions(beam=5)


class RecordingTranslator:
    """Translates ``s`` to ``"S|beam"``; records each batch and the threads it ran on; raises on "boom"."""

    def __init__(self, *, delay: float = 0.0) -> None:
        self.delay = delay
        self.batches: list[tuple[list[str], int]] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()  # cleared: the next batch blocks until it is set
        self.gate.set()
        self.entered = threading.Event()
        self._lock = threading.Lock()
        self.active = self.most_active = 0

    def translate(
        self,
        sentences: Sequence[str],
        *,
        beam: int,
        length_penalty: float,
        max_output_length: int | None,
        need_attention: bool,
    ) -> list[Translation]:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            self.batches.append((list(sentences), beam))
            self.threads.add(threading.current_thread().name)
            self.entered.set()
            self.gate.wait(10)
            time.sleep(self.delay)
            if "boom" in sentences:
                raise ValueError("the model failed on 'boom'")
            return [Translation(s, expected(s, beam), None, [], []) for s in sentences]
        finally:
            with self._lock:
                self.active -= 1


def expected(sentence: str, beam: int) -> str:
    return f"{sentence.upper()}|{beam}"


def texts(results: list[Translation]) -> list[str]:
    return [r.text for r in results]


def test_concurrent_requests_share_one_batch_and_each_gets_its_own_results() -> None:
    fake = RecordingTranslator()

    async def main() -> list[list[str]]:
        async with MicroBatcher(fake, max_wait_ms=200) as batcher:
            requests = [["a", "b"], ["c"], ["d", "e", "f"]]
            return [texts(r) for r in await asyncio.gather(*(batcher.translate(s, BEAM) for s in requests))]

    assert asyncio.run(main()) == [["A|5", "B|5"], ["C|5"], ["D|5", "E|5", "F|5"]]
    assert fake.batches == [(["a", "b", "c", "d", "e", "f"], 5)]
    assert len(fake.threads) == 1 and next(iter(fake.threads)).startswith("qkv-translate")


def test_batches_stay_within_the_token_budget_and_a_longer_sentence_runs_alone() -> None:
    fake = RecordingTranslator()

    async def main() -> list[list[str]]:
        async with MicroBatcher(fake, max_batch_tokens=10, max_wait_ms=100, count_tokens=len) as batcher:
            requests = [["aaaa", "bbbb", "cccc"], ["x" * 15], ["dddd", "ee"]]
            return [texts(r) for r in await asyncio.gather(*(batcher.translate(s, GREEDY) for s in requests))]

    results = asyncio.run(main())
    assert results == [["AAAA|1", "BBBB|1", "CCCC|1"], ["X" * 15 + "|1"], ["DDDD|1", "EE|1"]]
    # Arrival order, cut where the next sentence would pass 10 tokens; the 15-token one alone.
    assert [batch for batch, _ in fake.batches] == [["aaaa", "bbbb"], ["cccc"], ["x" * 15], ["dddd", "ee"]]


def test_a_full_budget_runs_at_once_and_a_lone_request_waits_for_company() -> None:
    fake = RecordingTranslator()

    async def timed(batcher: MicroBatcher, sentence: str) -> float:
        start = time.perf_counter()
        await batcher.translate([sentence], GREEDY)
        return time.perf_counter() - start

    async def main() -> tuple[float, float]:
        async with MicroBatcher(fake, max_batch_tokens=8, max_wait_ms=5_000, count_tokens=len) as waiting:
            full = await timed(waiting, "12345678")
        async with MicroBatcher(fake, max_batch_tokens=8, max_wait_ms=150, count_tokens=len) as short:
            alone = await timed(short, "1234")
        return full, alone

    full, alone = asyncio.run(main())
    assert full < 2.5  # did not wait the 5 s: the budget was full
    assert alone >= 0.15  # waited max_wait_ms for others to fill the batch


def test_requests_with_other_options_wait_for_their_own_batch() -> None:
    fake = RecordingTranslator()

    async def main() -> list[list[str]]:
        async with MicroBatcher(fake, max_wait_ms=100) as batcher:
            calls = [
                batcher.translate(["a"], BEAM),
                batcher.translate(["b"], GREEDY),
                batcher.translate(["c"], BEAM),
                batcher.translate(["d"], GREEDY),
            ]
            return [texts(r) for r in await asyncio.gather(*calls)]

    assert asyncio.run(main()) == [["A|5"], ["B|1"], ["C|5"], ["D|1"]]
    assert fake.batches == [(["a", "c"], 5), (["b", "d"], 1)]


def test_many_concurrent_requests_split_across_batches_get_exactly_their_results() -> None:
    fake = RecordingTranslator(delay=0.002)
    rng = random.Random(0)
    requests = [[f"r{r}s{i}-" + "x" * rng.randint(0, 6) for i in range(rng.randint(1, 5))] for r in range(40)]
    options = [rng.choice((GREEDY, BEAM)) for _ in requests]

    async def client(batcher: MicroBatcher, sentences: list[str], option: DecodingOptions) -> list[str]:
        await asyncio.sleep(rng.random() * 0.02)
        return texts(await batcher.translate(sentences, option))

    async def main() -> list[list[str]]:
        async with MicroBatcher(fake, max_batch_tokens=30, max_wait_ms=3, count_tokens=len) as batcher:
            return await asyncio.gather(*(client(batcher, s, o) for s, o in zip(requests, options, strict=True)))

    results = asyncio.run(main())
    assert results == [[expected(s, o.beam) for s in r] for r, o in zip(requests, options, strict=True)]
    assert 1 < len(fake.batches) < sum(map(len, requests))  # merged, and split by the budget
    for batch, _ in fake.batches:
        assert sum(map(len, batch)) <= 30 or len(batch) == 1
    assert sorted(s for batch, _ in fake.batches for s in batch) == sorted(s for r in requests for s in r)
    assert fake.most_active == 1 and len(fake.threads) == 1


def test_a_failing_batch_fails_only_its_requests() -> None:
    fake = RecordingTranslator()

    async def main() -> list[object]:
        async with MicroBatcher(fake, max_batch_tokens=4, max_wait_ms=100, count_tokens=len) as batcher:
            calls = [
                batcher.translate(["aaaa"], GREEDY),
                batcher.translate(["boom"], GREEDY),
                batcher.translate(["cccc", "boom"], GREEDY),  # split: its second batch fails
                batcher.translate(["dddd"], GREEDY),
            ]
            outcome = await asyncio.gather(*calls, return_exceptions=True)
            after = texts(await batcher.translate(["eeee"], GREEDY))  # the batcher still serves
            return [*outcome, after]

    first, failed, split, last, after = asyncio.run(main())
    assert texts(first) == ["AAAA|1"] and texts(last) == ["DDDD|1"] and after == ["EEEE|1"]
    assert isinstance(failed, ValueError) and "boom" in str(failed)
    assert isinstance(split, ValueError)


def test_a_cancelled_request_is_dropped_and_close_finishes_what_waits() -> None:
    fake = RecordingTranslator()

    async def main() -> tuple[list[str], list[str]]:
        batcher = MicroBatcher(fake, max_wait_ms=0)
        await batcher.start()
        fake.gate.clear()
        first = asyncio.ensure_future(batcher.translate(["first"], GREEDY))
        while not fake.entered.is_set():  # the first batch is in the model thread, held there
            await asyncio.sleep(0.001)
        gone = asyncio.ensure_future(batcher.translate(["gone"], GREEDY))
        kept = asyncio.ensure_future(batcher.translate(["kept"], GREEDY))
        await asyncio.sleep(0.01)
        assert batcher.waiting_sentences == 2
        gone.cancel()
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.01)
        with pytest.raises(BatcherClosed):
            await batcher.translate(["late"], GREEDY)
        fake.gate.set()
        await closing
        return texts(await first), texts(await kept)

    assert asyncio.run(main()) == (["FIRST|1"], ["KEPT|1"])
    assert [batch for batch, _ in fake.batches] == [["first"], ["kept"]]
    assert not [t for t in threading.enumerate() if t.name.startswith("qkv-translate")]


def test_a_request_before_start_is_refused_and_bad_settings_name_the_argument() -> None:
    fake = RecordingTranslator()
    with pytest.raises(BatcherClosed, match="not running"):
        asyncio.run(MicroBatcher(fake).translate(["a"], GREEDY))
    with pytest.raises(ConfigError, match=r"max_batch_tokens must be an int >= 1; got 0"):
        MicroBatcher(fake, max_batch_tokens=0)
    with pytest.raises(ConfigError, match=r"max_wait_ms must be a number >= 0; got -1"):
        MicroBatcher(fake, max_wait_ms=-1)
