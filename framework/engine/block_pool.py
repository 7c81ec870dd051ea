"""The KV-cache block pool and the per-sequence slot allocator (no torch)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from framework.engine.prefix_cache import (
    ROOT,
    PrefixCache,
    block_hashes,
    extra_keys,
    hash_block,
)
from framework.engine.sequence import Sequence


class BlockPool:
    """Fixed set of KV-cache blocks with reference counts.

    A block is free exactly when its reference count is 0; forks (parallel
    sampling, beam search) and prefix-cache hits share a block by raising its
    count, and it is free again when the last holder lets go. Free blocks sit
    on one of two lists, every operation O(1):

      * ``_free``: blocks holding nothing worth keeping, a stack (LIFO: the
        block freed last is reused first);
      * ``_evictable``: blocks that still hold a cached prefix (``cache``),
        least recently freed first. An ``OrderedDict`` used as a doubly
        linked list: a hit revives a block from the middle in O(1)
        (``share``), eviction pops the front.

    ``allocate`` takes from ``_free`` first and evicts only when it is empty,
    so cached content is never lost while an empty block is left; an evicted
    block's cache entry is dropped before it gets new content.
    ``total_allocated`` counts every block ever handed out for new content
    (tests use it to show that a shared prompt is allocated once).
    """

    def __init__(self, num_blocks: int, cache: PrefixCache | None = None):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.total_allocated = 0
        self.cache = cache
        # Pop from the end: low block ids are handed out first.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable(self) -> int:
        """Free blocks that still hold a cached prefix."""
        return len(self._evictable)

    def usage(self) -> float:
        """Fraction of blocks in use (0..1); free cached blocks count as free."""
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks with {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:  # evict the least recently freed cached block
                block, _ = self._evictable.popitem(last=False)
                self.cache.drop(block)
            self.ref_counts[block] = 1
            blocks.append(block)
        self.total_allocated += n
        return blocks

    def incref(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.ref_counts[b] > 0, f"block {b} is free"
            self.ref_counts[b] += 1

    def share(self, blocks: list[int]) -> None:
        """Take a reference to cached blocks, reviving the free ones from the LRU list."""
        for b in blocks:
            if self.ref_counts[b] == 0:
                del self._evictable[b]
            self.ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        # Freed in reverse: a sequence's last block is evicted before its first,
        # which more requests share; without caching, its first block is reused first.
        for b in reversed(blocks):
            count = self.ref_counts[b] - 1
            assert count >= 0, f"block {b} freed twice"
            self.ref_counts[b] = count
            if count == 0:
                if self.cache is not None and self.cache.is_cached(b):
                    self._evictable[b] = None  # most recently freed: evicted last
                else:
                    self._free.append(b)

    def forget_cached(self) -> int:
        """Drop every cache entry; free cached blocks become plain free blocks. Returns the count dropped."""
        if self.cache is None:
            return 0
        self._free.extend(reversed(self._evictable))
        self._evictable.clear()
        return self.cache.clear()


class KVCacheManager:
    """Gives sequences the slots for the tokens a step computes.

    Block layout of one sequence (block_size 4, 10 tokens, 7 computed)::

        block_ids:  [ b0        | b1        | b2        ]
        tokens:     [ t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 . . ]
        computed:    <---------- 7 ---------->
        a step of 3 new tokens writes slots of t7, t8, t9: needs no new block.

    Copy on write: a fork shares every block of its parent. Full blocks stay
    shared for good (nobody writes them again). The first write into a
    shared, partly filled last block (b1 above, if shared) gets a fresh
    block instead, and the copy ``src -> dst`` is queued for the model runner
    to perform on the device before the step's forward
    (``take_copies``).

    Prefix caching (``enable_prefix_caching``): ``cache_full_blocks`` names
    the blocks a scheduled step fills (b0 and b1 above after the step of 3)
    as soon as the step is planned, so a request admitted later in the same
    step already shares them: attention backends write every new K/V of a
    layer before any token of the batch attends. ``reuse_cached_prefix``
    gives an admitted sequence the longest run of cached full blocks that
    starts its tokens, short of its last token (which must be computed to
    sample). Cached blocks are full, so copy on write never touches them.

    Swapping (``num_cpu_blocks`` > 0): a second pool, ``cpu_pool``, numbers
    the blocks of the runner's CPU copy of the cache. ``swap_out`` moves a
    preempted request's live sequences there: each distinct GPU block gets
    one CPU block (a block its sequences share stays shared, with the same
    reference count), the sequences' ``block_ids`` become CPU ids, and the
    GPU blocks are freed like any others -- a cached one keeps its name on
    the pool's LRU list and can still be revived by a hit. ``swap_in`` does
    the reverse into freshly allocated GPU blocks. Swapped-in blocks start
    unnamed (``num_cached_blocks`` = 0): the scheduler names them again the
    next time it plans the sequence, wherever the name is not taken (their
    K/V are those of the same tokens). The ``(src, dst)`` pairs of both
    directions are queued for the runner (``take_swaps``).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False, num_cpu_blocks: int = 0):
        if num_cpu_blocks < 0:
            raise ValueError(f"num_cpu_blocks must be >= 0, got {num_cpu_blocks}")
        self.cache = PrefixCache(num_blocks) if enable_prefix_caching else None
        self.pool = BlockPool(num_blocks, self.cache)
        self.cpu_pool = BlockPool(num_cpu_blocks) if num_cpu_blocks else None
        self.block_size = block_size
        self._copies: dict[int, int] = {}  # dst -> src, pending block copies of this step
        self._swap_out: list[tuple[int, int]] = []  # (GPU src, CPU dst), pending this step
        self._swap_in: list[tuple[int, int]] = []  # (CPU src, GPU dst), pending this step
        self.num_swapped_out_blocks = 0  # totals since start
        self.num_swapped_in_blocks = 0

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_ids))

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Reserve blocks so ``num_new_tokens`` more tokens fit; False (and no change) if the pool is short."""
        blocks = seq.block_ids
        need = max(0, -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size) - len(blocks))
        # The block the next token is written to, when another sequence shares it: copy on write.
        first = seq.num_computed_tokens // self.block_size
        shared = first < len(blocks) and self.pool.ref_counts[blocks[first]] > 1
        if (need or shared) and need + shared > self.pool.num_free:
            return False
        if shared:
            src, dst = blocks[first], self.pool.allocate(1)[0]
            self.pool.free([src])  # still held by the other sharers
            blocks[first] = dst
            self._copies[dst] = src
        if need:
            blocks.extend(self.pool.allocate(need))
        return True

    def blocks_for(self, plan: Iterable[tuple[Sequence, int]], ref_counts: list[int] | None = None) -> int:
        """Free blocks that ``allocate_slots`` takes for every ``(seq, n)`` of ``plan``, in order.

        New blocks plus the copy-on-write ones: a shared write block is
        copied by each sharer but the last (each copy drops one reference).
        ``ref_counts``: those of the pool ``seq.block_ids`` index (the GPU
        pool's by default; the CPU pool's for a swapped request).
        """
        counts = self.pool.ref_counts if ref_counts is None else ref_counts
        bs, total, copied = self.block_size, 0, {}
        for seq, n in plan:
            blocks = seq.block_ids
            total += max(0, -(-(seq.num_computed_tokens + n) // bs) - len(blocks))
            first = seq.num_computed_tokens // bs
            if first < len(blocks):
                b = blocks[first]
                if counts[b] - copied.get(b, 0) > 1:
                    total += 1
                    copied[b] = copied.get(b, 0) + 1
        return total

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares all of ``parent``'s blocks."""
        child.block_ids = list(parent.block_ids)
        child.num_cached_blocks = parent.num_cached_blocks
        self.pool.incref(child.block_ids)

    def free(self, seq: Sequence) -> None:
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.num_cached_blocks = 0
        self._drop_dead_copies()

    def _drop_dead_copies(self) -> None:
        # A copy into a block that is free again has no reader; drop it, so the
        # block can be reused (even as another copy's destination) this step.
        if self._copies:
            for dst in [d for d in self._copies if self.pool.ref_counts[d] == 0]:
                del self._copies[dst]

    def take_copies(self) -> list[tuple[int, int]]:
        """The pending ``(src, dst)`` block copies, which the runner performs before the forward."""
        copies = [(src, dst) for dst, src in self._copies.items()]
        self._copies.clear()
        return copies

    # -- swapping ------------------------------------------------------------

    def swap_out(self, seqs: list[Sequence]) -> bool:
        """Move the blocks of a preempted request's live sequences to the CPU pool; False (no change) if it is short.

        Each distinct block is copied once, so blocks shared between the
        sequences stay shared. ``seqs`` must hold only blocks with their K/V
        computed (a request preempted before any allocation of this step).
        """
        cpu = self.cpu_pool
        distinct = list(dict.fromkeys(b for seq in seqs for b in seq.block_ids))
        if cpu is None or len(distinct) > cpu.num_free:
            return False
        pairs = list(zip(distinct, cpu.allocate(len(distinct))))
        to_cpu = dict(pairs)
        for seq in seqs:
            self.pool.free(seq.block_ids)
            seq.block_ids = [to_cpu[b] for b in seq.block_ids]
            seq.num_cached_blocks = 0
            cpu.incref(seq.block_ids)
        cpu.free([c for _, c in pairs])  # the allocation's own reference: now one per holding sequence
        self._drop_dead_copies()
        self._swap_out += pairs
        self.num_swapped_out_blocks += len(pairs)
        return True

    def blocks_to_swap_in(self, seqs: list[Sequence], plan: Iterable[tuple[Sequence, int]]) -> int:
        """GPU blocks a swapped request needs to resume with ``plan``: its CPU blocks, then the plan's."""
        distinct = len({b for seq in seqs for b in seq.block_ids})
        return distinct + self.blocks_for(plan, self.cpu_pool.ref_counts)

    def swap_in(self, seqs: list[Sequence]) -> None:
        """Move a swapped request's blocks back into fresh GPU blocks (the caller checked there are enough)."""
        cpu = self.cpu_pool
        distinct = list(dict.fromkeys(b for seq in seqs for b in seq.block_ids))
        pairs = list(zip(distinct, self.pool.allocate(len(distinct))))
        to_gpu = dict(pairs)
        for seq in seqs:
            cpu.free(seq.block_ids)
            seq.block_ids = [to_gpu[b] for b in seq.block_ids]
            self.pool.incref(seq.block_ids)
        self.pool.free([g for _, g in pairs])
        self._swap_in += pairs
        self.num_swapped_in_blocks += len(pairs)

    def free_swapped(self, seq: Sequence) -> None:
        """Free the CPU blocks of a swapped sequence (an aborted request)."""
        self.cpu_pool.free(seq.block_ids)
        seq.block_ids = []
        seq.num_cached_blocks = 0

    def take_swaps(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The pending ``(GPU, CPU)`` swap-outs and ``(CPU, GPU)`` swap-ins, which the runner performs first."""
        out, self._swap_out = self._swap_out, []
        into, self._swap_in = self._swap_in, []
        return out, into

    def max_tokens_in_pool(self) -> int:
        return self.pool.num_blocks * self.block_size

    # -- prefix caching ------------------------------------------------------

    @property
    def caching(self) -> bool:
        return self.cache is not None

    def reuse_cached_prefix(self, seq: Sequence) -> int:
        """Share the cached blocks that start ``seq`` (which holds none); returns the tokens they cover.

        At most ``(num_tokens - 1) // block_size`` blocks: the last token is
        always computed, so the step samples. Each block is verified against
        the sequence's own tokens before it is shared.
        """
        assert not seq.block_ids and seq.num_computed_tokens == 0, seq
        bs, tokens = self.block_size, seq.token_ids
        hashes = seq.block_hashes
        hit: list[int] = []
        for j in range((seq.num_tokens - 1) // bs):
            if j == len(hashes):
                block_hashes(seq, j + 1, bs)  # name blocks only as far as the hits go
            parent = hashes[j - 1] if j else ROOT
            block = self.cache.get(hashes[j], parent, tokens[j * bs : (j + 1) * bs], extra_keys(seq, j))
            if block is None:
                break
            hit.append(block)
        self.pool.share(hit)
        seq.block_ids = hit
        seq.num_cached_blocks = len(hit)
        seq.num_computed_tokens = len(hit) * bs
        return seq.num_computed_tokens

    def cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Name the blocks of ``seq`` that are full once its first ``num_tokens`` tokens are computed."""
        bs, first = self.block_size, seq.num_cached_blocks
        full = num_tokens // bs
        if full <= first:
            return
        hashes, tokens, cache = block_hashes(seq, first, bs), seq.token_ids, self.cache
        for j in range(first, full):  # usually one block (a decode filled it)
            block_tokens, parent, keys = tokens[j * bs : (j + 1) * bs], hashes[j - 1] if j else ROOT, extra_keys(seq, j)
            if j == len(hashes):
                hashes.append(hash_block(parent, block_tokens, keys))
            cache.insert(seq.block_ids[j], hashes[j], parent, block_tokens, keys)
        seq.num_cached_blocks = full

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix, free or in use; returns the number of blocks forgotten.

        Blocks in use keep their K/V for the sequences holding them; only new
        lookups stop finding them (those sequences do not name them again).
        """
        return self.pool.forget_cached()

    # -- accounting ----------------------------------------------------------

    def slot_usage(self, seqs: Iterable[Sequence]) -> tuple[int, int]:
        """``(allocated, used)`` slots between steps, given every sequence that holds blocks.

        Allocated: the slots of the blocks in use. Used: those holding K/V
        (a block shared by several sequences counts once). Between steps a
        sequence holds ``ceil(num_computed_tokens / block_size)`` blocks, all
        full but its last, so the unused slots are the empty tails of the
        distinct last blocks.
        """
        bs = self.block_size
        allocated = (self.pool.num_blocks - self.pool.num_free) * bs
        unused, seen = 0, set()
        for seq in seqs:
            blocks = seq.block_ids
            if blocks and blocks[-1] not in seen:
                seen.add(blocks[-1])
                unused += len(blocks) * bs - seq.num_computed_tokens
        return allocated, allocated - unused
