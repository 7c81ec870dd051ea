"""``AsyncLLMEngine``: an ``LLMEngine`` driven by a background thread, used from asyncio.

The engine is not thread-safe, so exactly one thread touches it: the engine
thread. asyncio code never calls the engine; it sends commands through a
thread-safe queue and gets results back on its event loop::

    event loop                                  engine thread
    add_request() --("add", stream)-------->   engine.add_request()  (validates the prompt)
    stream.close() --("abort", id)--------->   engine.abort_request() (frees KV blocks)
    reset_prefix_cache() --("call", fn)---->   engine.reset_prefix_cache(), between two steps
                   <--call_soon_threadsafe--    admission result, RequestOutputs of each step

Each request has its own ``RequestStream``, an async iterator of the same
``RequestOutput`` objects ``LLM.generate`` returns. Outputs are cumulative, so
a slow reader gets the newest one and skips none of the content.

If a step raises, every in-flight request fails with ``EngineStepError``,
the engine aborts them (their KV blocks are freed) and keeps serving. If
even that cleanup fails the engine is ``dead``: new requests are refused.
It is dead too when the ``LLMEngine`` reports ``dead_error`` (a
tensor/pipeline-parallel worker died): the requests in flight fail with
``EngineDeadError`` naming the rank, and ``is_running`` (``/health``) turns
False at once, even between steps.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable, Optional, Protocol

from framework.engine.llm_engine import LLMEngine, PromptInput
from framework.engine.request_stream import RequestStream
from framework.outputs import RequestOutput
from framework.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped or cannot recover; no request can run."""


class EngineStepError(RuntimeError):
    """A step failed while this request was in flight."""


class QueueFullError(RuntimeError):
    """Admitting the request would exceed ``max_queued_requests``."""


class StepObserver(Protocol):
    """Called on the engine thread after every loop iteration (e.g. Prometheus metrics)."""

    def observe(self, outputs: list[RequestOutput], running: int, waiting: int, kv_usage: float) -> None: ...


class AsyncLLMEngine:
    """Runs ``LLMEngine.step()`` on a background thread; add and abort from asyncio.

    Args:
        engine: the engine to drive; only the engine thread touches it once
            ``start()`` has been called.
        max_queued_requests: most sequences (a request with ``n`` choices
            counts ``n``) that may wait for the engine, i.e. be added but not
            running; beyond it ``add_request`` raises ``QueueFullError``.
            None: no bound.
        observers: called on the engine thread after each iteration.
    """

    def __init__(
        self,
        engine: LLMEngine,
        max_queued_requests: Optional[int] = None,
        observers: Optional[list[StepObserver]] = None,
    ):
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.observers = list(observers or [])
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._loop: Any = None
        self._ids = itertools.count()
        # event-loop side
        self._streams: dict[str, RequestStream] = {}
        self._num_unadmitted_seqs = 0  # sent to the engine thread, not yet accepted or refused
        # engine-thread side (request id -> sequences), and what it publishes
        self._active: dict[str, int] = {}
        self._num_queued_seqs = 0  # sequences of accepted requests that are not running
        self.dead: Optional[BaseException] = None
        self.num_step_errors = 0

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will read the streams."""
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Abort every request, stop the engine thread and wait for it."""
        if self._thread is None:
            return
        self._send(("stop",))
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            logger.error("the engine thread did not stop within %.1f s", timeout)
        self.dead = self.dead or EngineDeadError("the engine is shut down")
        for stream in list(self._streams.values()):
            stream._fail(EngineDeadError("the engine is shut down"))
        self._streams.clear()
        stop_workers = getattr(self.engine, "shutdown", None)  # the worker processes of a parallel engine
        if stop_workers is not None and not self._thread.is_alive():
            await asyncio.to_thread(stop_workers)

    @property
    def is_running(self) -> bool:
        dead_error = getattr(self.engine, "dead_error", None)
        if self.dead is None and dead_error is not None:
            self.dead = dead_error
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    # -- requests (event loop) ---------------------------------------------------

    @property
    def num_waiting_seqs(self) -> int:
        """Sequences added but not running (as of the engine thread's last iteration)."""
        return self._num_unadmitted_seqs + self._num_queued_seqs

    def check_capacity(self, num_seqs: int) -> None:
        """Raise unless ``num_seqs`` more sequences may be added now.

        Raises:
            EngineDeadError: the engine is stopped or broken.
            QueueFullError: ``max_queued_requests`` would be exceeded.
        """
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running: {self.dead or 'not started'}")
        waiting, bound = self.num_waiting_seqs, self.max_queued_requests
        if bound is not None and waiting + num_seqs > bound:
            raise QueueFullError(
                f"the server is busy: {waiting} sequences wait for the engine and this request adds {num_seqs} "
                f"(max_queued_requests={bound}); retry later"
            )

    def add_request(
        self,
        prompt: PromptInput,
        params: SamplingParams,
        request_id: Optional[str] = None,
        arrival_time: Optional[float] = None,
        num_seqs: int = 1,
    ) -> RequestStream:
        """Queue a request; returns its stream at once (``await stream.admitted()``).

        Raises what ``check_capacity`` raises; the prompt is checked by the
        engine thread and ``stream.admitted()`` raises its ``ValueError``.
        """
        self.check_capacity(num_seqs)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        stream = RequestStream(request_id, num_seqs, self._loop, self.abort)
        self._streams[request_id] = stream
        self._num_unadmitted_seqs += num_seqs
        self._send(("add", request_id, prompt, params, arrival_time or time.monotonic(), num_seqs))
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (idempotent). Its KV blocks are freed after the current step."""
        if request_id in self._streams:
            self._send(("abort", request_id))

    async def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; runs on the engine thread between two steps."""
        return await self._call(self.engine.reset_prefix_cache)

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the engine thread; its result (or exception) comes back here."""
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running: {self.dead or 'not started'}")
        future = self._loop.create_future()
        self._send(("call", fn, future))
        return await future

    async def generate(self, prompt: PromptInput, params: SamplingParams, request_id: Optional[str] = None):
        """Convenience: add a request and yield its outputs; aborts it if the caller stops early."""
        stream = self.add_request(prompt, params, request_id)
        try:
            await stream.admitted()
            async for out in stream:
                yield out
        finally:
            stream.close()

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # -- results (event loop) ----------------------------------------------------

    def _deliver(self, events: list[tuple]) -> None:
        for kind, request_id, payload in events:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            if kind == "admitted":
                self._num_unadmitted_seqs -= stream.num_seqs
                stream._set_admitted(payload)
                if payload is not None:
                    self._streams.pop(request_id, None)
            elif kind == "output":
                stream._put(payload)
                if payload.finished:
                    self._streams.pop(request_id, None)
            else:  # "error"
                if not stream.answered:
                    self._num_unadmitted_seqs -= stream.num_seqs
                stream._fail(payload)
                self._streams.pop(request_id, None)

    # -- the engine thread ---------------------------------------------------------

    def _run(self) -> None:
        try:
            while self.dead is None:
                events: list[tuple] = []
                outputs: list[RequestOutput] = []
                running = self._apply_commands(events, outputs)
                if running and self.engine.has_unfinished_requests():
                    self._step(events, outputs)
                self._publish(events, outputs)
                if not running:
                    break
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait()
                    self._wakeup.clear()
        except BaseException as exc:  # the thread must report, not vanish
            logger.exception("the engine thread failed")
            self.dead = exc
        finally:
            self._stop()

    def _stop(self) -> None:
        """End every stream: abort what the engine holds, refuse the adds still queued."""
        events: list[tuple] = []
        outputs: list[RequestOutput] = []
        if self.dead is None:
            try:
                self._abort(list(self._active), events, outputs)
            except Exception:
                logger.exception("cannot abort the remaining requests at shutdown")
        error = EngineDeadError(f"the engine stopped: {self.dead or 'shut down'}")
        events += [("error", rid, error) for rid in self._active]
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                events.append(("error", command[1], error))
            elif command[0] == "call":
                self._resolve(command[2], None, error)
        self._publish(events, outputs)

    def _apply_commands(self, events: list, outputs: list) -> bool:
        """Run queued adds/aborts; False on "stop"."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
            if command[0] == "stop":
                return False
            if command[0] == "add":
                _, request_id, prompt, params, arrival, num_seqs = command
                try:
                    self.engine.add_request(prompt, params, request_id, arrival)
                except Exception as exc:  # a bad prompt is the caller's error
                    events.append(("admitted", request_id, exc))
                    continue
                self._active[request_id] = num_seqs
                events.append(("admitted", request_id, None))
            elif command[0] == "abort":
                self._abort([command[1]], events, outputs)
            elif command[0] == "call":
                _, fn, future = command
                try:
                    result, error = fn(), None
                except Exception as exc:  # the caller's to handle
                    result, error = None, exc
                self._resolve(future, result, error)

    def _resolve(self, future: asyncio.Future, result: Any, error: Optional[BaseException]) -> None:
        """Settle a ``_call`` future on the event loop (unless the caller gave up on it)."""

        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(settle)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def _abort(self, request_ids: list[str], events: list, outputs: list) -> None:
        ids = [r for r in request_ids if r in self._active]
        if not ids:
            return
        finals = self.engine.abort_request(ids)
        for rid in ids:
            self._active.pop(rid, None)
        outputs += finals
        events += [("output", out.request_id, out) for out in finals]

    def _step(self, events: list, outputs: list) -> None:
        try:
            step_outputs = self.engine.step()
        except Exception as exc:  # fail the requests in flight, keep the server
            self.num_step_errors += 1
            dead_error = getattr(self.engine, "dead_error", None)
            if dead_error is not None:  # a worker rank died: _stop fails every request
                logger.error("the engine is dead: %s", dead_error)
                self.dead = dead_error
                return
            failed = list(self._active)
            logger.exception("engine step failed; failing %d in-flight requests", len(failed))
            error = EngineStepError(f"the engine failed while running this request: {exc!r}")
            try:
                self._abort(failed, [], outputs)
            except Exception as cleanup_exc:
                self.dead = cleanup_exc
                logger.exception("cannot clean up after the failed step; the engine is dead")
            events += [("error", rid, error) for rid in failed]
            return
        for out in step_outputs:
            if out.finished:
                self._active.pop(out.request_id, None)
        outputs += step_outputs
        events += [("output", out.request_id, out) for out in step_outputs]

    def _publish(self, events: list, outputs: list[RequestOutput]) -> None:
        engine = self.engine  # with pipeline stages: over every virtual engine
        running = engine.running_groups()
        running_ids = {getattr(item, "request_id", None) for item in running}
        self._num_queued_seqs = sum(n for rid, n in self._active.items() if rid not in running_ids)
        for observer in self.observers:
            try:
                observer.observe(outputs, len(running), engine.num_waiting_requests(), engine.kv_cache_usage())
            except Exception:  # metrics never stop the engine
                logger.exception("step observer %r failed", observer)
        self._post(events)

    def _post(self, events: list) -> None:
        if events and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._deliver, events)
            except RuntimeError:  # the loop closed meanwhile
                pass
