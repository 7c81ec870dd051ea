"""Virtual engines: the independent streams of batches a pipeline-parallel engine keeps in flight.

With ``pipeline_parallel_size = M > 1``, the engine has M virtual engines,
each with its own scheduler and its own share of the KV pool: ``num_blocks
// M`` GPU blocks and ``num_cpu_blocks // M`` CPU swap blocks, numbered from
0 by its ``KVCacheManager`` and placed in the one cache tensor at
``block_offset`` (``cpu_block_offset``) by the executor. A request stays with
the virtual engine it was added to: the one with the fewest unfinished
requests. Step k schedules on virtual engine ``k % M``; its batch is
submitted to the pipeline while the others' batches are still in flight,
and its sequences are never in two batches at once (its next batch is
scheduled only after the previous one's results are applied).

Separate pools, not one shared: a scheduler preempts only its own requests,
so it must see only its own blocks (a shared pool would let one virtual
engine starve another, and "no other request holds blocks" would no longer
mean "the whole pool is free"). The price: the prefix cache is per virtual
engine, so a prefix computed by one is not found by another.

With one stage there is one virtual engine owning the whole pool, and the
engine steps synchronously, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from framework.engine.block_pool import KVCacheManager
from framework.engine.scheduler import Scheduler


@dataclass
class VirtualEngine:
    index: int
    kv: KVCacheManager
    scheduler: Scheduler
    block_offset: int = 0  # first block of its share of the GPU pool
    cpu_block_offset: int = 0  # first block of its share of the CPU swap pool
    in_flight: bool = False  # a batch of it is submitted and not yet applied

    def num_unfinished(self) -> int:
        s = self.scheduler
        return len(s.waiting) + len(s.running) + len(s.swapped)


def make_virtual_engines(count: int, num_blocks: int, num_cpu_blocks: int, config) -> list[VirtualEngine]:
    """``count`` virtual engines splitting ``num_blocks`` GPU and ``num_cpu_blocks`` CPU blocks evenly."""
    gpu, cpu = num_blocks // count, num_cpu_blocks // count
    engines = []
    for i in range(count):
        kv = KVCacheManager(gpu, config.block_size, config.enable_prefix_caching, cpu)
        scheduler = Scheduler(kv, config.max_num_seqs, config.max_num_batched_tokens, config.preemption_mode)
        engines.append(VirtualEngine(i, kv, scheduler, i * gpu, i * cpu))
    return engines
