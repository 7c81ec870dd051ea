"""CUDA graphs for pure-decode steps: one graph per batch-size bucket.

A decode step of an 8B model launches a few hundred small kernels; at small
batch sizes launching them costs more host time than the GPU spends running
them. So the model forward of a step where every sequence has exactly one new
token is captured once per bucket size and replayed.

Capture (``DecodeGraphs.capture``, after the KV cache exists, since the
graphs bake in its address): for each size in ``capture_sizes(max_num_seqs)``,
largest first, sharing one memory pool, the forward over the first ``size``
rows of persistent static buffers is run once eagerly (Triton compiles its
kernels) and then captured:

    input_ids, positions, slot_mapping   int64 [max_size]
    seq_lens                             int32 [max_size]
    block_tables                         int32 [max_size, ceil(max_model_len / block_size)]
    query_start_loc                      int32 [max_size + 1] = 0, 1, 2, ... (fixed)

Replay (``run``): a pure-decode step of ``n <= max_size`` sequences takes
the smallest bucket ``size >= n``, writes its inputs into the pinned host
mirror of those buffers, pads rows ``n..size-1`` (slot -1: the cache write
skips it; seq_len 0: the decode kernel writes zeros; id and position 0),
uploads them (three copies) and replays. Only the first ``n`` rows of the
graph's output hidden states are used. ``compute_logits`` and the sampler
run eagerly after it (the sampler takes per-request generators and
host-side flags).

Decode splits: the metadata of every graph is built with ``seq_lens_np`` set
to ``max_model_len`` for each row, so a backend that picks its split-K
factor from the longest sequence (Triton: ``choose_num_splits``) fixes the
split count per bucket from ``max_model_len``. Any split count is correct
for any length (the kernel derives each split's range from the row's own
length); a fixed one only costs empty splits on short sequences.

Pipeline stages: a stage's forward receives its input from the previous
stage and sends its output on. While a bucket is warmed up and captured, the
stage's ``recv`` returns a static input buffer of that bucket and its
``send`` records the graph's output (``StageGraphIO``). On replay the stage
receives into the input buffer, replays, and sends the output, eagerly,
outside the graph. Every stage takes the same bucket for a step (the same
batch), so the buffers sent and received have the same shape. Off unless
``FRAMEWORK_PP_CUDA_GRAPHS=1`` until checked on GPUs
(``benchmarks/check_tensor_parallel.py``).

Only backends with ``supports_cuda_graphs`` get here (see
``framework.attention.AttentionBackend``). On a device other than CUDA the
same code runs the forward eagerly on the static buffers instead of
replaying (tests use that to check the padding on the CPU).
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import torch

from framework.attention import BatchInputs
from framework.engine.device_inputs import StagingBuffer
from framework.engine.input_batch import PreparedBatch
from framework.forward_context import set_forward_context

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Bucket sizes: 1, 2, 4, then every 8 up to 256, every 16 beyond, and ``max_num_seqs`` itself."""
    sizes = {1, 2, 4, max_num_seqs}
    sizes.update(range(8, min(max_num_seqs, 256) + 1, 8))
    sizes.update(range(272, max_num_seqs + 1, 16))
    return sorted(s for s in sizes if s <= max_num_seqs)


class DecodeGraphs:
    """Captured decode forwards and their static inputs (see the module docstring).

    Args:
        model: the model (``forward(input_ids, positions) -> hidden``).
        backend: the attention backend class (``build_metadata``).
        max_num_seqs: largest decode batch to capture.
        max_model_len: longest sequence (block-table width, split count).
        block_size: tokens per KV-cache block.
        device: the model's device.
        pipeline: this rank's ``PipelineStage`` when there are several (see "Pipeline stages" above).
    """

    def __init__(self, model, backend, max_num_seqs: int, max_model_len: int, block_size: int, device,
                 pipeline=None):  # fmt: skip
        self.model = model
        self.backend = backend
        self.device = device
        self.pipeline = pipeline if device.type == "cuda" else None  # CPU: the forward's own send/recv
        self._io = None
        if self.pipeline is not None:
            from framework.distributed.parallel_state import StageGraphIO

            self._io = StageGraphIO()
        self.sizes = capture_sizes(max_num_seqs)
        self.max_size = self.sizes[-1]
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.width = -(-max_model_len // block_size)
        self._tokens = StagingBuffer(3 * self.max_size, torch.int64, device)  # ids | positions | slots
        self._seq_lens = StagingBuffer(self.max_size, torch.int32, device)
        self._tables = StagingBuffer(self.max_size * self.width, torch.int32, device)
        self._query_start_loc = torch.arange(self.max_size + 1, dtype=torch.int32, device=device)
        self._bucket_of = np.searchsorted(self.sizes, np.arange(self.max_size + 1))  # n -> index in sizes
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._hidden: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.memory_bytes = 0

    def fits(self, prepared: PreparedBatch) -> bool:
        """Whether a step can replay: every sequence decodes one token, and there are few enough."""
        num_seqs = len(prepared.seqs)
        return 0 < num_seqs <= self.max_size and prepared.num_decodes == num_seqs

    # -- capture ----------------------------------------------------------------

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per size, largest first, in one shared memory pool."""
        self._write_padding(0, self.max_size)
        self._upload(self.max_size)
        start = time.perf_counter()
        if self.device.type != "cuda":
            return
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # so that the free-memory difference counts the graphs' pool alone
        free_before = torch.cuda.mem_get_info(self.device)[0]
        from framework.ops import triton_gemv  # CUDA (hence Triton) only

        pool = torch.cuda.graph_pool_handle()
        with triton_gemv.building_graphs():  # the small-M GEMV: for replays only (framework.ops.triton_gemv)
            for size in reversed(self.sizes):
                with self._stage_io(size):
                    self._forward(size)  # warm-up: Triton compiles, cuBLAS picks its kernels
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self._hidden[size] = self._forward(size)
                self._graphs[size] = graph
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self.capture_seconds = time.perf_counter() - start
        self.memory_bytes = free_before - torch.cuda.mem_get_info(self.device)[0]

    def _forward(self, size: int) -> torch.Tensor:
        tokens, seq_lens, tables = self._tokens.device, self._seq_lens.device, self._tables.device
        inputs = BatchInputs(
            query_start_loc_np=np.arange(size + 1, dtype=np.int32),
            seq_lens_np=np.full(size, self.max_model_len, dtype=np.int32),  # upper bound: fixes the splits
            num_decodes=size,
            max_query_len=1,
            max_seq_len=self.max_model_len,
            block_size=self.block_size,
            query_start_loc=self._query_start_loc[: size + 1],
            seq_lens=seq_lens[:size],
            block_tables=tables.view(self.max_size, self.width)[:size],
            slot_mapping=tokens[2 * self.max_size : 2 * self.max_size + size],
            positions=tokens[self.max_size : self.max_size + size],
        )
        with set_forward_context(self.backend.build_metadata(inputs)):
            return self.model(tokens[:size], inputs.positions)

    # -- replay -----------------------------------------------------------------

    def run(self, prepared: PreparedBatch, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The step's hidden states ``[n, hidden]`` (row i = sequence i), by graph replay.

        ``input_ids``: the ``n`` token ids as a device tensor, copied over the uploaded ones (a step
        that follows one still in flight); None: ``prepared.input_ids``."""
        n = len(prepared.seqs)
        size = self.sizes[self._bucket_of[n]]
        m = self.max_size
        tokens = self._tokens.writable()
        tokens[:n] = prepared.input_ids
        tokens[m : m + n] = prepared.positions
        tokens[2 * m : 2 * m + n] = prepared.slot_mapping
        self._seq_lens.writable()[:n] = prepared.seq_lens
        # Columns past the step's widest table keep stale ids: no row's seq_len reaches them.
        width = prepared.block_tables.shape[1]
        self._tables.writable().reshape(m, self.width)[:n, :width] = prepared.block_tables
        self._write_padding(n, size)
        self._upload(size)
        if input_ids is not None:
            self._tokens.device[:n].copy_(input_ids)
        graph = self._graphs.get(size)
        if graph is None:  # not captured (CPU): the same forward, eagerly
            return self._forward(size)[:n]
        stage = self.pipeline
        if stage is not None and not stage.is_first:
            stage.recv_into(self._io.inbox[size])  # the previous stage's bucket of the same size
        graph.replay()
        if stage is not None and not stage.is_last:
            stage.send_now(self._io.outbox[size])
        return self._hidden[size][:n]

    @contextlib.contextmanager
    def _stage_io(self, size: int):
        """While bucket ``size`` is made, the stage's recv/send use its static buffers."""
        if self.pipeline is None:
            yield
            return
        self._io.size = size
        self.pipeline.graph_io = self._io
        try:
            yield
        finally:
            self.pipeline.graph_io = None

    def _write_padding(self, start: int, stop: int) -> None:
        """Rows ``start..stop-1`` become padding: id 0, position 0, slot -1, seq_len 0."""
        m = self.max_size
        tokens = self._tokens.writable()
        tokens[start:stop] = 0
        tokens[m + start : m + stop] = 0
        tokens[2 * m + start : 2 * m + stop] = -1
        self._seq_lens.writable()[start:stop] = 0

    def _upload(self, size: int) -> None:
        self._tokens.upload(3 * self.max_size)
        self._seq_lens.upload(size)
        self._tables.upload(size * self.width)
