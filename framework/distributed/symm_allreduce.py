"""One-shot all-reduce through peer memory (torch symmetric memory), for the small tensors of decode steps.

NCCL's all-reduce costs 13-27 us per call on H200s joined by NVLink, inside
a CUDA graph, at decode sizes (``docs/benchmarks.md``, tensor parallelism).
A decode step of a TP model makes two per layer (160 for a 70B model), so
that time adds up to a quarter of a batch-1 step at TP=4. A one-shot
all-reduce has each rank read every peer's buffer straight over NVLink
and add them. That is one kernel with a barrier, and no ring.

Here each tensor-parallel group gets one buffer per dtype from torch's
symmetric memory (``torch.distributed._symmetric_memory``), of
``max_bytes``. A call whose tensor fits copies it into the buffer's head and
runs ``torch.ops.symm_mem.one_shot_all_reduce``; a larger one, or a dtype
the op does not take, goes to NCCL. Every rank makes the same calls in the
same order (the same batch), so the buffers stay in step. Works inside CUDA
graphs (the op's synchronisation is device-side).

Off unless ``FRAMEWORK_SYMM_MEM_ALLREDUCE=1``: it has not yet been checked
and timed on GPUs (``benchmarks/bench_allreduce.py --impl symm`` does both).
NVLink multicast is not used (one-shot reads peers with plain loads).
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 20  # above this, NCCL's ring is as fast or faster
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def wanted() -> bool:
    return os.environ.get("FRAMEWORK_SYMM_MEM_ALLREDUCE", "0") == "1"


class SymmMemAllReduce:
    """Small all-reduces of one tensor-parallel group through peer memory (see the module docstring).

    Construction is collective over ``group`` (every rank of it must build one).
    Raises ``RuntimeError`` when this torch or these devices cannot give symmetric memory.
    """

    def __init__(self, group, device: torch.device, max_bytes: int = DEFAULT_MAX_BYTES):
        if device.type != "cuda":
            raise RuntimeError("symmetric-memory all-reduce needs CUDA devices")
        try:
            from torch.distributed import _symmetric_memory as symm_mem

            op = torch.ops.symm_mem.one_shot_all_reduce
        except (ImportError, AttributeError) as exc:
            raise RuntimeError(f"this torch ({torch.__version__}) has no symmetric-memory all-reduce") from exc
        self.group = group
        self.group_name = group.group_name
        self.device = device
        self.max_bytes = max_bytes
        self._op = op
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:  # needed before torch 2.9, a deprecated no-op after
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable(self.group_name)
        self.buffers: dict[torch.dtype, torch.Tensor] = {}
        for dtype in DTYPES:  # allocation and rendezvous are collective: all dtypes up front, same order
            numel = max_bytes // torch.empty((), dtype=dtype).element_size()
            buffer = symm_mem.empty(numel, dtype=dtype, device=device)
            symm_mem.rendezvous(buffer, self.group_name)
            self.buffers[dtype] = buffer

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype in self.buffers and x.numel() * x.element_size() <= self.max_bytes and x.is_cuda

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the group, as a new tensor of ``x``'s shape (``x`` must ``fit``)."""
        head = self.buffers[x.dtype][: x.numel()]  # a view at offset 0: the buffer the peers know
        head.copy_(x.reshape(-1))
        return self._op(head, "sum", self.group_name).view(x.shape)


def make_symm_all_reduce(group, device: torch.device) -> SymmMemAllReduce | None:
    """A ``SymmMemAllReduce`` for ``group`` when asked for and possible, else None (NCCL does it all).

    Every rank of ``group`` must call it (construction is collective), and all of them take the same
    branch: the setting is the same everywhere, and a failure on one rank is not recovered from.
    """
    if group is None or device.type != "cuda" or not wanted():
        return None
    try:
        return SymmMemAllReduce(group, device)
    except RuntimeError as exc:
        logger.warning("FRAMEWORK_SYMM_MEM_ALLREDUCE=1, but %s: all-reduces go through NCCL", exc)
        return None


def all_reduce(x: torch.Tensor, group, fast: SymmMemAllReduce | None) -> torch.Tensor:
    """Sum ``x`` over ``group``: through peer memory when ``fast`` takes it, else NCCL in place."""
    if fast is not None and fast.fits(x):
        return fast(x)
    dist.all_reduce(x, group=group)
    return x
