"""How ``triton_int4`` runs a shape: its ``Config``, the measured table, tuning and the heuristic.

Config choice (``choose_config``): ``TUNED`` (measured, for the Llama-3-8B
shapes); else, on CUDA with ``FRAMEWORK_INT4_TUNE`` unset or ``1``, the
fastest of ``candidate_configs`` timed on first use of a key (outside
CUDA-graph capture only; during capture an unseen key takes the heuristic, so
a warm-up over the same M buckets before capture keeps graphs on tuned
configs); else ``heuristic_config``.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
import triton

from framework.ops.split_k import capturing, num_sms

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Config:
    """One way to run a shape. ``split_k``: K slices (programs along grid axis 1) asked for."""

    kind: str  # "gemv" (M == 1), "gemm", or "dequant" (dense weight + torch.matmul)
    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def _block_k(group_size: int, wanted: int, k: int = 0) -> int:
    """The K step for ``wanted``: the largest power of two <= wanted that divides group_size (at least 32,
    as group_size % 32 == 0); or, with ``k`` given and group_size a power of two below wanted, the largest
    power-of-two multiple of group_size <= wanted that divides k (several groups per step: the gemv only)."""
    bk = group_size & -group_size
    if k and bk == group_size:
        while bk * 2 <= wanted and k % (bk * 2) == 0:
            bk *= 2
    return min(bk, wanted) if bk <= group_size else bk


def m_bucket(m: int) -> int:
    """The tuning key's M: 1, then powers of two (2, 4, ..., 16, 32, ...)."""
    return 1 if m <= 1 else triton.next_power_of_2(m)


def _split_for(tiles: int, k_blocks: int, programs: int) -> int:
    return max(1, min(k_blocks, triton.cdiv(programs, tiles)))


def heuristic_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> Config:
    """A config chosen without timing (the CPU interpreter, capture of an unseen key, tuning off)."""
    sms = num_sms(device)
    small = device.type != "cuda"  # interpreter: small blocks keep it quick
    if m == 1:  # narrow tiles, several groups a step, ~8 programs per SM (the H200's measured winners)
        bn, bk = (64, 64) if small else (32, 512)
        kb = k // _block_k(group_size, bk, k)
        return Config("gemv", 1, bn, bk, _split_for(triton.cdiv(n, bn), kb, 8 * sms), 4, 3)
    if m >= 256 and not small:  # dequantize + cuBLAS beat every tiled config measured at M >= 256
        return Config("dequant")
    bm = min(64, max(16, triton.next_power_of_2(m))) if m <= 64 else (32 if small else 128)
    bn = 32 if small else 128
    bk = 32 if small else (128 if m <= 64 else 64)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    kb = k // _block_k(group_size, bk)
    split = _split_for(tiles, kb, sms) if m <= 64 else 1
    return Config("gemm", bm, bn, bk, split, 4 if m <= 64 else 8, 4 if m <= 64 else 3)


# (block_n, block_k, warps) of the M=1 candidates: block_k above the group size takes several groups a step
_GEMV_TILES = (
    (32, 512, 4), (64, 256, 4), (64, 512, 4), (128, 128, 4), (128, 256, 4), (128, 512, 8),
    (256, 128, 8), (256, 256, 8), (512, 128, 8),
)  # fmt: skip
_GEMM_SMALL_TILES = (  # (block_n, block_k, warps, stages) for 2 <= M <= 64
    (64, 128, 4, 4), (128, 128, 4, 4), (128, 64, 4, 5), (256, 64, 8, 3), (64, 64, 4, 6), (256, 128, 8, 3),
)
_GEMM_TILES = (  # (block_m, block_n, block_k, warps, stages) for M > 64
    (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 4), (128, 128, 128, 8, 3),
    (128, 128, 64, 4, 4), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 64, 128, 4, 4), (64, 128, 128, 4, 3),
)  # fmt: skip


def candidate_configs(m: int, n: int, k: int, group_size: int, device: torch.device) -> list[Config]:
    """What tuning times for the bucket ``m`` (the heuristic first)."""
    sms = num_sms(device)
    out = [heuristic_config(m, n, k, group_size, device)]
    if m == 1:
        for bn, bk, warps in _GEMV_TILES:
            kb = k // _block_k(group_size, bk, k)
            tiles = triton.cdiv(n, bn)
            out += [Config("gemv", 1, bn, bk, 1, warps, stages) for stages in (1, 3, 5)]
            for waves in (1, 2, 4, 8):
                out.append(Config("gemv", 1, bn, bk, _split_for(tiles, kb, waves * sms), warps, 3))
    elif m <= 64:
        bm = min(64, max(16, triton.next_power_of_2(m)))
        for bn, bk, warps, stages in _GEMM_SMALL_TILES:
            kb = k // _block_k(group_size, bk)
            tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
            for waves in (0, 1, 2, 4):
                split = _split_for(tiles, kb, waves * sms) if waves else 1
                out.append(Config("gemm", bm, bn, bk, split, warps, stages))
    else:
        for bm, bn, bk, warps, stages in _GEMM_TILES:
            if bm <= 2 * m:
                out.append(Config("gemm", bm, bn, bk, 1, warps, stages))
                tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
                if m <= 256 and tiles < sms:
                    out.append(Config("gemm", bm, bn, bk, _split_for(tiles, k // _block_k(group_size, bk), sms), warps, stages))
        out.append(Config("dequant"))
    return list(dict.fromkeys(out))


# Measured configs by (M bucket, N, K, group_size, bits) for the Llama-3-8B shapes (16-bit activations),
# used on CUDA without timing (other keys are tuned on first use). ``benchmarks/check_int4_gemm.py`` prints
# this table from a ``--retune`` run; these are from one H200 (torch 2.11, triton 3.6, bf16), the second
# run, except the int4 M=64 rows marked "run 1": the first run's picks (with the two-kernel reduction,
# as gemm has now) were 2-15 us faster than the second's. Config fields: kind, block_m, block_n, block_k,
# split_k, num_warps, num_stages.
TUNED: dict[tuple[int, int, int, int, int], Config] = {
    (1, 4096, 4096, 128, 4): Config("gemv", 1, 32, 512, 8, 4, 3),
    (16, 4096, 4096, 128, 4): Config("gemm", 16, 64, 128, 9, 4, 4),
    (64, 4096, 4096, 128, 4): Config("gemm", 64, 128, 64, 9, 4, 5),  # run 1
    (256, 4096, 4096, 128, 4): Config("dequant"),
    (1024, 4096, 4096, 128, 4): Config("dequant"),
    (4096, 4096, 4096, 128, 4): Config("dequant"),
    (1, 6144, 4096, 128, 4): Config("gemv", 1, 32, 512, 6, 4, 3),
    (16, 6144, 4096, 128, 4): Config("gemm", 16, 64, 128, 6, 4, 4),
    (64, 6144, 4096, 128, 4): Config("gemm", 64, 256, 64, 11, 8, 3),  # run 1
    (256, 6144, 4096, 128, 4): Config("dequant"),
    (1024, 6144, 4096, 128, 4): Config("dequant"),
    (4096, 6144, 4096, 128, 4): Config("dequant"),
    (1, 28672, 4096, 128, 4): Config("gemv", 1, 64, 256, 3, 4, 3),
    (16, 28672, 4096, 128, 4): Config("gemm", 16, 128, 64, 3, 4, 5),
    (64, 28672, 4096, 128, 4): Config("gemm", 64, 256, 64, 2, 8, 3),  # run 1
    (256, 28672, 4096, 128, 4): Config("dequant"),
    (1024, 28672, 4096, 128, 4): Config("dequant"),
    (4096, 28672, 4096, 128, 4): Config("dequant"),
    (1, 4096, 14336, 128, 4): Config("gemv", 1, 32, 512, 9, 4, 3),
    (16, 4096, 14336, 128, 4): Config("gemm", 16, 128, 64, 17, 4, 5),
    (64, 4096, 14336, 128, 4): Config("gemm", 64, 256, 64, 17, 8, 3),  # run 1
    (256, 4096, 14336, 128, 4): Config("dequant"),
    (1024, 4096, 14336, 128, 4): Config("dequant"),
    (4096, 4096, 14336, 128, 4): Config("dequant"),
    (1, 4096, 4096, 128, 8): Config("gemv", 1, 64, 256, 9, 4, 3),
    (16, 4096, 4096, 128, 8): Config("gemm", 16, 64, 64, 9, 4, 6),
    (64, 4096, 4096, 128, 8): Config("gemm", 64, 128, 64, 9, 4, 5),
    (256, 4096, 4096, 128, 8): Config("dequant"),
    (1024, 4096, 4096, 128, 8): Config("dequant"),
    (4096, 4096, 4096, 128, 8): Config("dequant"),
    (1, 6144, 4096, 128, 8): Config("gemv", 1, 64, 256, 6, 4, 3),
    (16, 6144, 4096, 128, 8): Config("gemm", 16, 64, 64, 6, 4, 6),
    (64, 6144, 4096, 128, 8): Config("gemm", 64, 256, 128, 6, 8, 3),
    (256, 6144, 4096, 128, 8): Config("dequant"),
    (1024, 6144, 4096, 128, 8): Config("dequant"),
    (4096, 6144, 4096, 128, 8): Config("dequant"),
    (1, 28672, 4096, 128, 8): Config("gemv", 1, 64, 256, 1, 4, 1),
    (16, 28672, 4096, 128, 8): Config("gemm", 16, 128, 64, 2, 4, 5),
    (64, 28672, 4096, 128, 8): Config("gemm", 64, 128, 64, 1, 4, 5),
    (256, 28672, 4096, 128, 8): Config("dequant"),
    (1024, 28672, 4096, 128, 8): Config("dequant"),
    (4096, 28672, 4096, 128, 8): Config("dequant"),
    (1, 4096, 14336, 128, 8): Config("gemv", 1, 64, 256, 9, 4, 3),
    (16, 4096, 14336, 128, 8): Config("gemm", 16, 128, 64, 17, 4, 5),
    (64, 4096, 14336, 128, 8): Config("gemm", 64, 128, 64, 17, 4, 5),
    (256, 4096, 14336, 128, 8): Config("dequant"),
    (1024, 4096, 14336, 128, 8): Config("dequant"),
    (4096, 4096, 14336, 128, 8): Config("dequant"),
}

_TUNED: dict[tuple, Config] = {}


def _tuning_enabled() -> bool:
    return os.environ.get("FRAMEWORK_INT4_TUNE", "1") != "0"


def _tune(key, run, x, qweight, scales, zeros, group_size, bits) -> Config:
    from triton.testing import do_bench

    best, best_ms = None, float("inf")
    for cfg in candidate_configs(key[0], key[1], key[2], group_size, x.device):
        try:
            ms = do_bench(
                lambda cfg=cfg: run(x, qweight, scales, zeros, group_size, bits, cfg), warmup=3, rep=15, return_mode="median"
            )
        except Exception as err:  # a config this GPU cannot run (out of shared memory): skip it  # noqa: BLE001
            logger.debug("int4 config %s failed: %r", cfg, err)
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best or heuristic_config(key[0], key[1], key[2], group_size, x.device)


def choose_config(run, x, qweight, scales, zeros, group_size, bits) -> Config:
    """The config for this call: measured table, tuned on first use (``run`` times a candidate), or heuristic."""
    (m, k), n = x.shape, qweight.shape[1]
    key = (m_bucket(m), n, k, group_size, bits, x.dtype, x.device)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    if x.device.type == "cuda" and x.dtype != torch.float32:
        cfg = TUNED.get((key[0], n, k, group_size, bits))
        if cfg is not None:
            return cfg
    if x.device.type != "cuda" or not _tuning_enabled() or capturing(x.device):
        return heuristic_config(m, n, k, group_size, x.device)
    probe = x if m == key[0] else torch.randn((key[0], k), dtype=x.dtype, device=x.device)
    cfg = _TUNED[key] = _tune(key, run, probe, qweight, scales, zeros, group_size, bits)
    return cfg
