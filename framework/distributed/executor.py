"""Executors: what the engine calls to run steps, on one process or on several ranks.

The engine calls four methods: ``kv_block_bytes()``,
``profile_peak_memory(tokens, seqs)``, ``init_kv_cache(num_blocks,
num_cpu_blocks)`` and ``execute(batch) -> StepResult``. With pipeline stages
(``pipelined``) it calls ``submit(batch, block_offset, cpu_block_offset)``
and later ``collect(step) -> StepResult`` instead of ``execute``, keeping up
to ``pipeline_parallel_size`` batches in flight (``pipelined_step.py``).

* One process (``tensor_parallel_size * pipeline_parallel_size == 1``):
  the ``ModelRunner`` itself.
* ``MultiprocExecutor``: this process is rank 0, the driver. It runs the
  scheduler's batch through its own ``ModelRunner`` (shard 0), which
  broadcasts each step to the workers (``messages.py``) before its forward,
  and samples alone: logits reach it (all-gather of the vocabulary shards;
  with pipeline stages, sent from the last stage), so sampling metadata and
  per-request generators never leave it and seeded outputs equal the single
  process's. Workers are ranks 1..N-1, spawned here (``mp``), started as
  Ray actors (``ray``, ``ray_workers.py``) or started by ``torchrun`` with
  the same program (ranks > 0 never return from the engine's constructor:
  they serve, then exit).

KV pool: each rank reports its bytes per block and, on CUDA, the bytes it
can give to the KV cache; the pool has the same number of blocks on every
rank, sized by the largest block and the smallest budget.

Failure: a monitor thread polls the worker processes. When one
exits, the executor is ``dead`` (a ``WorkerDiedError`` naming the rank, pid
and exit code), the process groups are aborted (a collective waiting on the
dead rank fails now rather than at the timeout), the remaining workers are
stopped, and every later ``execute`` raises. A step that fails for any other
reason also kills the executor: the ranks may be out of step.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref

import torch

from framework.config import EngineConfig
from framework.distributed import messages
from framework.distributed.parallel_state import (
    DEFAULT_HOST,
    ParallelState,
    RankLayout,
    collective_timeout_s,
    device_for_rank,
    free_port,
)
from framework.distributed.pipelined_step import InFlightStep, finish_step, submit_step
from framework.distributed.worker import (
    WorkerSpec,
    free_device_memory,
    kv_budget,
    run_worker,
    spec_to_json,
)
from framework.engine.model_runner import ModelRunner
from framework.model_config import ModelConfig

logger = logging.getLogger(__name__)

DEATH_GRACE_S = 3.0  # after a failed step, how long to wait for a worker's death to show
MONITOR_INTERVAL_S = 0.2


class WorkerDiedError(RuntimeError):
    """A tensor/pipeline-parallel rank died or fell out of step: the engine cannot run requests."""


def check_parallel_config(config: EngineConfig, mc: ModelConfig) -> None:
    """Raise ``ValueError`` (naming the setting and the limit) for a split the model does not allow."""
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    heads, kv_heads = mc.num_heads, mc.num_kv_heads
    if heads % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide num_attention_heads={heads}")
    if kv_heads % tp and tp % kv_heads:
        raise ValueError(f"tensor_parallel_size={tp} must divide num_key_value_heads={kv_heads} or be a multiple of it")
    inter = mc.hf_config.get("intermediate_size")
    if inter and inter % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide intermediate_size={inter}")
    if pp > mc.num_layers:
        raise ValueError(f"pipeline_parallel_size={pp} must be at most num_hidden_layers={mc.num_layers}")


def make_executor(config: EngineConfig, model_config: ModelConfig, registries, device: torch.device, quant_config):
    """The engine's executor for ``config`` (see the module docstring)."""
    world = config.tensor_parallel_size * config.pipeline_parallel_size
    if world == 1:
        return ModelRunner(config, model_config, registries, device, quant_config)
    check_parallel_config(config, model_config)
    launcher = config.distributed_executor_backend or "mp"
    if device.type == "cuda" and launcher == "mp" and torch.cuda.device_count() < world:
        raise ValueError(
            f"tensor_parallel_size * pipeline_parallel_size = {world} needs {world} CUDA devices; "
            f"{torch.cuda.device_count()} are visible"
        )
    return MultiprocExecutor(config, model_config, registries, device, quant_config, launcher)


class MultiprocExecutor:
    """Rank 0 (the driver, in this process) and workers 1..N-1 (see the module docstring).

    Attribute reads it does not define (``model``, ``backend``, ``graphs``,
    ...) go to the driver's ``ModelRunner``.
    """

    def __init__(self, config: EngineConfig, model_config: ModelConfig, registries, device, quant_config, launcher):
        self.config = config
        self.dead: WorkerDiedError | None = None
        self.closed = False
        self._dead_lock = threading.Lock()  # the monitor and the engine thread may both find the death
        self.procs: dict[int, subprocess.Popen] = {}  # or ray_workers.RayWorker, which acts like one
        self.state: ParallelState | None = None
        self._block_bytes: int | None = None
        tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
        self.pipelined = pp > 1  # the engine submits batches and collects them later (several in flight)
        self.num_in_flight = 0  # submitted, not collected
        self.max_in_flight = 0  # the most at once since start
        rank, local_rank, init_method = _rendezvous(config, launcher, tp * pp)
        layout = RankLayout(rank, tp, pp)
        spec = WorkerSpec(layout, local_rank, device.type, init_method, collective_timeout_s(), config, model_config,
                          log_level=logging.getLogger().getEffectiveLevel())  # fmt: skip
        if rank != 0:  # torchrun: this process is a worker; it never becomes an engine
            run_worker(spec)
            raise SystemExit(0)
        if launcher == "mp":
            self._spawn(spec, tp * pp)
        elif launcher == "ray":
            from framework.distributed.ray_workers import start_ray_workers

            self.procs, local_rank = start_ray_workers(spec, tp * pp, device.type == "cuda")
        # at interpreter exit: a clean shutdown if the owner did not call it (the executor may be gone by then)
        self._at_exit = functools.partial(_shutdown_if_alive, weakref.ref(self))
        atexit.register(self._at_exit)
        driver_device = device_for_rank(device.type, local_rank)
        try:
            self.before = free_device_memory(driver_device)
            self.state = ParallelState(layout, driver_device, init_method, spec.timeout_s)
            self._monitor = threading.Thread(target=self._watch_workers, name="worker-monitor", daemon=True)
            self._monitor.start()
            self.runner = ModelRunner(config, model_config, registries, driver_device, quant_config, self.state)
        except BaseException:
            self.shutdown()
            raise

    def _spawn(self, spec: WorkerSpec, world: int) -> None:
        """Start ranks 1..N-1 as ``python -m framework.distributed``, each reading its spec (JSON) on stdin."""
        for rank in range(1, world):
            layout = RankLayout(rank, spec.layout.tp_size, spec.layout.pp_size)
            worker = dataclasses.replace(spec, layout=layout, local_rank=rank, parent_pid=os.getpid())
            proc = subprocess.Popen([sys.executable, "-m", "framework.distributed"], stdin=subprocess.PIPE)
            self.procs[rank] = proc
            proc.stdin.write(spec_to_json(worker).encode())
            proc.stdin.close()
        logger.info(
            "started %d worker processes (pids %s)",
            len(self.procs),
            [p.pid for p in self.procs.values()],
        )

    def __getattr__(self, name: str):
        runner = self.__dict__.get("runner")
        if runner is None:
            raise AttributeError(name)
        return getattr(runner, name)

    # -- the four engine calls -------------------------------------------------------

    def kv_block_bytes(self) -> int:
        """Bytes of one KV block on the rank that needs the most (stages may hold different layer counts)."""
        if self._block_bytes is None:
            self._send(messages.control(messages.BLOCK_BYTES))
            self._block_bytes = self.state.reduce_int(self.runner.kv_block_bytes(), "max")
        return self._block_bytes

    def profile_peak_memory(self, num_tokens: int, num_seqs: int) -> int:
        """The driver's peak, raised so that the engine's budget on the driver equals the smallest rank's."""
        self._send(messages.control(messages.PROFILE, num_tokens, num_seqs))
        budget = kv_budget(self.runner, self.config, self.before, num_tokens, num_seqs)
        smallest = self.state.reduce_int(budget, "min")
        free_before, total = self.before
        return int(total * self.config.gpu_memory_utilization) - (total - free_before) - smallest

    def init_kv_cache(self, num_blocks: int, num_cpu_blocks: int = 0) -> None:
        self._send(messages.control(messages.INIT_KV, num_blocks, num_cpu_blocks))
        if num_cpu_blocks:
            self.runner.init_kv_cache(num_blocks, num_cpu_blocks)
        else:
            self.runner.init_kv_cache(num_blocks)

    def execute(self, batch):
        if self.pipelined:
            return self.collect(self.submit(batch))
        self._check_alive()
        try:
            return self.runner.execute(batch)
        except Exception as exc:
            raise self._step_failed(exc) from exc

    # -- pipelined steps (pipeline_parallel_size > 1) ----------------------------------

    def submit(self, batch, block_offset: int = 0, cpu_block_offset: int = 0) -> InFlightStep:
        """Start a step on every rank and return without waiting for its logits (``pipelined_step``).

        ``block_offset`` / ``cpu_block_offset``: where the batch's virtual
        engine's share of the GPU / CPU KV pool starts.
        """
        self._check_alive()
        try:
            step = submit_step(self.runner, self.state, batch, block_offset, cpu_block_offset)
        except Exception as exc:
            raise self._step_failed(exc) from exc
        self.num_in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.num_in_flight)
        return step

    def collect(self, step: InFlightStep):
        """The results of a submitted step (waits for its logits), in submission order."""
        self._check_alive()
        self.num_in_flight -= 1
        try:
            return finish_step(self.runner, step)
        except Exception as exc:
            raise self._step_failed(exc) from exc

    # -- failure ---------------------------------------------------------------------

    def _send(self, header) -> None:
        self._check_alive()
        try:
            self.state.broadcast(header)
        except Exception as exc:
            raise self._step_failed(exc) from exc

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise WorkerDiedError(str(self.dead))
        if self.closed:
            raise WorkerDiedError("the engine's worker processes are shut down")

    def _step_failed(self, exc: BaseException) -> WorkerDiedError:
        """The executor is dead after a failed collective: name the dead worker if one died."""
        deadline = time.monotonic() + DEATH_GRACE_S
        while self.dead is None and self.procs and time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs.values()):
                self._watch_workers(once=True)
                break
            time.sleep(0.05)
        if self.dead is None:
            self._mark_dead(f"a distributed step failed ({exc!r}); the ranks may be out of step")
        return WorkerDiedError(str(self.dead))

    def _watch_workers(self, once: bool = False) -> None:
        """Monitor thread: poll the workers until one exits (or the executor closes)."""
        while self.procs and not self.closed and self.dead is None:
            exited = [(rank, p) for rank, p in self.procs.items() if p.poll() is not None]
            if exited:
                rank, proc = exited[0]
                if not self.closed:
                    self._mark_dead(f"worker rank {rank} (pid {proc.pid}) died: {_exit_reason(proc)}")
                return
            if once:
                return
            time.sleep(MONITOR_INTERVAL_S)

    def _mark_dead(self, reason: str) -> None:
        with self._dead_lock:
            if self.dead is not None:
                return
            self.dead = WorkerDiedError(f"{reason}; the engine cannot run requests any more: restart it")
        logger.error("%s", self.dead)
        if self.state is not None:
            self.state.abort()
        _stop_processes(self.procs, grace_s=1.0)

    # -- shutdown ----------------------------------------------------------------------

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop every worker (a SHUTDOWN message, then terminate / kill what is left) and leave the groups."""
        if self.closed:
            return
        self.closed = True
        if self.dead is None and self.state is not None:
            try:
                self.state.broadcast(messages.control(messages.SHUTDOWN))
            except Exception:
                logger.warning(
                    "cannot send the shutdown message; stopping the workers",
                    exc_info=True,
                )
        if self.state is not None and self.dead is None:
            # Leave the groups alongside the workers (NCCL's teardown waits for every rank), then reap them.
            runner = self.__dict__.get("runner")
            if runner is not None:
                runner.release_graphs()
            self.state.destroy(timeout_s)
        _stop_processes(self.procs, grace_s=timeout_s)
        if self.state is not None and self.dead is not None:
            self.state.destroy(timeout_s=2.0, quiet=True)  # aborted already; a dead peer can make NCCL wait
        if hasattr(self, "_at_exit"):
            atexit.unregister(self._at_exit)

    def __del__(self):
        if not self.__dict__.get("closed", True):
            _stop_processes(self.__dict__.get("procs", {}), grace_s=0.0)


def _shutdown_if_alive(ref: weakref.ref) -> None:
    executor = ref()
    if executor is not None:
        executor.shutdown()


def _rendezvous(config: EngineConfig, launcher: str, world: int) -> tuple[int, int, str]:
    """(this rank, its local rank, init_method)."""
    if launcher == "torchrun":
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(
                f"distributed_executor_backend='torchrun' needs the torchrun environment; {', '.join(missing)} unset"
            )
        if int(os.environ["WORLD_SIZE"]) != world:
            raise ValueError(
                f"torchrun started WORLD_SIZE={os.environ['WORLD_SIZE']} ranks, but tensor_parallel_size * "
                f"pipeline_parallel_size = {world}"
            )
        return (
            int(os.environ["RANK"]),
            int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
            "env://",
        )
    host = config.distributed_host or DEFAULT_HOST
    address = f"[{host}]" if ":" in host else host
    return 0, 0, f"tcp://{address}:{free_port(host)}"


def _exit_reason(proc) -> str:
    """How a worker ended: a process's exit code or signal, or what its handle says (``RayWorker``)."""
    describe = getattr(proc, "describe_exit", None)
    if describe is not None:
        return describe()
    code = proc.returncode
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _stop_processes(procs: dict, grace_s: float = 5.0) -> None:
    """Wait ``grace_s`` for the processes to exit, then SIGTERM, then SIGKILL what is still alive."""
    deadline = time.monotonic() + grace_s
    for proc in procs.values():
        _wait(proc, deadline - time.monotonic())
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
            _wait(proc, 2.0)
        if proc.poll() is None:
            proc.kill()
            _wait(proc, 2.0)


def _wait(proc: subprocess.Popen, timeout_s: float) -> None:
    try:
        proc.wait(max(0.0, timeout_s))
    except subprocess.TimeoutExpired:
        pass
