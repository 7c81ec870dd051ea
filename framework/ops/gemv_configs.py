"""How ``triton_gemv`` runs a shape: its ``Config``, the measured tables and the heuristic.

Configs come from a fixed table (``TUNED``, ``SILU_TUNED``, ``NORM_TUNED``;
``benchmarks/check_gemv.py`` prints entries to paste) or a heuristic; they
are never timed at run time.
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from framework.ops.split_k import num_sms


@dataclasses.dataclass(frozen=True)
class Config:
    """How one (M, N, K) runs. ``split``: K slices (programs along grid axis 1) asked for."""

    dot: bool
    block_n: int
    block_k: int
    split: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __str__(self) -> str:
        kind = "dot" if self.dot else "fma"
        return f"{kind}:n{self.block_n}:k{self.block_k}:s{self.split}:w{self.num_warps}:st{self.num_stages}"


# Hand-picked configs by (M, N, K) for the shapes that matter (benchmarks/check_gemv.py prints a
# table to paste here). None: F.linear measured faster there, the layers keep it. Keys absent:
# heuristic_config.
# Measured on one H200 (bf16, 2026-11-21, `benchmarks/check_gemv.py`; docs/benchmarks.md).
TUNED: dict[tuple[int, int, int], Config | None] = {
    (1, 4096, 4096): Config(False, 16, 512, 1, 8, 3),
    (1, 4096, 14336): Config(False, 16, 512, 1, 8, 3),
    (1, 6144, 4096): Config(False, 8, 512, 1, 4, 3),
    (1, 28672, 4096): Config(False, 16, 256, 1, 4, 3),
    (1, 128256, 4096): Config(True, 64, 128, 1, 4, 4),
    (2, 4096, 4096): Config(True, 32, 256, 1, 4, 4),
    (2, 4096, 14336): None,  # F.linear is faster
    (2, 6144, 4096): Config(True, 64, 256, 1, 4, 3),
    (2, 28672, 4096): None,
    (2, 128256, 4096): Config(True, 64, 128, 1, 4, 4),
    (4, 4096, 4096): Config(True, 32, 256, 1, 4, 4),
    (4, 4096, 14336): None,
    (4, 6144, 4096): Config(True, 64, 256, 1, 4, 3),
    (4, 28672, 4096): None,
    (4, 128256, 4096): Config(True, 128, 128, 1, 8, 3),
    (8, 4096, 4096): Config(True, 32, 256, 1, 4, 4),
    (8, 4096, 14336): None,
    (8, 6144, 4096): Config(True, 64, 256, 1, 4, 3),
    (8, 28672, 4096): None,
    (8, 128256, 4096): Config(True, 128, 128, 1, 8, 3),
}
# The same for ``gemv_silu_mul`` (keyed by the down projection's (M, N, I)): fused wins at M = 1
# (32.7 us against 37.7 for SiLU-mul + GEMV) and loses above (44.7 against 35.3 at M = 2).
SILU_TUNED: dict[tuple[int, int, int], Config | None] = {
    (1, 4096, 14336): Config(False, 16, 256, 3, 4, 3),
    (2, 4096, 14336): None,
    (4, 4096, 14336): None,
    (8, 4096, 14336): None,
}
# The same for ``gemv_rmsnorm`` (keyed by the linear's (M, N, K)); keys absent: the plain GEMV's config
# (``TUNED``, else the heuristic); None: RMSNorm + GEMV beat the fused kernel there. Measured by
# ``benchmarks/check_gemv.py --norm-only`` on an H200, 2026-11-21: input_layernorm + qkv 16.0 us fused against
# 17.3 apart, post_attention_layernorm + gate_up 57.0 against 57.8 (every output equal to the unfused one).
NORM_TUNED: dict[tuple[int, int, int], Config | None] = {
    (1, 6144, 4096): Config(False, 16, 512, 1, 8, 3),
    (1, 28672, 4096): Config(False, 16, 256, 1, 4, 3),
}


def auto_split(n: int, k: int, block_n: int, block_k: int, sms: int, waves: float = 2.0) -> int:
    """K slices so that ``cdiv(n, block_n) * split`` reaches about ``waves * sms`` programs (1 when it does already)."""
    tiles = triton.cdiv(n, block_n)
    want = int(waves * sms)
    if tiles >= want:
        return 1
    return max(1, min(triton.cdiv(want, tiles), triton.cdiv(k, block_k)))


def heuristic_config(m: int, n: int, k: int, device: torch.device) -> Config:
    """A config chosen without timing: fma for M <= 2, tensor cores above (small blocks on the CPU interpreter)."""
    if device.type != "cuda":
        return Config(dot=m > 2, block_n=16, block_k=64)
    sms = num_sms(device)
    if m <= 2:
        bn, bk = (8, 512) if m == 1 else (8, 256)
        return Config(False, bn, bk, auto_split(n, k, bn, bk, sms), 4, 3)
    bn, bk = 64, 128
    return Config(True, bn, bk, auto_split(n, k, bn, bk, sms), 4, 4)


def choose_config(m: int, n: int, k: int, device: torch.device) -> Config:
    return TUNED.get((m, n, k)) or heuristic_config(m, n, k, device)


def table_entry(key: tuple[int, int, int], silu: bool, norm: bool) -> Config | None | bool:
    """The table entry for an op at ``key`` (True when none)."""
    if silu:
        return SILU_TUNED.get(key, True)
    if norm and key in NORM_TUNED:
        return NORM_TUNED[key]
    return TUNED.get(key, True)
