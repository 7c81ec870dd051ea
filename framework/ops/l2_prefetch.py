"""Asynchronous prefetches of read-only weights into the GPU's L2 cache (sm_90+: ``cp.async.bulk.prefetch.L2``).

A decode step of few rows reads every weight once and does little else: the small kernels between the
linears (norms, rotary, attention, activation) leave the memory bus idle, and each linear's first and last
microseconds run below the bus's rate. A prefetch issued ahead of a linear lets DRAM stream its weights
into L2 meanwhile; the linear then reads them at L2 speed. ``plan`` cuts byte ranges of tensors into chunks
(``CHUNK`` bytes, 16-byte aligned) and ``prefetch`` launches one program per ``BLOCK`` chunks, one thread
a chunk: each thread issues a single bulk prefetch and the kernel ends at once (the copies go on in the
memory system; they are hints, and change no result).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

CHUNK = 32 * 1024  # bytes a prefetch instruction
BLOCK = 128  # chunks (threads) a program

_ASM = tl.constexpr("{\n.reg .pred p;\nsetp.ne.u32 p, $2, 0;\n@p cp.async.bulk.prefetch.L2.global [$1], $2;\nmov.u32 $0, 0;\n}")


@triton.jit
def _prefetch_kernel(plan_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = i < n
    addr = tl.load(plan_ptr + 2 * i, mask=live, other=0)
    size = tl.load(plan_ptr + 2 * i + 1, mask=live, other=0).to(tl.int32)
    tl.inline_asm_elementwise(_ASM, "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)


@functools.cache
def supported(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def plan(ranges: list[tuple[torch.Tensor, int, int]], device: torch.device) -> torch.Tensor:
    """int64 ``[n, 2]`` (address, bytes) chunks covering each ``(tensor, start, stop)`` byte range, the start
    rounded down and the stop up to 16 bytes (inside the tensor's allocation)."""
    rows = []
    for t, start, stop in ranges:
        base = t.data_ptr()
        end = base + t.numel() * t.element_size()
        lo = (base + max(0, start)) & ~15
        hi = min(end, (base + stop + 15) & ~15)
        for a in range(lo, hi, CHUNK):
            rows.append((a, min(CHUNK, hi - a) & ~15))
    rows = [r for r in rows if r[1] > 0]
    return torch.tensor(rows or [(0, 0)], dtype=torch.int64).to(device)


def prefetch(chunks: torch.Tensor) -> None:
    """Issue the L2 prefetches of ``plan``'s chunks (sm_90+; nothing elsewhere)."""
    if not chunks.is_cuda or not supported(chunks.device.index or 0):
        return
    n = chunks.shape[0]
    _prefetch_kernel[(triton.cdiv(n, BLOCK),)](chunks, n, BLOCK=BLOCK, num_warps=BLOCK // 32)
