"""The KV-cache block pool and the per-sequence slot allocator (no torch)."""

from __future__ import annotations

from framework.engine.sequence import Sequence


class BlockPool:
    """Fixed set of KV-cache blocks with reference counts.

    Free blocks sit on a stack (``_free``): allocate and free are O(1) per
    block. A block is free exactly when its reference count is 0; forks
    (parallel sampling, beam search) share a block by raising its count, and
    the block returns to the stack when the last holder frees it.
    ``total_allocated`` counts every block ever handed out (tests use it to
    show that a shared prompt is allocated once).
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.total_allocated = 0
        # Pop from the end: low block ids are handed out first.
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        """Fraction of blocks in use (0..1)."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
        self.total_allocated += n
        return blocks

    def incref(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.ref_counts[b] > 0, f"block {b} is free"
            self.ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        # Freed in reverse so a sequence's first block is reused first.
        for b in reversed(blocks):
            count = self.ref_counts[b] - 1
            assert count >= 0, f"block {b} freed twice"
            self.ref_counts[b] = count
            if count == 0:
                self._free.append(b)


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
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self._copies: dict[int, int] = {}  # dst -> src, pending block copies of this step

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
        if need + shared > len(self.pool._free):
            return False
        if shared:
            src, dst = blocks[first], self.pool.allocate(1)[0]
            self.pool.free([src])  # still held by the other sharers
            blocks[first] = dst
            self._copies[dst] = src
        if need:
            blocks.extend(self.pool.allocate(need))
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares all of ``parent``'s blocks."""
        child.block_ids = list(parent.block_ids)
        self.pool.incref(child.block_ids)

    def free(self, seq: Sequence) -> None:
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        # A copy into a block that is free again has no reader; drop it, so the
        # block can be reused (even as another copy's destination) this step.
        for dst in [d for d in self._copies if self.pool.ref_counts[d] == 0]:
            del self._copies[dst]

    def take_copies(self) -> list[tuple[int, int]]:
        """The pending ``(src, dst)`` block copies, which the runner performs before the forward."""
        copies = [(src, dst) for dst, src in self._copies.items()]
        self._copies.clear()
        return copies

    def max_tokens_in_pool(self) -> int:
        return self.pool.num_blocks * self.block_size
