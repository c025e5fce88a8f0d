"""Micro-batching: concurrent translation requests merged into few ``translate`` calls, up to a token budget.

A model decodes a batch of sentences in little more time than one sentence, so a service that runs each
request on its own wastes most of its time when many small requests arrive together. :class:`MicroBatcher`
sits between the requests (coroutines on one event loop) and the model::

    request A ──┐                           ┌─> A's results
    request B ──┼─> backlog ─> worker ─> translate(A + B + C) in the model thread
    request C ──┘                           └─> B's, C's results

Each request (a list of sentences and :class:`DecodingOptions`) joins a backlog and waits. One worker
coroutine takes the oldest waiting request's options and waits until the sentences waiting with the same
options reach ``max_batch_tokens`` source tokens, or until that request has waited ``max_wait_ms``; it then
takes sentences in arrival order while they fit in the budget (at least one, so a sentence longer than the
budget runs alone; a request may be split across batches), runs one ``translate`` call on a single-thread
executor (the model is never used by two threads at once, and the event loop stays free to accept
requests meanwhile), and hands each request exactly its own results, in its order. Requests with other
options wait for a later batch. While a batch runs, new requests gather, so under load the next batch
starts at once, full.

An exception from ``translate`` fails the requests that had sentences in that batch, and no others. A
request whose caller stops waiting (cancelled: the client went away) has its untaken sentences dropped.
:meth:`MicroBatcher.close` refuses new requests, finishes the waiting ones, then stops the worker and the
model thread.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

from qkv.checks import int_at_least, non_negative_number
from qkv.train.translate import Translation

DEFAULT_MAX_BATCH_TOKENS = 4096
DEFAULT_MAX_WAIT_MS = 5.0


@dataclass(frozen=True)
class DecodingOptions:
    """How a request wants its sentences decoded; only requests with equal options share a batch.

    The arguments of :meth:`qkv.train.translate.Translator.translate` of the same names.
    """

    beam: int = 5
    length_penalty: float = 1.0
    max_output_length: int | None = None
    need_attention: bool = False


class SupportsTranslate(Protocol):
    """What the batcher needs of a translator (:class:`qkv.train.translate.Translator` has it)."""

    def translate(
        self,
        sentences: Sequence[str],
        *,
        beam: int,
        length_penalty: float,
        max_output_length: int | None,
        need_attention: bool,
    ) -> list[Translation]: ...


class BatcherClosed(RuntimeError):
    """A request came after :meth:`MicroBatcher.close` (or before :meth:`MicroBatcher.start`)."""


@dataclass(eq=False)
class _Request:
    """One caller's sentences and where their results go."""

    sentences: Sequence[str]
    tokens: list[int]
    options: DecodingOptions
    future: asyncio.Future[list[Translation]]
    arrived: float
    results: list[Translation | None] = field(init=False)
    taken: int = 0  # sentences [0, taken) are in a batch already
    missing: int = field(init=False)  # results not yet delivered

    def __post_init__(self) -> None:
        self.results = [None] * len(self.sentences)
        self.missing = len(self.sentences)

    @property
    def waiting(self) -> bool:
        """Has sentences not yet in a batch, and a caller still waiting for them."""
        return self.taken < len(self.sentences) and not self.future.done()


class MicroBatcher:
    """Merges concurrent :meth:`translate` calls into batched ``translator.translate`` calls (module docstring).

    Use it on one event loop, started and closed there::

        async with MicroBatcher(translator, count_tokens=lambda s: len(tokenizer.encode(s))) as batcher:
            texts = [t.text for t in await batcher.translate(["a b c"], DecodingOptions(beam=5))]

    Args:
        translator: what runs the batches, in a thread of its own.
        max_batch_tokens: the most source tokens (summed over the sentences, as ``count_tokens`` counts
            them) one ``translate`` call gets; a single longer sentence runs alone.
        max_wait_ms: the longest a request waits for others to join its batch before the batch runs.
        count_tokens: the source tokens of a sentence (default: its characters); counted as at least 1.
    """

    def __init__(
        self,
        translator: SupportsTranslate,
        *,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        count_tokens: Callable[[str], int] = len,
    ) -> None:
        self.max_batch_tokens = int_at_least("max_batch_tokens", max_batch_tokens)
        self.max_wait = non_negative_number("max_wait_ms", max_wait_ms) / 1000
        self._translator = translator
        self._count_tokens = count_tokens
        self._backlog: deque[_Request] = deque()
        self._arrived = asyncio.Event()
        self._accepting = False
        self._stopping = False
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.batches = 0  # translate calls made, for monitoring

    @property
    def waiting_sentences(self) -> int:
        """Sentences accepted but not yet in a batch."""
        return sum(len(r.sentences) - r.taken for r in self._backlog if r.waiting)

    async def start(self) -> None:
        """Start the worker and the model thread (on the running event loop)."""
        if self._worker is not None:
            raise RuntimeError("this MicroBatcher was started already; a closed one cannot be restarted")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qkv-translate")
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="qkv-micro-batcher")
        self._accepting = True

    async def close(self) -> None:
        """Refuse new requests, finish the ones waiting, then stop the worker and the model thread."""
        self._accepting = False
        self._stopping = True
        self._arrived.set()
        if self._worker is not None:
            await self._worker
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def __aenter__(self) -> MicroBatcher:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def translate(self, sentences: Sequence[str], options: DecodingOptions) -> list[Translation]:
        """The translations of ``sentences``, in their order, decoded with ``options`` in shared batches.

        Raises:
            BatcherClosed: the batcher is not started, or closed.
            Exception: whatever ``translator.translate`` raised on a batch holding these sentences.
        """
        if not self._accepting:
            raise BatcherClosed("the translation batcher is not running (not started, or shutting down)")
        if not sentences:
            return []
        loop = asyncio.get_running_loop()
        tokens = [max(1, self._count_tokens(s)) for s in sentences]
        request = _Request(list(sentences), tokens, options, loop.create_future(), time.monotonic())
        self._backlog.append(request)
        self._arrived.set()
        return await request.future

    async def _work(self) -> None:
        try:
            while True:
                head = await self._oldest_waiting()
                if head is None:
                    return
                await self._wait_for_batch(head)
                batch = self._take_batch(head.options)
                await self._run(batch, head.options)
        except BaseException as e:  # a bug here must not leave callers waiting forever
            error = e if isinstance(e, Exception) else BatcherClosed("the translation batcher was stopped")
            for request in self._backlog:
                if not request.future.done():
                    request.future.set_exception(error)
            self._backlog.clear()
            raise

    async def _oldest_waiting(self) -> _Request | None:
        """The oldest request with sentences to batch; ``None`` once closing and nothing waits."""
        while True:
            self._arrived.clear()
            while self._backlog and not self._backlog[0].waiting:
                self._backlog.popleft()  # taken whole (its batch delivers to it) or abandoned
            if self._backlog:
                return next(r for r in self._backlog if r.waiting)
            if self._stopping:
                return None
            await self._arrived.wait()

    def _tokens_waiting(self, options: DecodingOptions) -> int:
        return sum(sum(r.tokens[r.taken :]) for r in self._backlog if r.waiting and r.options == options)

    async def _wait_for_batch(self, head: _Request) -> None:
        """Until the sentences waiting with ``head``'s options fill the budget, or ``head`` has waited enough."""
        deadline = head.arrived + self.max_wait
        while not self._stopping and head.waiting and self._tokens_waiting(head.options) < self.max_batch_tokens:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    def _take_batch(self, options: DecodingOptions) -> list[tuple[_Request, int]]:
        """``(request, sentence index)`` in arrival order while they fit in the budget (at least one)."""
        batch: list[tuple[_Request, int]] = []
        used = 0
        for request in self._backlog:
            if not request.waiting or request.options != options:
                continue
            while request.taken < len(request.sentences):
                tokens = request.tokens[request.taken]
                if batch and used + tokens > self.max_batch_tokens:
                    return batch
                batch.append((request, request.taken))
                used += tokens
                request.taken += 1
        return batch

    async def _run(self, batch: list[tuple[_Request, int]], options: DecodingOptions) -> None:
        """Translate ``batch`` in the model thread and deliver each result to its request."""
        if not batch:
            return
        assert self._executor is not None, "start() made the executor"
        call = functools.partial(
            self._translator.translate,
            [request.sentences[i] for request, i in batch],
            beam=options.beam,
            length_penalty=options.length_penalty,
            max_output_length=options.max_output_length,
            need_attention=options.need_attention,
        )
        self.batches += 1
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, call)
            if len(results) != len(batch):
                raise RuntimeError(f"the translator returned {len(results)} results for {len(batch)} sentences")
        except Exception as e:
            for request, _ in batch:
                if not request.future.done():
                    request.future.set_exception(e)
            return
        for (request, i), result in zip(batch, results, strict=True):
            request.results[i] = result
            request.missing -= 1
            if request.missing == 0 and not request.future.done():
                request.future.set_result([r for r in request.results if r is not None])
