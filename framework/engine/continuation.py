"""Async scheduling's next step: the decode that follows a step still in flight (``LLMEngine``).

While step S runs on the device, the engine plans S' -- every running
sequence of S, one token further -- without S's tokens: the scheduler's
rules reduced to the one case where the next batch is known in advance.
``continuable`` says whether S qualifies, ``plan`` builds S' and reserves its
blocks, ``sample_rows`` maps S' to S's sampler rows (the input ids are read
there, on the device), and ``name_filled_blocks`` catches the prefix cache up
once S's tokens are known.
"""

from __future__ import annotations

import numpy as np

from framework.engine.block_pool import KVCacheManager
from framework.engine.scheduler import ScheduledBatch, Scheduler
from framework.engine.sequence import Sequence
from framework.engine.sequence_group import SequenceGroup


def continuable(scheduler: Scheduler, batch: ScheduledBatch) -> bool:
    """Whether the step after ``batch`` can be planned before ``batch``'s tokens are known: a pure
    decode of every running request, none waiting or swapped, each one's sampling needing nothing from
    the host (penalties, logit bias, min_tokens, prompt logprobs, a strategy that forks or prunes)."""
    if batch.forks or batch.swap_out or scheduler.waiting or scheduler.swapped:
        return False
    if any(n != 1 for n in batch.num_new_tokens):
        return False
    # Every live sequence of a running request is in the batch (the batch's others have stopped).
    if sum(group.num_live_seqs() for group in scheduler.running) != sum(not seq.is_finished for seq in batch.seqs):
        return False
    for group in batch.groups:
        if not getattr(group.strategy, "supports_async_scheduling", False):
            return False
        if group.params.processes_logits or group.needs_prompt_logprobs:
            return False
    return True


def plan(
    scheduler: Scheduler, kv: KVCacheManager, live: dict[str, SequenceGroup], max_model_len: int
) -> ScheduledBatch | None:
    """The decode after the step in flight, its blocks reserved; None when there is none to run.

    ``live``: the engine's requests by id (an aborted or finished request is no longer there).
    Sequences that end by length with the token in flight are left out. Blocks taken before a
    failure are not given back: they are the ones those sequences need next anyway.
    """
    seqs: list[Sequence] = []
    groups: list[SequenceGroup] = []
    for group in scheduler.running:
        if live.get(group.request_id) is not group or group.is_finished():
            continue
        kept = [seq for seq in group.live_seqs() if not _ends_by_length(seq, max_model_len)]
        if kept:
            seqs += kept
            groups.append(group)
    if not seqs:
        return None
    # Room for the token in flight and the one this step samples.
    if not all(kv.allocate_slots(seq, 2) for seq in seqs):
        kv.take_copies()
        return None
    return ScheduledBatch(seqs=seqs, num_new_tokens=[1] * len(seqs), groups=groups, block_copies=kv.take_copies())


def _ends_by_length(seq: Sequence, max_model_len: int) -> bool:
    """Whether the token in flight ends ``seq`` by max_tokens or max_model_len."""
    max_tokens = seq.params.max_tokens
    return (max_tokens is not None and seq.num_output_tokens + 1 >= max_tokens) or seq.num_tokens + 1 >= max_model_len


def sample_rows(previous: list[Sequence], seqs: list[Sequence]) -> np.ndarray | None:
    """Row of each of ``seqs`` among the sampled sequences of the step before (None: rows 0..n-1)."""
    if len(previous) >= len(seqs) and all(a is b for a, b in zip(previous, seqs)):
        return None
    row_of = {id(s): i for i, s in enumerate(previous)}
    return np.fromiter((row_of[id(s)] for s in seqs), dtype=np.int64, count=len(seqs))


def name_filled_blocks(kv: KVCacheManager, batch: ScheduledBatch) -> None:
    """Prefix caching: name the blocks that the step in flight fills, now that their tokens are known (the
    scheduler names a step's blocks when it plans it; a continuation's last token was unknown then)."""
    if kv.cache is None:
        return
    bs = kv.block_size
    for seq in batch.seqs:
        if not seq.is_finished and (seq.num_computed_tokens + 1) // bs > seq.num_cached_blocks:
            kv.cache_full_blocks(seq, seq.num_computed_tokens + 1)
