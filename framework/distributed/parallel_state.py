"""Process groups of one rank and the collectives the layers and the runner use.

Rank layout (``world = tp * pp``; rank 0 is the driver, the engine's process)::

    rank = pp_rank * tp_size + tp_rank
    stage p holds decoder layers [p * L // pp, (p + 1) * L // pp)
    tp group of stage p: ranks p*tp .. p*tp + tp - 1

Groups (every rank creates every group, in the same order):

* the device group (the default group): NCCL on CUDA, gloo on the CPU,
  with a bounded timeout; pipeline send/recv between stages;
* with pipeline stages, the logits group (same backend): the driver and the
  last stage's first rank; the logits go to the driver there, tagged by a
  count both ends keep, so several receives can be posted at once;
* one tensor-parallel group per stage (same backend): the layers'
  all-reduce and the LM head's all-gather;
* the message group: gloo over every rank, for the driver's per-step
  messages (CPU int64 tensors, ``messages.py``). Its timeout is long on
  purpose: an idle engine sends nothing, and the workers wait for the next
  message; a dead peer still fails its collectives at once (the socket
  closes).

Only one distributed engine can live in a process at a time (the default
process group is global).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from framework.distributed import messages
from framework.distributed.symm_allreduce import all_reduce, make_symm_all_reduce

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
# Bound on one device collective (seconds); FRAMEWORK_DIST_TIMEOUT_S overrides.
DEFAULT_TIMEOUT_S = 600.0
LOGITS_TAGS = 1 << 16  # tags of the logits transfers cycle through this many values
MESSAGE_TIMEOUT = timedelta(days=30)  # workers wait this long for the driver's next message


def collective_timeout_s() -> float:
    return float(os.environ.get("FRAMEWORK_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port nobody listens on at ``host`` right now (the rendezvous binds it next)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RankLayout:
    """Where one rank sits in the tensor x pipeline grid (see the module docstring)."""

    rank: int
    tp_size: int
    pp_size: int

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def tp_ranks(self, pp_rank: int) -> list[int]:
        return list(range(pp_rank * self.tp_size, (pp_rank + 1) * self.tp_size))

    def peer_in_stage(self, pp_rank: int) -> int:
        """The rank of the same tensor-parallel position in stage ``pp_rank``."""
        return pp_rank * self.tp_size + self.tp_rank


def device_for_rank(device_type: str, local_rank: int) -> torch.device:
    """``cuda:<local rank>`` on GPUs (one device per rank), else the CPU."""
    if device_type == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class PipelineStage:
    """One rank's pipeline stage, handed to model plugins as ``LayerContext.pipeline``.

    The model builds the layers of ``layer_range(num_layers)``; a stage after
    the first takes its input with ``recv``, a stage before the last hands its
    output on with ``send``. Tensors go to the same tensor-parallel position of
    the next stage (every rank of a tensor-parallel group holds the full
    hidden states).
    """

    def __init__(self, layout: RankLayout, device: torch.device):
        self.layout = layout
        self.device = device
        self.pp_rank, self.pp_size = layout.pp_rank, layout.pp_size
        self.graph_io: StageGraphIO | None = None  # set while DecodeGraphs warms up and captures

    @property
    def is_first(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """``[start, end)`` of this stage's decoder layers: consecutive, sizes differ by one at most."""
        if num_layers < self.pp_size:
            raise ValueError(
                f"pipeline_parallel_size={self.pp_size} is larger than num_hidden_layers={num_layers}: "
                f"every stage needs a layer"
            )
        return self.pp_rank * num_layers // self.pp_size, (self.pp_rank + 1) * num_layers // self.pp_size

    def send(self, tensor: torch.Tensor) -> None:
        """Hand this stage's output to the next stage (while a decode graph is made: the graph's output)."""
        if self.graph_io is not None:
            self.graph_io.outbox[self.graph_io.size] = tensor  # the runner sends it after each replay
            return
        self.send_now(tensor)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The previous stage's output (what it passed to ``send``); while a decode graph is made, the
        graph's static input, which the runner receives into before each replay."""
        if self.graph_io is not None:
            return self.graph_io.inbox_for(shape, dtype, self.device)
        out = torch.empty(shape, dtype=dtype, device=self.device)
        self.recv_into(out)
        return out

    def send_now(self, tensor: torch.Tensor) -> None:
        dist.send(tensor.contiguous(), dst=self.layout.peer_in_stage(self.pp_rank + 1))

    def recv_into(self, out: torch.Tensor) -> None:
        dist.recv(out, src=self.layout.peer_in_stage(self.pp_rank - 1))


class StageGraphIO:
    """A pipeline stage's activations in its decode CUDA graphs (``DecodeGraphs``).

    While a graph of bucket ``size`` is warmed up and captured, the model's
    ``recv`` returns ``inbox[size]`` (a buffer the graph reads) and its
    ``send`` records the tensor to send as ``outbox[size]`` (a buffer the
    graph writes). On replay the runner receives into the inbox first and
    sends the outbox after, eagerly: no point-to-point operation is captured.
    """

    def __init__(self):
        self.size = 0  # the bucket being made
        self.inbox: dict[int, torch.Tensor] = {}
        self.outbox: dict[int, torch.Tensor] = {}

    def inbox_for(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.size not in self.inbox:  # at warm-up, outside the capture
            self.inbox[self.size] = torch.zeros(shape, dtype=dtype, device=device)
        return self.inbox[self.size]


class ParallelState:
    """The process groups of one rank and its collectives (joins the rendezvous on construction).

    Args:
        layout: this rank's place.
        device: this rank's device (``cuda:r`` or the CPU).
        init_method: ``tcp://host:port`` (spawned ranks) or ``env://`` (torchrun).
        timeout_s: bound on one device collective.
    """

    def __init__(
        self,
        layout: RankLayout,
        device: torch.device,
        init_method: str,
        timeout_s: float,
    ):
        self.layout = layout
        self.device = device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            self.backend,
            init_method=init_method,
            rank=layout.rank,
            world_size=layout.world_size,
            timeout=timedelta(seconds=timeout_s),
            **kwargs,
        )
        self.message_group = dist.new_group(list(range(layout.world_size)), timeout=MESSAGE_TIMEOUT, backend="gloo")
        self.tp_group = None
        for pp_rank in range(layout.pp_size):  # every rank creates every group
            ranks = layout.tp_ranks(pp_rank)
            group = dist.new_group(ranks, backend=self.backend) if layout.tp_size > 1 else None
            if layout.rank in ranks:
                self.tp_group = group
        # small all-reduces through peer memory, when FRAMEWORK_SYMM_MEM_ALLREDUCE=1 (symm_allreduce.py)
        self.fast_all_reduce = make_symm_all_reduce(self.tp_group, device)
        self.pipeline = PipelineStage(layout, device) if layout.pp_size > 1 else None
        # logits: last stage's first rank -> the driver, on their own group so that waiting for them
        # never holds up the pipeline's activations (NCCL runs one communicator's operations in order)
        self.logits_src = (layout.pp_size - 1) * layout.tp_size
        self.logits_group = dist.new_group([0, self.logits_src], backend=self.backend) if layout.pp_size > 1 else None
        # driver, pipelined steps: a logits receive is posted, not waited for (``take_pending_logits``)
        self.defer_logits = False
        self._pending_logits = None
        self._logits_count = 0  # logits transfers so far, the same on both ends: their tag (never mismatched)
        self._pending_messages: list = []  # (work, tensors) of asynchronous broadcasts
        logger.info("rank %d of %d (tp %d/%d, pp %d/%d) on %s joined %s",
                    layout.rank, layout.world_size, layout.tp_rank, layout.tp_size,
                    layout.pp_rank, layout.pp_size, device, self.backend)  # fmt: skip

    @property
    def pp_size(self) -> int:
        return self.layout.pp_size

    # -- what the layers use -------------------------------------------------------

    def layer_context_fields(self) -> dict:
        """``LayerContext`` keyword arguments of this rank."""
        return {
            "tp_rank": self.layout.tp_rank,
            "tp_size": self.layout.tp_size,
            "all_reduce": self.all_reduce,
            "all_gather": self.all_gather,
            "pipeline": self.pipeline,
        }

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the tensor-parallel group: ``x`` summed in place (NCCL, gloo), or a new tensor (peer memory)."""
        if self.tp_group is None:
            return x
        return all_reduce(x, self.tp_group, self.fast_all_reduce)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the tensor-parallel ranks' ``x`` along the last dim, in rank order."""
        if self.tp_group is None:
            return x
        parts = [torch.empty_like(x) for _ in range(self.layout.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    # -- logits --------------------------------------------------------------------

    def compute_logits(self, model, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """The logits of ``hidden``'s rows on the driver; the other ranks' share of the work.

        One stage: every rank computes them (the LM head gathers the vocabulary
        shards). Several: the last stage computes them, its first rank sends
        them to the driver (which is in the first stage), and ranks that are
        neither get None.
        """
        layout = self.layout
        if layout.pp_size == 1:
            return model.compute_logits(hidden)
        last = layout.pp_size - 1
        tag = self._logits_count % LOGITS_TAGS
        if layout.pp_rank == last:
            logits = model.compute_logits(hidden)
            if layout.tp_rank == 0:
                self._logits_count += 1
                dist.send(logits.contiguous(), dst=0, group=self.logits_group, tag=tag)
            return logits
        if layout.is_driver:
            self._logits_count += 1
            logits = torch.empty(hidden.shape[0], vocab_size, dtype=torch.float32, device=self.device)
            work = dist.irecv(logits, src=self.logits_src, group=self.logits_group, tag=tag)
            if self.defer_logits:  # filled once the work completes: the caller waits (pipelined steps)
                self._pending_logits = work
            else:
                work.wait()
            return logits
        return None

    def take_pending_logits(self):
        """Driver: the receive that ``compute_logits`` posted with ``defer_logits`` set (None: none posted)."""
        work, self._pending_logits = self._pending_logits, None
        return work

    # -- driver -> workers messages (CPU tensors over the message group) ------------

    def publish_step(self, prepared, batch, wait: bool = True) -> None:
        """Driver: send one step (its ``PreparedBatch``, None when it only moves blocks) to every worker."""
        swap_out, swap_in = (
            getattr(batch, "swap_out", []),
            getattr(batch, "swap_in", []),
        )
        self.broadcast(*messages.encode_step(prepared, batch.block_copies, swap_out, swap_in), wait=wait)

    def broadcast(self, header: np.ndarray, payload: np.ndarray | None = None, wait: bool = True) -> None:
        """Driver: send a fixed-size int64 header and then, when it has one, an int64 payload.

        gloo's broadcast returns only once every worker has received it. With
        ``wait=False`` it runs in the background instead (pipelined steps: a
        later stage still busy with the previous batch must not hold up the
        driver's forward of this one); messages still arrive in order.
        """
        tensors = [torch.from_numpy(header)]
        if payload is not None and len(payload):
            tensors.append(torch.from_numpy(np.ascontiguousarray(payload)))
        if wait:
            self.flush_messages()
        for t in tensors:
            work = dist.broadcast(t, src=0, group=self.message_group, async_op=not wait)
            if work is not None:
                self._pending_messages.append((work, t))  # the tensor lives until the work completes
        self._pending_messages = [(w, t) for w, t in self._pending_messages if not w.is_completed()]

    def flush_messages(self) -> None:
        """Driver: wait for the asynchronous broadcasts still under way."""
        pending, self._pending_messages = self._pending_messages, []
        for work, _ in pending:
            work.wait()

    def receive_header(self, size: int) -> np.ndarray:
        """Worker: wait for the driver's next header (as long as the engine idles)."""
        header = torch.zeros(size, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.message_group)
        return header.numpy()

    def receive_payload(self, numel: int) -> np.ndarray:
        payload = torch.zeros(numel, dtype=torch.int64)
        if numel:
            dist.broadcast(payload, src=0, group=self.message_group)
        return payload.numpy()

    def reduce_int(self, value: int, op: str) -> int:
        """``min`` or ``max`` of an integer over every rank (message group)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(
            t,
            op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX,
            group=self.message_group,
        )
        return int(t.item())

    # -- teardown ------------------------------------------------------------------

    def abort(self) -> None:
        """Make collectives that wait on a dead peer fail now (NCCL would wait for the timeout)."""
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is None or self.backend != "nccl":
            return  # gloo fails on a closed socket by itself
        try:
            abort()
        except Exception:  # best effort: the timeout still bounds the wait
            logger.exception("cannot abort the NCCL process groups")

    def destroy(self, timeout_s: float = 15.0, quiet: bool = False) -> bool:
        """Leave the process groups; False when that did not finish within ``timeout_s``.

        Every rank calls this at about the same time (NCCL's teardown waits for its peers).
        Release CUDA graphs that captured collectives first: NCCL's teardown can wait
        forever while such a graph is alive (pytorch/pytorch#115388). The wait is bounded
        all the same, so that a teardown stuck in NCCL never holds up the engine's shutdown.
        """
        if not dist.is_initialized():
            return True
        self.fast_all_reduce = None  # its symmetric-memory buffers go before the groups they were made for
        done = threading.Event()

        def leave() -> None:
            try:
                dist.destroy_process_group()
            except Exception:
                level = logging.DEBUG if quiet else logging.ERROR
                logger.log(level, "cannot destroy the process groups", exc_info=True)
            done.set()

        threading.Thread(target=leave, name="leave-process-groups", daemon=True).start()
        if done.wait(timeout_s):
            return True
        logger.log(
            logging.DEBUG if quiet else logging.WARNING,
            "leaving the %s process groups did not finish in %.0f s; going on without",
            self.backend,
            timeout_s,
        )
        return False
