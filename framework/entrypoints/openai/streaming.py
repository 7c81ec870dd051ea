"""Server-sent events, per-choice text deltas, and aborting when the client goes away.

A request's engine work must end as soon as nobody waits for it:

* streaming: ``ClosingStreamingResponse`` closes its body generator however
  the response ends (finished, client disconnect, server shutdown), and the
  generator's ``finally`` aborts the engine requests;
* non-streaming: ``until_disconnect`` runs the handler while listening for
  ``http.disconnect`` and cancels it when the client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Optional

from fastapi import Request, Response
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from framework.engine.async_engine import EngineDeadError, EngineStepError
from framework.entrypoints.openai.errors import APIError
from framework.outputs import CompletionOutput

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


class ClosingStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that always closes its body iterator."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def sse_response(chunks: AsyncIterator[Any]) -> StreamingResponse:
    """Stream chunks as ``data: {json}`` events, then ``data: [DONE]``.

    An error midway becomes one ``data: {"error": {...}}`` event before
    ``[DONE]``: the status line has already been sent.
    """
    return ClosingStreamingResponse(_events(chunks), media_type="text/event-stream")


async def _events(chunks: AsyncIterator[Any]) -> AsyncIterator[str]:
    async with contextlib.aclosing(chunks):
        try:
            async for chunk in chunks:
                yield f"data: {_json(chunk)}\n\n"
        except Exception as exc:  # reported in-band: the status line is sent
            yield stream_error(exc).sse_event()
    yield DONE


def stream_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (EngineStepError, EngineDeadError)):
        return APIError(500, str(exc), code="engine_error")
    logger.exception("a stream failed")
    return APIError(500, f"internal server error: {type(exc).__name__}: {exc}")


def _json(chunk: Any) -> str:
    if isinstance(chunk, BaseModel):
        return chunk.model_dump_json()
    return json.dumps(chunk)


async def until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run ``work``; cancel it (which aborts its engine requests) if the client disconnects."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return Response(status_code=499)  # nobody reads it: the client is gone
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class _Sent:
    chars: int = 0
    tokens: int = 0
    finished: bool = False


@dataclass
class ChoiceDelta:
    text: str
    token_start: int  # new tokens are token_ids[token_start:token_end]
    token_end: int
    finish_reason: Optional[str]
    stop_reason: Any


@dataclass
class DeltaTracker:
    """What each choice has sent so far; turns cumulative outputs into deltas.

    While a choice runs, the last ``holdback`` characters stay unsent: a stop
    string may still match there and cut them off the final text.
    """

    holdback: int = 0
    sent: dict[int, _Sent] = field(default_factory=dict)

    def delta(self, index: int, output: CompletionOutput) -> Optional[ChoiceDelta]:
        """The new part of ``output`` for choice ``index``; None once it has finished."""
        sent = self.sent.setdefault(index, _Sent())
        if sent.finished:
            return None
        finished = output.finish_reason is not None
        text = output.text
        end = len(text) if finished else max(sent.chars, len(text) - self.holdback)
        delta = ChoiceDelta(
            text[sent.chars : end], sent.tokens, len(output.token_ids),
            output.finish_reason, output.stop_reason,
        )  # fmt: skip
        sent.chars, sent.tokens, sent.finished = end, len(output.token_ids), finished
        return delta
