"""The program shapes of the int4 tensor-core kernel (``plugins.quant.int4_mma.mma_matmul``'s keyword
arguments) by layer shape and row band, as measured, and their override from the environment for sweeps."""

from __future__ import annotations

import functools
import json
import os

# mma_matmul's keyword arguments by (N, K) for steps of up to 8 rows (one column block of B), and by (N, K, 16)
# for 9..16 rows (``band``: 32 and 64 for more), for the Llama-3-8B shapes on an H200 (docs/benchmarks.md):
# the fastest of check_int4_mma.py --interleave (2026-11-21 18:53Z, M = 1 and 16; 19:05Z with --m 32: the
# earlier table's programs and the best of the --ring sweep, each with slices interleaved or not). Without "split",
# the launcher's split-K (enough programs for about four a multiprocessor); with one split the program sums its
# slices itself and writes its outputs (no workspace or arrival counter). Warps may take more than one tile row
# (rows * kslices / num_warps). ``ring`` (two register sets of loads, two steps in flight) and ``interleave``
# (a step reads one contiguous run of its row block) won at 7 of the 8 shapes of up to 16 rows, e.g. gate_up at
# M = 1 22.94 against 24.28 us, down at M = 16 19.35 against 20.77 us; the ring at 3 of the 4 shapes of 17-32
# rows (down 26.92 against 30.62 us; batch-32 decode 4.194 against 4.382 ms). ``depth`` and ``evict`` (weight words
# two steps ahead in registers; an evict-first weight stream) won at no shape (``--extended``), ``barrier``
# (a CTA barrier keeping the next step's loads ahead of the mma) at none without the ring; neither did L2
# prefetches some steps ahead, nor the weight stream through the compiler's software pipeline (since removed).
# ``early`` (both register sets' loads before the PDL wait) made batch-1 decode 2.224-2.233 against 2.256-2.258 ms
# and batch 8 2.440-2.443 against 2.465-2.468 ms (2026-11-21 21:10Z and 21:12Z, same calls).
_ONE = {"split": 1}
_RING = {"ring": True, **_ONE}
_EARLY = {"early": True, **_RING}  # up to 8 rows (PDL steps): both register sets loaded before the PDL wait
TUNED: dict[tuple[int, ...], dict] = {
    (6144, 4096): {"rows": 1, "kslices": 8, "unroll": 2, "num_warps": 4, "xjit": True, **_EARLY},
    (4096, 4096): {"rows": 1, "kslices": 8, "unroll": 2, "num_warps": 4, **_EARLY},
    (28672, 4096): {"rows": 2, "kslices": 2, "unroll": 2, "num_warps": 4, "xjit": True, "interleave": True, **_EARLY},
    (4096, 14336): {"rows": 1, "kslices": 8, "unroll": 2, "num_warps": 4, "interleave": True, **_EARLY},
    (6144, 4096, 16): {"rows": 1, "kslices": 8, "unroll": 1, "num_warps": 4, "interleave": True, **_RING},
    (4096, 4096, 16): {"rows": 1, "kslices": 8, "unroll": 2, "num_warps": 4, "interleave": True, **_RING},
    (28672, 4096, 16): {"rows": 1, "kslices": 2, "unroll": 1, "num_warps": 2, "interleave": True},
    (4096, 14336, 16): {"rows": 1, "kslices": 8, "unroll": 2, "num_warps": 4, "interleave": True, **_RING},
    (6144, 4096, 32): {"rows": 1, "kslices": 4, "unroll": 1, "num_warps": 4, **_RING},
    (4096, 4096, 32): {"rows": 1, "kslices": 8, "unroll": 2, "num_warps": 4, "xjit": True, **_RING},
    (28672, 4096, 32): {"rows": 4, "kslices": 1, "unroll": 2, "num_warps": 4, **_ONE},
    (4096, 14336, 32): {"rows": 1, "kslices": 8, "unroll": 2, "num_warps": 4, "xjit": True, **_RING},
}
DEFAULT = {"rows": 4, "unroll": 2, "num_warps": 4}  # other shapes: split-K across programs, the launcher's split


def tuned() -> dict:
    """TUNED, overridden by ``FRAMEWORK_INT4_MMA_TUNED`` (JSON ``{"NxK": {"rows": 4, ...}, "NxKx16": {...}}``,
    ``x32`` and ``x64`` for those bands: for sweeps; the keys it gives replace TUNED's, the others stay)."""
    return _parse(os.environ.get("FRAMEWORK_INT4_MMA_TUNED", ""))


# mma_matmul's program keywords (what a table entry may give)
KEYWORDS = frozenset(
    ("rows", "unroll", "split", "num_warps", "depth", "evict", "pdl", "kslices", "xjit", "maxnreg", "barrier", "ring",
     "interleave", "early")
)


@functools.lru_cache(maxsize=4)
def _parse(env: str) -> dict:
    if not env:
        return TUNED
    where = "FRAMEWORK_INT4_MMA_TUNED"
    try:
        entries = json.loads(env)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not JSON ({err}): {env[:200]!r}") from None
    if not isinstance(entries, dict):
        raise ValueError(f"{where} must be a JSON object of 'NxK' (or 'NxKx16', 'x32', 'x64') keys")
    table = dict(TUNED)
    for key, cfg in entries.items():
        parts = key.split("x")
        bands = ([], ["16"], ["32"], ["64"])
        if not 2 <= len(parts) <= 3 or not all(p.isdigit() for p in parts) or parts[2:] not in bands:
            raise ValueError(f"{where}: key {key!r} is not 'NxK', 'NxKx16', 'NxKx32' or 'NxKx64'")
        if not isinstance(cfg, dict) or set(cfg) - KEYWORDS:
            raise ValueError(f"{where}[{key!r}]: a program takes only {sorted(KEYWORDS)}; got {cfg!r}")
        table[tuple(int(p) for p in parts)] = dict(cfg)
    return table


def band(m: int) -> tuple[int, ...]:
    """The TUNED key's row band: () for 1..8 rows, (16,), (32,) or (64,) for up to that many."""
    return () if m <= 8 else (16,) if m <= 16 else (32,) if m <= 32 else (64,)


# Program shapes every correctness check of the kernel runs (the GPU tests, check_int4_mma.py), besides the
# table's: DEFAULT, the launcher's split-K (split 0), a given split, one split (no workspace), two steps in
# flight, an evict-first stream, slices of K with and without a split, PDL (sm_90+ only), warps that take
# more than one tile row, activations loaded in their own step (xjit), a register cap, a barrier keeping
# the next step's loads ahead of this step's mma, and the ring of two register sets (with an odd count of
# steps a slice on a layer of 5 superblocks; with xjit, barrier, a workspace, PDL; both sets loaded before the
# PDL wait), and slices interleaved.
CHECKED = [
    DEFAULT,
    {"rows": 4, "unroll": 1, "split": 1},
    {"rows": 8, "unroll": 2, "split": 0, "num_warps": 8},
    {"rows": 4, "unroll": 2, "split": 3},
    {"rows": 4, "unroll": 2, "split": 0, "depth": 2},
    {"rows": 1, "unroll": 1, "split": 2, "num_warps": 1, "depth": 2, "evict": "evict_first"},
    {"rows": 1, "unroll": 2, "split": 1, "num_warps": 4, "kslices": 4},
    {"rows": 2, "unroll": 1, "split": 3, "num_warps": 4, "kslices": 2},
    {"rows": 1, "unroll": 2, "split": 0, "num_warps": 8, "kslices": 8},
    {"rows": 4, "unroll": 2, "split": 3, "pdl": True},
    {"rows": 4, "kslices": 2, "unroll": 2, "split": 1, "num_warps": 4},  # two tile rows a warp
    {"rows": 2, "kslices": 2, "unroll": 1, "split": 3, "num_warps": 1},
    {"rows": 1, "kslices": 8, "unroll": 2, "split": 1, "num_warps": 4, "xjit": True},
    {"rows": 4, "unroll": 2, "split": 3, "xjit": True, "maxnreg": 96},
    {"rows": 1, "kslices": 8, "unroll": 1, "split": 1, "num_warps": 4, "barrier": True},
    {"rows": 2, "kslices": 2, "unroll": 2, "split": 0, "num_warps": 4, "barrier": True, "depth": 2},
    {"rows": 1, "kslices": 2, "unroll": 1, "split": 1, "num_warps": 2, "ring": True},
    {"rows": 4, "unroll": 1, "split": 3, "ring": True, "xjit": True},
    {"rows": 1, "kslices": 8, "unroll": 1, "split": 1, "num_warps": 4, "ring": True, "barrier": True},
    {"rows": 2, "kslices": 2, "unroll": 2, "split": 1, "num_warps": 4, "ring": True, "pdl": True},
    {"rows": 1, "kslices": 4, "unroll": 1, "split": 1, "num_warps": 4, "interleave": True},
    {"rows": 2, "kslices": 2, "unroll": 1, "split": 2, "num_warps": 2, "interleave": True, "ring": True},
    {"rows": 1, "kslices": 2, "unroll": 2, "split": 1, "num_warps": 2, "interleave": True, "ring": True, "xjit": True},
    {"rows": 1, "kslices": 2, "unroll": 1, "split": 1, "num_warps": 2, "ring": True, "early": True},
    {"rows": 2, "kslices": 2, "unroll": 2, "split": 3, "num_warps": 4, "ring": True, "early": True, "pdl": True,
     "xjit": True, "interleave": True},
]
