"""Automatic prefix caching: chain hashes of full KV blocks, and the hash -> block map (no torch).

A full block of a sequence is named by the SHA-256 of its *preimage*::

    key(j) = sha256( key(j-1)            32 bytes; ROOT for block 0
                   | uint32 n | n x int64   the block's token ids, little-endian
                   | extra keys )           (name, value) string pairs, each length-prefixed

The parent digest makes the name depend on every token before the block,
so two blocks share a name only if their whole prefixes are equal. The
encoding is canonical (fixed widths and length prefixes: two different
preimages never encode to the same bytes) and SHA-256 is collision
resistant, so a client cannot craft a prompt that takes another's blocks;
Python's ``hash()`` (64 bits, not collision resistant) is never used. A hit
is still verified: the cached block keeps its preimage (parent digest,
token ids, extra keys) and a lookup compares it with the request's.

Extra keys enter block 0 only; the chain carries them to every later block.
Today they are the request's ``SamplingParams.cache_salt`` (requests with
different salts never share a block); a LoRA adapter's name belongs there too
when adapters arrive.

Counters follow vLLM: ``queries`` are the tokens of the sequences looked up
(at admission, and again at re-admission after a preemption), ``hits`` the
tokens found cached.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import struct
from dataclasses import dataclass
from typing import Optional, Sequence as Seq

from framework.engine.sequence import Sequence

logger = logging.getLogger(__name__)

ROOT = hashlib.sha256(b"framework prefix cache v1").digest()  # the parent digest of block 0
ExtraKeys = tuple[tuple[str, str], ...]


def hash_block(parent: bytes, token_ids: Seq[int], extra_keys: ExtraKeys = ()) -> bytes:
    """The 32-byte name of a full block (see the module docstring for the encoding)."""
    h = hashlib.sha256(parent)
    h.update(_token_struct(len(token_ids)).pack(len(token_ids), *token_ids))
    for name, value in extra_keys:
        # surrogatepass: any str encodes (a lone surrogate from JSON must not fail a step), still one-to-one
        for part in (name.encode("utf-8", "surrogatepass"), value.encode("utf-8", "surrogatepass")):
            h.update(struct.pack("<I", len(part)))
            h.update(part)
    return h.digest()


@functools.lru_cache(maxsize=None)
def _token_struct(n: int) -> struct.Struct:
    return struct.Struct(f"<I{n}q")


def extra_keys(seq: Sequence, block_index: int) -> ExtraKeys:
    """The extra keys of block ``block_index`` of ``seq``: the cache salt, in block 0."""
    salt = getattr(seq.params, "cache_salt", None)
    return (("cache_salt", salt),) if block_index == 0 and salt is not None else ()


def block_hashes(seq: Sequence, num_blocks: int, block_size: int) -> list[bytes]:
    """The names of ``seq``'s first ``num_blocks`` full blocks, computed once and kept on the sequence.

    ``seq.block_hashes`` depends only on ``seq.token_ids``, which only grow,
    so the names stay valid for the life of the sequence (and its forks).
    """
    hashes, tokens = seq.block_hashes, seq.token_ids
    while len(hashes) < num_blocks:
        j = len(hashes)
        parent = hashes[-1] if hashes else ROOT
        hashes.append(hash_block(parent, tokens[j * block_size : (j + 1) * block_size], extra_keys(seq, j)))
    return hashes


@dataclass(slots=True)
class CachedBlock:
    """What a cached block holds: its name and the preimage a hit is verified against (never mutated)."""

    block_hash: bytes
    parent: bytes
    token_ids: tuple[int, ...]
    extra_keys: ExtraKeys


class PrefixCache:
    """Name -> block id for blocks whose K/V are complete, and the hit counters.

    Invariants: ``by_hash[h] == b`` iff ``entries[b].block_hash == h``; a block
    has at most one entry (a second block with the same content stays
    uncached). An entry lives on while its block is free (the pool keeps such
    blocks on its LRU list) and is dropped when the pool hands the block out
    for new content (``drop``) or on ``clear``.
    """

    def __init__(self, num_blocks: int):
        self.by_hash: dict[bytes, int] = {}
        self.entries: list[Optional[CachedBlock]] = [None] * num_blocks
        self.queries = 0  # tokens looked up
        self.hits = 0  # tokens found

    @property
    def num_entries(self) -> int:
        """Blocks cached (free or in use)."""
        return len(self.by_hash)

    def get(self, block_hash: bytes, parent: bytes, token_ids: Seq[int], keys: ExtraKeys) -> Optional[int]:
        """The block cached under ``block_hash`` if its preimage equals the request's; else None."""
        block = self.by_hash.get(block_hash)
        if block is None:
            return None
        entry = self.entries[block]
        if entry.parent != parent or entry.token_ids != tuple(token_ids) or entry.extra_keys != keys:
            logger.warning("prefix cache: SHA-256 name collision on block %d; treated as a miss", block)
            return None
        return block

    def insert(self, block: int, block_hash: bytes, parent: bytes, token_ids: Seq[int], keys: ExtraKeys) -> None:
        """Cache ``block`` under ``block_hash`` unless the block or the name is taken already."""
        if self.entries[block] is None and block_hash not in self.by_hash:
            self.entries[block] = CachedBlock(block_hash, parent, tuple(token_ids), keys)
            self.by_hash[block_hash] = block

    def drop(self, block: int) -> None:
        entry = self.entries[block]
        if entry is not None:
            del self.by_hash[entry.block_hash]
            self.entries[block] = None

    def is_cached(self, block: int) -> bool:
        return self.entries[block] is not None

    def clear(self) -> int:
        """Forget every entry; returns how many there were."""
        count = len(self.by_hash)
        self.by_hash.clear()
        self.entries = [None] * len(self.entries)
        return count

    def record(self, queried: int, hit: int) -> None:
        self.queries += queried
        self.hits += hit
