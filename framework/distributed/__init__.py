"""Tensor and pipeline parallelism on torch.distributed (NCCL on GPUs, gloo on the CPU).

``executor.make_executor`` gives the engine a ``ModelRunner`` (one process)
or a ``MultiprocExecutor`` (rank 0 in the engine's process, workers in
others); ``parallel_state`` holds the process groups and collectives;
``messages`` encodes the driver's per-step messages; ``pipelined_step``
is the driver's submit/collect of a batch with pipeline stages (several in
flight); ``worker`` is a worker rank's loop.
"""

from framework.distributed.executor import (
    MultiprocExecutor,
    WorkerDiedError,
    check_parallel_config,
    make_executor,
)
from framework.distributed.parallel_state import (
    ParallelState,
    PipelineStage,
    RankLayout,
)

__all__ = [
    "MultiprocExecutor",
    "ParallelState",
    "PipelineStage",
    "RankLayout",
    "WorkerDiedError",
    "check_parallel_config",
    "make_executor",
]
