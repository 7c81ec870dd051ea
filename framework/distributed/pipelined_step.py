"""The driver's half of a pipelined step: submit a batch now, collect its results later.

With pipeline stages, a step is split in two so that several batches are in
flight (``MultiprocExecutor.submit`` / ``collect``)::

    submit(batch k):  flatten -> broadcast to the workers (in the background)
                      -> block moves -> stage 0's forward -> send activations on
                      -> post the receive of the logits (not waited for)
    collect(k):       wait for the logits -> sample -> results (host)

Every stage handles the batches in the order they were submitted (blocking
send/recv between stages), so while the driver runs stage 0 of batch k + 1
the next stage works on batch k, and the driver only waits for batch k's
logits when it collects them. The engine submits a virtual engine's next
batch only after it has collected that engine's previous one (its
sequences are never in two batches in flight).

Block ids: each virtual engine numbers its own share of the pool from 0;
``block_offset`` and ``cpu_block_offset`` place that share in the one cache
tensor (GPU) and in the CPU swap cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from framework.engine.input_batch import PreparedBatch, prepare_batch
from framework.engine.scheduler import ScheduledBatch
from framework.engine.step_results import StepResult


@dataclass
class InFlightStep:
    """A submitted batch whose results have not been collected."""

    prepared: PreparedBatch | None  # None: the step only moved blocks
    logits: torch.Tensor | None = None  # being filled by ``receive``; None: nothing to sample
    receive: object | None = None  # the logits' receive (a torch.distributed work), None once done


def shift_blocks(batch: ScheduledBatch, block_offset: int, cpu_block_offset: int) -> ScheduledBatch:
    """The batch's block moves in the ids of the whole cache (a virtual engine's ids + its offsets)."""
    if not (block_offset or cpu_block_offset):
        return batch
    g, c = block_offset, cpu_block_offset
    return dataclasses.replace(
        batch,
        block_copies=[(s + g, d + g) for s, d in batch.block_copies],
        swap_out=[(s + g, d + c) for s, d in batch.swap_out],
        swap_in=[(s + c, d + g) for s, d in batch.swap_in],
    )


def shift_prepared(prepared: PreparedBatch, block_offset: int, block_size: int) -> None:
    """Block tables and slots in the ids of the whole cache (in place; padding entries move too, unread)."""
    if block_offset:
        prepared.block_tables += block_offset
        prepared.slot_mapping += block_offset * block_size


@torch.inference_mode()
def submit_step(runner, state, batch: ScheduledBatch, block_offset: int = 0, cpu_block_offset: int = 0) -> InFlightStep:
    """Start ``batch`` on every rank; returns before the last stage is done (see the module docstring)."""
    batch = shift_blocks(batch, block_offset, cpu_block_offset)
    prepared = prepare_batch(batch, runner.block_size) if batch.seqs else None
    if prepared is not None:
        shift_prepared(prepared, block_offset, runner.block_size)
    state.publish_step(prepared, batch, wait=False)
    runner._swap_blocks(batch.swap_out, batch.swap_in)
    runner._copy_blocks(batch.block_copies)
    if prepared is None:
        return InFlightStep(None)
    state.defer_logits = True
    try:
        logits = runner._logits(prepared)
    finally:
        state.defer_logits = False
    return InFlightStep(prepared, logits, state.take_pending_logits())


@torch.inference_mode()
def finish_step(runner, step: InFlightStep) -> StepResult:
    """Wait for a submitted step's logits and sample them on the driver (as ``ModelRunner.execute`` does)."""
    if step.receive is not None:
        step.receive.wait()
        step.receive = None
    return runner.results(step.prepared, step.logits)
