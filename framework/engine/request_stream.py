"""``RequestStream``: the outputs of one request of the ``AsyncLLMEngine``, on the event loop."""

from __future__ import annotations

import asyncio
from typing import Callable, Optional

from framework.outputs import RequestOutput


class RequestStream:
    """The outputs of one request, read with ``async for`` on the event loop.

    ``admitted()`` waits until the engine accepted the prompt (it raises the
    engine's ``ValueError`` for an invalid one). ``close()`` aborts the
    request unless it already finished; call it in a ``finally``.
    """

    def __init__(self, request_id: str, num_seqs: int, loop: asyncio.AbstractEventLoop, abort: Callable[[str], None]):
        self.request_id = request_id
        self.num_seqs = num_seqs  # sequences it occupies (n choices: n)
        self._abort = abort
        self._admitted: asyncio.Future = loop.create_future()
        self._latest: Optional[RequestOutput] = None
        self._error: Optional[BaseException] = None
        self._done = False  # the last output has been put (or an error)
        self._wakeup = asyncio.Event()

    @property
    def finished(self) -> bool:
        return self._done

    async def admitted(self) -> None:
        await asyncio.shield(self._admitted)

    @property
    def answered(self) -> bool:
        """The engine thread has accepted or refused the request."""
        return self._admitted.done()

    def close(self) -> None:
        if not self._done:
            self._abort(self.request_id)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self._latest is not None:
                out, self._latest = self._latest, None
                return out
            if self._error is not None:
                raise self._error
            if self._done:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    # -- fed on the event loop by the engine ---------------------------------

    def _set_admitted(self, error: Optional[BaseException]) -> None:
        if self._admitted.done():
            return
        if error is None:
            self._admitted.set_result(None)
        else:
            self._admitted.set_exception(error)
            self._admitted.exception()  # retrieved: no "never retrieved" warning if nobody waits
            self._fail(error)

    def _put(self, output: RequestOutput) -> None:
        self._latest = output
        self._done = self._done or output.finished
        self._wakeup.set()

    def _fail(self, error: BaseException) -> None:
        self._set_admitted(None)
        self._error, self._done = error, True
        self._wakeup.set()
