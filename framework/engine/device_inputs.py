"""Persistent input buffers: a step's arrays reach the device through pinned memory.

The model runner never builds new input tensors per step. It writes the
flattened batch (``input_batch.PreparedBatch``) into pinned host buffers
(numpy views, no allocation) and copies each buffer to a device buffer of the
same layout with one asynchronous copy; the tensors handed to the model and
the attention backend are slices of the device buffers.

``StepInputs`` layout (two uploads per step)::

    int64 [3 * T' + R]    input ids | positions | slot mapping | logits rows
    int32 [2 * B' + 1 + B * W]   seq_lens | query_start_loc | block tables [B, W]

where each segment starts on a 16-element boundary (``_pad``): Triton
specialises kernels on 16-byte pointer alignment, and segments whose
alignment changed from step to step would compile every variant. ``W`` is
the widest block table of the step. Capacities grow (reallocate) when a step
needs more.

Reuse rules (the invariants that make reuse safe):
  * a host buffer is written only after the device has finished the last
    copy out of it (``StagingBuffer.writable`` waits on an event recorded
    after that copy; usually it has long finished);
  * a device buffer is overwritten only by a copy on the same stream as the
    kernels that read it, so stream order keeps every step's inputs intact
    until its kernels are done.
On the CPU the host buffer is the device buffer and uploads are no-ops.
"""

from __future__ import annotations

import numpy as np
import torch

from framework.attention import BatchInputs
from framework.engine.input_batch import PreparedBatch


class StagingBuffer:
    """A flat pinned host buffer and its device twin."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device):
        self.numel = numel
        if device.type == "cuda":
            self.host = torch.zeros(numel, dtype=dtype, pin_memory=True)
            self.device = torch.zeros(numel, dtype=dtype, device=device)
            self._uploaded = torch.cuda.Event()
        else:
            self.host = self.device = torch.zeros(numel, dtype=dtype, device=device)
            self._uploaded = None
        self._array = self.host.numpy()
        self._pending = False

    def writable(self) -> np.ndarray:
        """The host buffer as a numpy array, once the device has read the last upload from it."""
        if self._pending:
            self._uploaded.synchronize()
            self._pending = False
        return self._array

    def upload(self, count: int) -> torch.Tensor:
        """Copy the first ``count`` elements to the device (asynchronously); returns the device buffer."""
        if self._uploaded is not None and count > 0:
            self.device[:count].copy_(self.host[:count], non_blocking=True)
            self._uploaded.record()
            self._pending = True
        return self.device


def _pad(n: int) -> int:
    """``n`` rounded up to a multiple of 16 elements."""
    return (n + 15) & ~15


class StepInputs:
    """The device inputs of eager steps, rebuilt in place every step (see the module docstring).

    Args:
        max_tokens / max_seqs / max_blocks_per_seq: initial capacities
            (``max_num_batched_tokens``, ``max_num_seqs``, blocks of
            ``max_model_len``); a larger step reallocates.
        block_size: tokens per KV-cache block.
        device: where the model runs.
    """

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, block_size: int, device):
        self.device = device
        self.block_size = block_size
        self._tokens = self._ints = None
        self._reserve(max_tokens, max_seqs, max_seqs * max_blocks_per_seq)

    def _reserve(self, tokens: int, seqs: int, table_entries: int) -> None:
        # int64: 3 token segments + logits rows (at most one per token and one per sequence)
        need64 = 3 * _pad(tokens) + _pad(tokens + seqs)
        need32 = 2 * _pad(seqs + 1) + table_entries
        if self._tokens is None or self._tokens.numel < need64:
            self._tokens = StagingBuffer(need64, torch.int64, self.device)
        if self._ints is None or self._ints.numel < need32:
            self._ints = StagingBuffer(need32, torch.int32, self.device)

    def load(self, prepared: PreparedBatch) -> tuple[BatchInputs, torch.Tensor, torch.Tensor]:
        """Upload one step; returns (the backend's ``BatchInputs``, input ids, logits rows) on the device.

        Logits rows: ``prepared.logits_indices`` then the prompt-logprob rows.
        """
        num_tokens, num_seqs = prepared.num_tokens, len(prepared.seq_lens)
        rows = prepared.logits_indices
        if prepared.prompt_logprobs is not None:
            rows = np.concatenate([rows, prepared.prompt_logprobs.hidden_rows])
        tables = prepared.block_tables
        self._reserve(num_tokens, max(num_seqs, len(rows)), tables.size)

        t = _pad(num_tokens)
        host = self._tokens.writable()
        host[:num_tokens] = prepared.input_ids
        host[t : t + num_tokens] = prepared.positions
        host[2 * t : 2 * t + num_tokens] = prepared.slot_mapping
        host[3 * t : 3 * t + len(rows)] = rows
        dev64 = self._tokens.upload(3 * t + len(rows))

        s = _pad(num_seqs + 1)
        ints = self._ints.writable()
        ints[:num_seqs] = prepared.seq_lens
        ints[s : s + num_seqs + 1] = prepared.query_start_loc
        ints[2 * s : 2 * s + tables.size] = tables.ravel()
        dev32 = self._ints.upload(2 * s + tables.size)

        qsl = prepared.query_start_loc
        inputs = BatchInputs(
            query_start_loc_np=qsl,
            seq_lens_np=prepared.seq_lens,
            num_decodes=prepared.num_decodes,
            max_query_len=int(np.diff(qsl).max()),
            max_seq_len=int(prepared.seq_lens.max()),
            block_size=self.block_size,
            query_start_loc=dev32[s : s + num_seqs + 1],
            seq_lens=dev32[:num_seqs],
            block_tables=dev32[2 * s : 2 * s + tables.size].view(tables.shape),
            slot_mapping=dev64[2 * t : 2 * t + num_tokens],
            positions=dev64[t : t + num_tokens],
        )
        return inputs, dev64[:num_tokens], dev64[3 * t : 3 * t + len(rows)]
