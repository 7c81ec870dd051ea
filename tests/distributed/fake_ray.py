"""A stand-in for the part of Ray that ``framework.distributed.ray_workers`` uses, for CI.

Ray's own daemons listen on every interface, and tests bind to 127.0.0.1
only, so the tests put this module in ``sys.modules["ray"]`` instead. Each
actor is a real process (multiprocessing, spawn) that runs the actor class's
methods one at a time, in call order, as a Ray actor does; a call returns a
ref resolved by a reader thread. When the actor process dies, its pending and
later calls fail with ``exceptions.RayActorError``, as with Ray.
``benchmarks/check_ray.py`` runs the same engine code on a real Ray instance.
"""

from __future__ import annotations

import importlib
import multiprocessing
import sys
import threading
import types
from concurrent.futures import Future, wait as wait_futures

NODE_ID = "fake-node-0"


class RayActorError(RuntimeError):
    """The actor's process is gone."""


exceptions = types.SimpleNamespace(RayActorError=RayActorError)
_state = {"initialized": False, "node_id": NODE_ID, "gpu_ids": []}


def is_initialized() -> bool:
    return _state["initialized"]


def init(**_options) -> None:
    _state["initialized"] = True


def shutdown() -> None:
    _state["initialized"] = False


def get_runtime_context():
    return types.SimpleNamespace(get_node_id=lambda: _state["node_id"])


def get_gpu_ids() -> list:
    return list(_state["gpu_ids"])


def remote(**options):
    def wrap(cls):
        return _ActorClass(cls, options)

    return wrap


def get(refs, timeout=None):
    if isinstance(refs, list):
        return [ref.result(timeout) for ref in refs]
    return refs.result(timeout)


def wait(refs, timeout=None):
    done, _ = wait_futures(refs, timeout=timeout)
    return [r for r in refs if r in done], [r for r in refs if r not in done]


def kill(actor, no_restart=True) -> None:
    actor._process.kill()


class _ActorClass:
    def __init__(self, cls, options):
        self.cls, self.options = cls, options

    def remote(self):
        return _Actor(self.cls)


class _Actor:
    def __init__(self, cls):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_actor_main, args=(cls.__module__, cls.__qualname__, child), daemon=True)
        self._process.start()
        child.close()
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._next = 0
        self._dead = False
        threading.Thread(target=self._read, daemon=True).start()

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return types.SimpleNamespace(remote=lambda *args: self._call(name, args))

    def _call(self, name, args) -> Future:
        future: Future = Future()
        with self._lock:
            if self._dead:
                future.set_exception(RayActorError("the actor died"))
                return future
            call_id, self._next = self._next, self._next + 1
            self._pending[call_id] = future
            self._conn.send((call_id, name, args))
        return future

    def _read(self) -> None:
        while True:
            try:
                call_id, ok, value = self._conn.recv()
            except (EOFError, OSError):
                break
            future = self._pending.pop(call_id)
            future.set_result(value) if ok else future.set_exception(RuntimeError(value))
        with self._lock:
            self._dead = True
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(RayActorError("the actor's process died"))


def _actor_main(module: str, qualname: str, conn) -> None:
    sys.modules["ray"] = sys.modules[__name__]  # what the actor's methods import as ray
    cls = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    instance = cls()
    while True:
        try:
            call_id, name, args = conn.recv()
        except EOFError:
            return
        try:
            conn.send((call_id, True, getattr(instance, name)(*args)))
        except Exception as exc:  # the caller's ref raises it
            conn.send((call_id, False, f"{type(exc).__name__}: {exc}"))
