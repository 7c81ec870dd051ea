"""``EngineStats``: a snapshot of the scheduler and the KV cache (offline API, server metrics, logs)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    """The engine's state between two steps; counters are totals since the engine started.

    Attributes:
        num_running: requests running (holding KV blocks).
        num_waiting: requests waiting (new, or preempted by recompute).
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
        num_preemptions: requests preempted, both modes.
        num_swapped: requests preempted by swap, their KV blocks in CPU
            memory, waiting to resume.
        num_cpu_blocks: blocks of the CPU swap pool (``swap_space``).
        cpu_kv_cache_usage: fraction of CPU blocks in use, 0..1.
        num_swap_preemptions: preemptions that swapped the request out.
        num_recompute_preemptions: preemptions that freed its blocks for
            recomputation (``num_preemptions`` is the sum of the two).
        swapped_out_blocks: blocks copied GPU -> CPU.
        swapped_in_blocks: blocks copied CPU -> GPU.
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
    num_swapped: int = 0
    num_cpu_blocks: int = 0
    cpu_kv_cache_usage: float = 0.0
    num_swap_preemptions: int = 0
    num_recompute_preemptions: int = 0
    swapped_out_blocks: int = 0
    swapped_in_blocks: int = 0

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
