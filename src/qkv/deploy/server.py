"""The HTTP JSON API of ``qkv serve``: a FastAPI app over a :class:`~qkv.train.translate.Translator`.

``POST /translate`` takes ``{"text": [...], "beam": 5, ...}`` (:mod:`qkv.deploy.request` lists every key,
limit and error) and returns one object per input string, in input order::

    {"translations": [{"text": "Dienstag, 9. März 1993"}, ...]}

With ``"alignment": true`` each object also holds the source and output token strings and, for each output
token ``t``, the source position it attends most, averaged over the decoder's layers and heads::

    alignment[t] = argmax_s mean_{layer, head} cross_attention[layer, head, t, s]

``GET /health`` answers ``{"status": "ok", ...}`` with the sentences waiting and the limits, once the app
has started. Concurrent requests share batches (:class:`~qkv.deploy.micro_batcher.MicroBatcher`); the
model runs in one thread of its own, so the event loop keeps accepting requests while it decodes.

Errors are JSON too, ``{"error": {"message": ..., ...}}``: 4xx for a bad request (naming the field, the
value and the limit), 404/405 for a wrong path or method, 500 when decoding failed, 503 while shutting down.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qkv.deploy.micro_batcher import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_WAIT_MS, BatcherClosed, MicroBatcher
from qkv.deploy.request import (
    RequestError,
    ServeLimits,
    TranslateRequest,
    decode_json,
    parse_translate_request,
    too_large_body,
)
from qkv.train.translate import Translation, Translator, output_length_cap


def source_alignment(cross_attention: torch.Tensor) -> list[int]:
    """For each output token, the source position it attends most, averaged over layers and heads.

    Args:
        cross_attention: ``(layers, heads, T, S)``, a hypothesis' cross-attention.

    Returns:
        ``T`` ints in ``[0, S)``.
    """
    return [int(i) for i in cross_attention.float().mean(dim=(0, 1)).argmax(dim=-1).tolist()]


def translation_json(translation: Translation | None, *, alignment: bool) -> dict[str, Any]:
    """One entry of ``"translations"``; ``None`` is a blank input (translated as ``""``)."""
    if translation is None:
        return {"text": "", "source_tokens": [], "target_tokens": [], "alignment": []} if alignment else {"text": ""}
    out: dict[str, Any] = {"text": translation.text}
    if alignment:
        hypothesis = translation.hypothesis
        attention = hypothesis.cross_attention if hypothesis is not None else None
        out["source_tokens"] = translation.src_tokens
        out["target_tokens"] = translation.tgt_tokens
        out["alignment"] = source_alignment(attention) if attention is not None else None
    return out


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused once it is known to exceed ``limit`` bytes (by its Content-Length, or while
    it streams in, so a huge body is never held in memory).

    Raises:
        RequestError: 413, the body is over ``limit``.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large_body(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large_body(None, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: HTTPStatus | int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=int(status))


def create_app(
    translator: Translator,
    *,
    limits: ServeLimits | None = None,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
) -> FastAPI:
    """The translation service's app (module docstring); its micro-batcher runs while the app is started.

    Args:
        translator: the model and tokenizers (:meth:`Translator.load`).
        limits: what one request may ask for (default :class:`ServeLimits`'s defaults).
        max_batch_tokens, max_wait_ms: the micro-batching budget and wait (:class:`MicroBatcher`).

    Raises:
        ConfigError: ``max_batch_tokens`` or ``max_wait_ms`` is out of range.
    """
    limits = limits or ServeLimits()
    output_cap = output_length_cap(translator.model)
    tokenizer = translator.src_tokenizer
    batcher = MicroBatcher(
        translator,
        max_batch_tokens=max_batch_tokens,
        max_wait_ms=max_wait_ms,
        count_tokens=lambda sentence: len(tokenizer.encode(sentence)),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with batcher:
            yield

    app = FastAPI(title="qkv translation service", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse(
            {
                "status": "ok",
                "waiting_sentences": batcher.waiting_sentences,
                "batches": batcher.batches,
                "limits": {**limits.to_dict(), "max_output_length": output_cap},
            }
        )

    @app.post("/translate")
    async def translate(request: Request) -> JSONResponse:
        try:
            data = decode_json(await read_body(request, limits.max_body_bytes))
            parsed = parse_translate_request(data, limits, max_output_length=output_cap)
        except RequestError as e:
            return JSONResponse(e.body(), status_code=int(e.status))
        try:
            results = await _translate(batcher, parsed)
        except BatcherClosed as e:
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, str(e))
        except Exception as e:  # the model failed on a batch holding this request: the server itself is fine
            return _error(HTTPStatus.INTERNAL_SERVER_ERROR, f"translation failed: {type(e).__name__}: {e}")
        alignment = parsed.options.need_attention
        return JSONResponse({"translations": [translation_json(r, alignment=alignment) for r in results]})

    return app


async def _translate(batcher: MicroBatcher, request: TranslateRequest) -> list[Translation | None]:
    """The translations of ``request.text`` in order; ``None`` for a blank string (no model call)."""
    live = [i for i, sentence in enumerate(request.text) if sentence.strip()]
    found = await batcher.translate([request.text[i] for i in live], request.options)
    results: list[Translation | None] = [None] * len(request.text)
    for i, translation in zip(live, found, strict=True):
        results[i] = translation
    return results
