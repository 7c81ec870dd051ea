"""``EngineStats``: a snapshot of the scheduler and the KV cache (offline API, server metrics, logs)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    """The engine's state between two steps; counters are totals since the engine started.

    Attributes:
        num_running: requests running (holding KV blocks).
        num_waiting: requests waiting (new or preempted).
        kv_cache_usage: fraction of KV blocks in use, 0..1 (free blocks that
            still hold a cached prefix count as free, as in vLLM).
        num_blocks: KV blocks in the pool.
        block_size: tokens (slots) per block.
        allocated_slots: slots of the blocks in use.
        used_slots: those holding K/V (a block shared by several sequences
            counts once); ``allocated_slots - used_slots`` are the empty
            tails of sequences' last blocks.
        cached_free_blocks: free blocks that still hold a cached prefix
            (reused on a hit, evicted least recently freed first).
        prefix_cache_queries: prompt tokens looked up in the prefix cache,
            counted at each admission (re-admission after preemption too).
        prefix_cache_hits: tokens of those found cached (not computed again).
        num_preemptions: requests preempted (recompute).
    """

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_blocks: int
    block_size: int
    allocated_slots: int
    used_slots: int
    cached_free_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int

    @property
    def total_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def unused_slots(self) -> int:
        """Allocated but holding no K/V."""
        return self.allocated_slots - self.used_slots

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hits / queries, 0..1 (0 before any query)."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
