"""Worker ranks as Ray actors (``distributed_executor_backend="ray"``), for one host or several.

The driver stays rank 0 in the engine's process, as with ``mp``; ranks
1..N-1 are actors of a Ray cluster, each running the same worker loop
(``worker.run_worker``) as a spawned process would, with its ``WorkerSpec``
as JSON. The ranks meet over ``torch.distributed`` (NCCL on GPUs, gloo on
the CPU) at the driver's address: Ray only places and starts them. Step
messages never go through Ray.

Placement: on GPUs each actor asks Ray for one GPU (Ray sets its
``CUDA_VISIBLE_DEVICES``, so it uses ``cuda:0``), and the driver takes a
visible GPU of its own host that no actor of this engine holds. When the
actors land on more than one host, ``distributed_host`` must name the
driver's address that the other hosts reach (the rendezvous binds there);
without it the engine refuses to start rather than bind to a public
interface by itself.

Connection: ``ray.init()`` joins the cluster named by ``RAY_ADDRESS`` (or a
``ray start`` cluster on this host) when the caller has not connected
already; with neither, Ray starts a local instance.

``RayWorker`` gives the executor what it uses of ``subprocess.Popen``
(``pid``, ``poll``, ``wait``, ``terminate``, ``kill``, ``returncode``), so
the monitor, the failure story and the shutdown are the same for both
launchers: a killed actor process makes ``poll`` return, the executor
reports the rank as dead, and requests in flight fail.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess

import torch

logger = logging.getLogger(__name__)

ACTOR_DIED = -9  # returncode of an actor whose process Ray reports dead (the signal is not known)


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ValueError(
            "distributed_executor_backend='ray' needs Ray: pip install ray (or use 'mp' on one host, "
            "'torchrun' on several)"
        ) from exc
    return ray


class RankActor:
    """The Ray actor of one worker rank (wrapped by ``ray.remote`` at start)."""

    def where(self) -> dict:
        import ray

        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [int(g) for g in ray.get_gpu_ids()],
        }

    def serve(self, spec_json: str) -> int:
        from framework.distributed.worker import run_worker, spec_from_json

        run_worker(spec_from_json(spec_json))
        return 0


class RayWorker:
    """A rank's actor, seen through the part of ``subprocess.Popen`` that the executor uses."""

    def __init__(self, ray, actor, rank: int, where: dict):
        self._ray = ray
        self.actor = actor
        self.rank = rank
        self.pid = where["pid"]
        self.node_id = where["node_id"]
        self.gpu_ids = where["gpu_ids"]
        self.returncode: int | None = None
        self.done = None  # the ObjectRef of ``serve``

    def start(self, spec_json: str) -> None:
        self.done = self.actor.serve.remote(spec_json)

    def poll(self) -> int | None:
        if self.returncode is None and self.done is not None:
            ready, _ = self._ray.wait([self.done], timeout=0)
            if ready:
                self._settle()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and self.done is not None:
            ready, _ = self._ray.wait([self.done], timeout=timeout)
            if not ready:
                raise subprocess.TimeoutExpired(f"ray actor of rank {self.rank}", timeout)
            self._settle()
        return self.returncode

    def _settle(self) -> None:
        try:
            self.returncode = int(self._ray.get(self.done))
        except self._ray.exceptions.RayActorError:
            self.returncode = ACTOR_DIED
        except Exception:  # the worker loop raised: its traceback is in the actor's log
            logger.exception("worker rank %d failed", self.rank)
            self.returncode = 1

    def terminate(self) -> None:
        self.kill()

    def kill(self) -> None:
        if self.returncode is None:
            try:
                self._ray.kill(self.actor, no_restart=True)
                if self.done is not None:
                    self.wait(5.0)
            except Exception:  # Ray already shut down, or the actor outlived the wait: it is gone for us
                logger.debug("killing the actor of rank %d", self.rank, exc_info=True)
            if self.returncode is None:
                self.returncode = ACTOR_DIED

    def describe_exit(self) -> str:
        if self.returncode == ACTOR_DIED:
            return "its Ray actor died"
        return f"exit code {self.returncode}"


def start_ray_workers(spec, world: int, use_gpus: bool) -> tuple[dict[int, RayWorker], int]:
    """Create the actors of ranks 1..world-1 and start their worker loops.

    Returns them by rank and the local CUDA index the driver should use (0 on the CPU).
    ``spec`` is the driver's ``WorkerSpec``; its ``init_method`` must already be final.
    """
    from framework.distributed.worker import spec_to_json

    ray = import_ray()
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    remote = ray.remote(num_cpus=0, num_gpus=1 if use_gpus else 0, max_restarts=0)(RankActor)
    actors = [remote.remote() for _ in range(1, world)]
    try:
        places = ray.get([a.where.remote() for a in actors], timeout=300)
    except BaseException:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        raise
    workers = {rank: RayWorker(ray, actor, rank, where) for rank, actor, where in zip(range(1, world), actors, places)}
    here = ray.get_runtime_context().get_node_id()
    nodes = {w.node_id for w in workers.values()} | {here}
    host = spec.config.distributed_host
    if len(nodes) > 1 and not host:
        _kill_all(workers)
        raise ValueError(
            f"distributed_executor_backend='ray' placed the ranks on {len(nodes)} hosts: set distributed_host "
            "to this host's address that the others reach (the ranks meet there)"
        )
    driver_gpu = _driver_gpu(workers, here) if use_gpus else 0
    for rank, worker in workers.items():
        layout = dataclasses.replace(spec.layout, rank=rank)
        worker.start(spec_to_json(dataclasses.replace(spec, layout=layout, local_rank=0, parent_pid=None)))
    logger.info(
        "started %d Ray worker actors (pids %s) on %d host(s)",
        len(workers),
        [w.pid for w in workers.values()],
        len(nodes),
    )
    return workers, driver_gpu


def _driver_gpu(workers: dict[int, RayWorker], here: str) -> int:
    """A visible CUDA index of this process that no actor on this host holds."""
    taken = {g for w in workers.values() if w.node_id == here for g in w.gpu_ids}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [int(d) for d in visible.split(",") if d.strip()] if visible else list(range(torch.cuda.device_count()))
    for index, physical in enumerate(ids):
        if physical not in taken:
            return index
    _kill_all(workers)
    raise ValueError(
        f"distributed_executor_backend='ray': the actors hold every GPU this process sees ({ids}); "
        "the driver needs one of its own"
    )


def _kill_all(workers: dict[int, RayWorker]) -> None:
    for worker in workers.values():
        worker.kill()
