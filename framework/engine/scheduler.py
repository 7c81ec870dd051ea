"""Continuous-batching scheduler (plain Python, no torch).

There is no prefill phase and no decode phase. Each sequence has
``num_computed_tokens``; a step gives every scheduled sequence some new
tokens so that it catches up with ``num_tokens``: one for a decode, up to the
whole prompt for a fresh request, or a chunk of it when the step's token
budget (``max_num_batched_tokens``) runs out -- chunked prefill falls out of
this. At most ``max_num_seqs`` sequences are running.

Policy (FCFS):
  1. running sequences first, oldest first; when the pool has no block for
     one, the newest running sequence is preempted (recompute: its blocks are
     freed and it goes back to the front of the waiting queue) until it fits
     or it is itself the one preempted;
  2. then waiting sequences, oldest first, while budget, sequence cap and
     blocks allow -- but none in a step that had to preempt.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from framework.engine.block_pool import KVCacheManager
from framework.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """What one step computes: sequences and their new-token counts, in order."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        budget = self._schedule_running(batch, budget)
        if not batch.preempted:
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate_slots(seq, n):
                victim = self.running.pop()  # newest; never one already scheduled (index < i)
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    return budget
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            i += 1
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.kv.allocate_slots(seq, n):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seqs: Iterable[Sequence]) -> None:
        """Remove finished sequences from the running list and free their blocks."""
        done = {id(s) for s in seqs}
        if not done:
            return
        for seq in self.running:
            if id(seq) in done:
                self.kv.free(seq)
        self.running = [s for s in self.running if id(s) not in done]

    def abort(self, request_ids: set[str]) -> list[Sequence]:
        """Drop the sequences of these requests wherever they are; return them."""
        aborted = [s for s in self.running if s.request_id in request_ids]
        aborted += [s for s in self.waiting if s.request_id in request_ids]
        for seq in aborted:
            self.kv.free(seq)
            seq.status = SequenceStatus.FINISHED
        self.running = [s for s in self.running if s.request_id not in request_ids]
        self.waiting = deque(s for s in self.waiting if s.request_id not in request_ids)
        return aborted
