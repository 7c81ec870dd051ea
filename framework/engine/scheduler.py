"""Continuous-batching scheduler (plain Python, no torch).

There is no prefill phase and no decode phase. Each sequence has
``num_computed_tokens``; a step gives every scheduled sequence some new
tokens so that it catches up with ``num_tokens``: one for a decode, up to the
whole prompt for a fresh request, or a chunk of it when the step's token
budget (``max_num_batched_tokens``) runs out -- chunked prefill falls out of
this.

The scheduler admits and preempts requests (``SequenceGroup``s), and
schedules their sequences. Rules:
  * at most ``max_num_seqs`` sequences run; a request counts with its
    strategy's width (n / best_of / beam width) from admission on;
  * all live sequences of a request sample in the same step: either every
    one of them reaches its end this step, or each is given a chunk that
    stops short of its end (``_plan``);
  * at the step where a request's single prompt sequence samples, its
    ``fanout - 1`` children are forked: they share its blocks and sample
    from its logits row (``ScheduledBatch.forks``).

Policy (FCFS):
  1. running requests first, oldest first; when the pool has no room for
     one (its new blocks and copy-on-write blocks, counted for all its
     sequences before any is allocated), the newest running request is
     preempted until it fits or it is itself the one preempted. A preempted
     request gives up its GPU blocks in one of two ways:
       * swap: the blocks of its live sequences are copied to the CPU pool
         (``swap_space``; each shared block once, so they stay shared) and it
         goes to the front of the swapped queue, keeping its computed tokens;
       * recompute: its blocks are freed, it goes to the front of the waiting
         queue and computes its prompt and output again (through the prefix
         cache when enabled). A request with several sequences recomputes
         each of them as an independent sequence (blocks are no longer
         shared); each keeps its generator, so seeded output does not change.
     Which one (``preemption_mode``): "swap" swaps every request; "recompute"
     none; None (vLLM's rule) swaps requests with several live sequences
     (parallel sampling, beams: recompute would lose their block sharing) and
     recomputes single-sequence ones. A request to swap whose blocks do not
     fit in the free CPU blocks is recomputed instead;
  2. then swapped requests, oldest (front) first, each resumed when its
     blocks (copied back into fresh GPU blocks) plus this step's new ones
     fit, and the token budget and sequence cap allow; the first that does
     not fit stops the queue;
  3. then waiting requests, oldest first, while budget, sequence cap and
     blocks allow, but only once no request is swapped (they are older).
  Steps 2 and 3 are skipped in a step that had to preempt: it has no room.
  A step's swap-outs (GPU -> CPU) and swap-ins (CPU -> GPU) are
  ``ScheduledBatch.swap_out`` / ``swap_in``; the runner performs them before
  the copy-on-write copies and the forward. A step has one kind or the
  other, never both.
  A request that cannot get its blocks although no other request holds any
  (it preempted itself while alone, or, at the head of the swapped or
  waiting queue, does not fit an idle pool) never will: its sequences
  together outgrow the pool. It is dropped (``ScheduledBatch.unfittable``)
  and the engine finishes it where it is, with finish_reason "length",
  rather than resuming it forever. (One sequence always fits: the engine
  refuses a pool smaller than ``max_model_len``.)

Prefix caching (when the KV manager has a cache): on admission, and on
re-admission after a preemption, each live sequence of the request first
takes the longest cached run of full blocks that starts its tokens
(``KVCacheManager.reuse_cached_prefix``) and starts with that many tokens
computed -- never all of them: the last token is always computed, so the
step samples. Requests that want ``prompt_logprobs`` still to be computed
skip the lookup (they need every prompt position's logits). The full blocks
a planned step fills are named at once (``_add``), so a request admitted
later in the same step shares them. If the request cannot be admitted after
all, its cached blocks are given back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from framework.engine.block_pool import KVCacheManager
from framework.engine.sequence import Sequence, SequenceStatus
from framework.engine.sequence_group import SequenceGroup

Plan = list[tuple[Sequence, int]]


@dataclass
class ScheduledBatch:
    """What one step computes: sequences and their new-token counts, in order."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    groups: list[SequenceGroup] = field(default_factory=list)  # requests with a sequence in this step
    preempted: list[SequenceGroup] = field(default_factory=list)
    # (parent, child): child was forked this step and samples from parent's logits row
    forks: list[tuple[Sequence, Sequence]] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), before the forward
    # requests dropped because they cannot fit the KV pool even alone (several sequences of a
    # long request); the engine finishes them with finish_reason "length"
    unfittable: list[SequenceGroup] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (GPU src, CPU dst), first
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (CPU src, GPU dst), after swap_out

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


def _plan(group: SequenceGroup, budget: int) -> Plan:
    """New tokens per live sequence so that the request samples all together or not at all."""
    if len(group.seqs) == 1:  # the common case, kept cheap: one sequence samples alone anyway
        seq = group.seqs[0]
        return [(seq, min(seq.num_tokens - seq.num_computed_tokens, budget))]
    live = group.live_seqs()
    remaining = [s.num_tokens - s.num_computed_tokens for s in live]  # each >= 1
    if sum(remaining) <= budget:
        return list(zip(live, remaining))
    plan = []
    for seq, left in zip(live, remaining):
        n = min(left - 1, budget)  # stop short of the end: nobody samples alone
        if n > 0:
            plan.append((seq, n))
            budget -= n
    return plan


PREEMPTION_MODES = ("recompute", "swap", None)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        preemption_mode: str | None = None,
    ):
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be 'recompute', 'swap' or None, got {preemption_mode!r}")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []
        self.swapped: deque[SequenceGroup] = deque()  # preempted by swap, oldest first
        self.num_recompute_preemptions = 0
        self.num_swap_preemptions = 0

    @property
    def num_preemptions(self) -> int:
        return self.num_recompute_preemptions + self.num_swap_preemptions

    def add(self, group: SequenceGroup) -> None:
        self.waiting.append(group)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if not batch.preempted:
            budget = self._schedule_swapped(batch, budget)
            if not self.swapped:
                self._schedule_waiting(batch, budget)
        batch.block_copies = self.kv.take_copies()
        batch.swap_out, batch.swap_in = self.kv.take_swaps()
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            group = self.running[i]
            plan = _plan(group, budget)
            if not self._allocate_or_preempt(batch, group, plan):
                return budget
            budget -= self._add(batch, group, plan)
            i += 1
        return budget

    def _allocate_or_preempt(self, batch: ScheduledBatch, group: SequenceGroup, plan: Plan) -> bool:
        """Allocate a running request's plan, preempting the newest requests for room; False if it was preempted.

        Nothing is allocated before the whole plan fits, so a preempted
        request (``group`` itself included) holds only computed blocks: what
        swapping copies out.
        """
        kv = self.kv
        if len(plan) == 1:  # allocate_slots of one sequence is all or nothing already
            seq, n = plan[0]
            while not kv.allocate_slots(seq, n):
                if self._preempt_newest(batch) is group:
                    return self._drop_if_alone(batch, group)
            return True
        while kv.blocks_for(plan) > kv.pool.num_free:
            if self._preempt_newest(batch) is group:
                return self._drop_if_alone(batch, group)
        self._allocate_counted(plan)
        return True

    def _drop_if_alone(self, batch: ScheduledBatch, group: SequenceGroup) -> bool:
        """``group`` just preempted itself. If no other request was running, the whole pool could
        not hold its next step: it never will, so it is dropped (``batch.unfittable``) instead of
        being preempted and resumed forever. Returns False (the request did not get its blocks)."""
        if not self.running:
            self._drop(batch, group)
        return False

    def _drop(self, batch: ScheduledBatch, group: SequenceGroup) -> None:
        if batch.preempted and batch.preempted[-1] is group:
            batch.preempted.pop()
            if group in self.swapped:
                self.num_swap_preemptions -= 1
            else:
                self.num_recompute_preemptions -= 1
        self.abort({group.request_id})
        batch.unfittable.append(group)

    def _allocate_counted(self, plan: Plan) -> None:
        """Allocate a plan whose blocks were counted to fit (``blocks_for``): it cannot fail."""
        for seq, n in plan:
            allocated = self.kv.allocate_slots(seq, n)
            assert allocated, f"blocks_for undercounted for {seq}"

    def _preempt_newest(self, batch: ScheduledBatch) -> SequenceGroup:
        victim = self.running.pop()  # newest; never one already scheduled this step (they come first)
        self._preempt(victim)
        batch.preempted.append(victim)
        return victim

    def _schedule_swapped(self, batch: ScheduledBatch, budget: int) -> int:
        """Resume swapped requests, oldest first, while their blocks, the budget and the sequence cap allow."""
        if not self.swapped:
            return budget
        kv = self.kv
        num_seqs = sum(g.max_num_running_seqs() for g in self.running)
        while self.swapped and budget > 0:
            group = self.swapped[0]
            width = group.max_num_running_seqs()
            if num_seqs + width > self.max_num_seqs:
                break
            seqs = group.live_seqs()
            plan = _plan(group, budget)
            if not plan or kv.blocks_to_swap_in(seqs, plan) > kv.pool.num_free:
                if plan and not self.running and not batch.seqs:  # the whole pool is free, and not enough
                    self._drop(batch, group)
                    continue
                break
            kv.swap_in(seqs)
            self._allocate_counted(plan)
            self.swapped.popleft()
            for seq in seqs:
                seq.status = SequenceStatus.RUNNING
            self.running.append(group)
            budget -= self._add(batch, group, plan)
            num_seqs += width
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        if not self.waiting:
            return
        num_seqs = sum(g.max_num_running_seqs() for g in self.running)
        while self.waiting and budget > 0:
            group = self.waiting[0]
            width = group.max_num_running_seqs()
            if num_seqs + width > self.max_num_seqs:
                break
            looked_up = self._reuse_cached_prefix(group)
            plan = _plan(group, budget)
            if not plan or not self._allocate_all(plan):
                self._release_blocks(group)
                if plan and not self.running and not batch.seqs:  # the whole pool is free, and not enough
                    self._drop(batch, group)
                    continue
                break
            if looked_up is not None:
                self.kv.cache.record(*looked_up)
            self.waiting.popleft()
            for seq in group.live_seqs():
                seq.status = SequenceStatus.RUNNING
            self.running.append(group)
            budget -= self._add(batch, group, plan)
            num_seqs += width

    def _reuse_cached_prefix(self, group: SequenceGroup) -> tuple[int, int] | None:
        """Give a waiting request's sequences their cached prefixes; ``(tokens looked up, tokens found)``.

        None when nothing was looked up (no prefix cache, or the request
        still needs prompt logprobs).
        """
        if not self.kv.caching or group.needs_prompt_logprobs:
            return None
        seqs = group.live_seqs()
        hit = sum(self.kv.reuse_cached_prefix(seq) for seq in seqs)
        return sum(seq.num_tokens for seq in seqs), hit

    def _allocate_all(self, plan: Plan) -> bool:
        """Blocks for a waiting request's plan, all or none (the caller releases a partial allocation)."""
        return all(self.kv.allocate_slots(seq, n) for seq, n in plan)

    def _release_blocks(self, group: SequenceGroup) -> None:
        """A waiting request that was not admitted gives back every block it got (cached prefix included)."""
        for seq in group.live_seqs():
            self.kv.free(seq)
            seq.num_computed_tokens = 0

    def _add(self, batch: ScheduledBatch, group: SequenceGroup, plan: Plan) -> int:
        """Put a planned request into the batch (forking it if it samples for the first time); returns its tokens."""
        if not plan:
            return 0
        total = 0
        kv = self.kv
        caching, block_size = kv.cache is not None, kv.block_size
        for seq, n in plan:
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            total += n
            # Name the blocks this step fills (the check inline: most steps fill none).
            if caching and (seq.num_computed_tokens + n) // block_size > seq.num_cached_blocks:
                kv.cache_full_blocks(seq, seq.num_computed_tokens + n)
        batch.groups.append(group)
        if group.fanout > 1 and not group.forked:
            parent, n = plan[0]
            if parent.num_computed_tokens + n == parent.num_tokens:
                self._fork(batch, group, parent, n)
        return total

    def _fork(self, batch: ScheduledBatch, group: SequenceGroup, parent: Sequence, n: int) -> None:
        for child in group.fork_children():
            self.kv.fork(parent, child)
            child.num_computed_tokens = parent.num_computed_tokens + n  # what the parent has after this step
            child.status = SequenceStatus.RUNNING
            batch.forks.append((parent, child))

    def _preempt(self, group: SequenceGroup) -> None:
        seqs = group.live_seqs()
        mode = self.preemption_mode
        if (mode == "swap" or (mode is None and len(seqs) > 1)) and self.kv.swap_out(seqs):
            for seq in seqs:
                seq.status = SequenceStatus.SWAPPED
            self.swapped.appendleft(group)
            self.num_swap_preemptions += 1
            return
        for seq in seqs:  # recompute (also when the CPU pool is full or absent)
            self.kv.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(group)
        self.num_recompute_preemptions += 1

    def finish(self, groups: Iterable[SequenceGroup]) -> None:
        """Remove finished requests from the running list and free whatever blocks they still hold."""
        done = {id(g) for g in groups}
        if not done:
            return
        for group in self.running:
            if id(group) in done:
                for seq in group.seqs:
                    self.kv.free(seq)
        self.running = [g for g in self.running if id(g) not in done]

    def abort(self, request_ids: set[str]) -> list[SequenceGroup]:
        """Drop these requests wherever they are; free their blocks (GPU or CPU); return them."""
        aborted = [g for g in self.running if g.request_id in request_ids]
        aborted += [g for g in self.waiting if g.request_id in request_ids]
        for group in aborted:
            for seq in group.seqs:
                self.kv.free(seq)
        swapped = [g for g in self.swapped if g.request_id in request_ids]
        for group in swapped:
            for seq in group.live_seqs():
                self.kv.free_swapped(seq)
        self.running = [g for g in self.running if g.request_id not in request_ids]
        self.waiting = deque(g for g in self.waiting if g.request_id not in request_ids)
        self.swapped = deque(g for g in self.swapped if g.request_id not in request_ids)
        return aborted + swapped
