"""Weight-only int4 / int8 GEMM in Triton: the weights are dequantized in registers.

Layout (``plugins.quant.int4_common``; ``pack = 32 // bits``)::

    x        [M, K]            fp16 / bf16 (fp32 for tests), unit last stride
    qweight  int32 [K//pack, N] bits slice j (lowest first) of qweight[r, n] is q[k = r*pack + j, n]
    scales   [G, N] x.dtype     G = K // group_size
    zeros    [G, N] x.dtype
    W[n, k] = (q[k, n] - zeros[g, n]) * scales[g, n],  g = k // group_size;   y = x @ W^T

Three paths, picked per (M bucket, N, K, group, bits, dtype):

* ``gemv`` (M == 1): each program streams a [BLOCK_K/pack, BLOCK_N] tile of packed
  words per step over a slice of K (split-K). No integer-to-float conversion
  instruction: a field ``f`` at bit offset ``b`` is or-ed into the float 2**23
  (``0x4B000000``), whose bit pattern is then ``2**23 + f * 2**b`` exactly, so
  one and-or plus one subtraction gives ``q * 2**b`` and the ``2**-b`` goes into
  the x value (exact). Fields above bit 23 are shifted down once per word.
  Products are summed per packed row before the scale:
  ``sum_k x_k (q_k - z) s = s * (sum_k x_k q_k - z * sum_k x_k)``. A step may
  span several groups (BLOCK_K a multiple of a power-of-two group_size that
  divides K); scales and zeros are then read per packed row (L1 hits). (For
  4-bit layers on CUDA, decode steps of up to 8 rows take the tensor-core
  kernel of ``plugins.quant.int4_mma`` instead, on its own copy of the codes.)
* ``gemm``: a [BLOCK_M, BLOCK_N] output tile; each K step dequantizes a
  [BLOCK_K, BLOCK_N] tile to x.dtype in registers and ``tl.dot``s it with the
  x tile. Optional split-K for small M. BLOCK_K divides group_size.
* ``dequant`` (large M): dequantize the whole weight to x.dtype once, then
  cuBLAS (``torch.matmul``); chosen when measured faster (M >= 256 on an H200).

Split-K programs write fp32 partial sums to a workspace ``[S, M, N]``. In
the gemv, the last program to finish an output tile (an arrival counter per
tile, reset by that program) adds them in split order and writes the output,
so one launch does it all (deterministic, no memset); the gemm's wider tiles
are added by a second kernel (``SERIAL_REDUCE`` says which, per kind). A gemv
captured before any eager call (no counters yet) also takes the second
kernel: same order, same bits. K needs no masking.

Config choice: ``plugins.quant.int4_configs``. Everything a launch does is
device work on buffers sized by the shapes only: it can be captured.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from framework.ops.split_k import arrival_counters, sum_splits
from plugins.quant.int4_configs import Config, _block_k, choose_config

MAGIC = tl.constexpr(0x4B000000)  # bit pattern of float32 2**23
MAGIC_F = tl.constexpr(8388608.0)


@triton.jit
def _finish(
    y,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    offs,
    mask,
    tile,
    pid_k,
    num_splits,
    split_stride,
    REDUCE: tl.constexpr,
):
    """Store a program's fp32 result ``y`` at ``offs`` (same offsets in out and in one split of ws).

    REDUCE 0: no split, round into out. 1: partial sums into ws split ``pid_k``
    (``framework.ops.split_k.sum_splits`` adds them). 2: the same, then the program that
    finds itself last of the ``num_splits`` on its output tile (a counter per
    tile, bumped after a CTA barrier with acquire-release semantics) adds the
    partials in split order (deterministic) into out and resets the counter
    to zero for the next launch.
    """
    if REDUCE == 0:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + pid_k.to(tl.int64) * split_stride + offs, y, mask=mask)
        if REDUCE == 2:
            tl.debug_barrier()  # every thread's partial stored before the counter moves
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if arrived == num_splits - 1:
                tot = tl.zeros_like(y)
                for s in range(num_splits):
                    tot += tl.load(
                        ws_ptr + s * split_stride + offs,
                        mask=mask,
                        other=0.0,
                        cache_modifier=".cg",
                    )
                tl.store(out_ptr + offs, tot.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + tile, 0)


# fmt: off
@triton.jit
def _gemv_kernel(
    x_ptr,  # [K] one row of activations
    qw_ptr,  # int32 [K // PACK, N]
    s_ptr, z_ptr,  # [G, N] scales, zeros
    out_ptr,  # [N] in x dtype
    ws_ptr,  # fp32 [S, N] partial sums (REDUCE > 0)
    cnt_ptr,  # int32 [>= cdiv(N, BLOCK_N)] zeroed arrival counters (REDUCE == 2)
    N, K,
    blocks_per_split, num_splits,  # K steps per program along axis 1; programs along axis 1
    GROUP: tl.constexpr, BITS: tl.constexpr, PACK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KP: tl.constexpr, REDUCE: tl.constexpr,
):
# fmt: on
    MASK = (1 << BITS) - 1
    HI = (23 - BITS) // BITS + 1  # first slice whose field would reach past bit 23
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_KP)
    kb0 = pid_k * blocks_per_split
    kb1 = tl.minimum(kb0 + blocks_per_split, K // BLOCK_K)
    acc = tl.zeros([BLOCK_KP, BLOCK_N], dtype=tl.float32)
    for kb in range(kb0, kb1):
        rows = kb * BLOCK_KP + offs_r
        qw = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
        high = qw >> (HI * BITS)
        part = tl.zeros([BLOCK_KP, BLOCK_N], dtype=tl.float32)
        xsum = tl.zeros([BLOCK_KP], dtype=tl.float32)
        for j in tl.static_range(PACK):
            xj = tl.load(x_ptr + rows * PACK + j).to(tl.float32)
            xsum += xj
            if j < HI:
                field = qw & (MASK << (j * BITS))
                xj = xj * (1.0 / (1 << (j * BITS)))
            else:
                field = high & (MASK << ((j - HI) * BITS))
                xj = xj * (1.0 / (1 << ((j - HI) * BITS)))
            qf = (field | MAGIC).to(tl.float32, bitcast=True) - MAGIC_F  # q * 2**b, exact
            part += xj[:, None] * qf
        if BLOCK_K <= GROUP:  # one group per step: one row of scales and zeros
            g = (kb * BLOCK_K) // GROUP
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc += s[None, :] * (part - z[None, :] * xsum[:, None])
        else:  # BLOCK_K // GROUP groups per step: scales and zeros per packed row (L1 hits)
            g2 = ((rows * PACK) // GROUP)[:, None] * N + offs_n[None, :]
            s2 = tl.load(s_ptr + g2, mask=n_mask[None, :], other=0.0).to(tl.float32)
            z2 = tl.load(z_ptr + g2, mask=n_mask[None, :], other=0.0).to(tl.float32)
            acc += s2 * (part - z2 * xsum[:, None])
    y = tl.sum(acc, axis=0)
    _finish(y, out_ptr, ws_ptr, cnt_ptr, offs_n, n_mask, pid_n, pid_k, num_splits, N, REDUCE)


@triton.jit
def _dequant_tile(qw, s, z, BITS: tl.constexpr, PACK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """int32 [BLOCK_K // PACK, BLOCK_N] words -> fp32 [BLOCK_K, BLOCK_N] weights (row r*PACK + j = slice j)."""
    shifts = tl.arange(0, PACK) * BITS
    q = (qw[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [BLOCK_KP, PACK, BLOCK_N]
    q = tl.reshape(q, (BLOCK_K, BLOCK_N))
    qf = (q | MAGIC).to(tl.float32, bitcast=True) - MAGIC_F
    return (qf - z[None, :]) * s[None, :]


# fmt: off
@triton.jit
def _gemm_kernel(
    x_ptr,  # [M, K] activations, row stride stride_xm
    qw_ptr,  # int32 [K // PACK, N]
    s_ptr, z_ptr,  # [G, N]
    out_ptr,  # [M, N] in x dtype
    ws_ptr,  # fp32 [S, M, N] partial sums (REDUCE > 0)
    cnt_ptr,  # int32 [>= output tiles] zeroed arrival counters (REDUCE == 2)
    M, N, K, stride_xm,
    blocks_per_split, num_splits,
    GROUP: tl.constexpr, BITS: tl.constexpr, PACK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KP: tl.constexpr,
    GROUP_M: tl.constexpr,  # output tiles ordered in bands of GROUP_M row tiles (L2 reuse of weights)
    REDUCE: tl.constexpr, IEEE: tl.constexpr,  # REDUCE: as in _finish; IEEE: fp32 inputs, full-precision dot
):
# fmt: on
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * num_n
    first_m = (pid // band) * GROUP_M
    rows_in_band = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % rows_in_band
    pid_n = (pid % band) // rows_in_band
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M * N may pass 2**31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_KP)
    kb0 = pid_k * blocks_per_split
    kb1 = tl.minimum(kb0 + blocks_per_split, K // BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(kb0, kb1):
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + (kb * BLOCK_K + offs_k)[None, :], mask=m_mask[:, None], other=0.0)
        qw = tl.load(qw_ptr + (kb * BLOCK_KP + offs_r)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
        g = (kb * BLOCK_K) // GROUP
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        w = _dequant_tile(qw, s, z, BITS, PACK, BLOCK_K, BLOCK_N).to(x_ptr.dtype.element_ty)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    out_mask = m_mask[:, None] & n_mask[None, :]
    offs = offs_m[:, None] * N + offs_n[None, :]
    _finish(acc, out_ptr, ws_ptr, cnt_ptr, offs, out_mask, pid, pid_k, num_splits, M * N, REDUCE)


@triton.jit
def _dequant_kernel(
    qw_ptr, s_ptr, z_ptr,
    w_ptr,  # [K, N] dense weights in x dtype (W^T)
    N,
    GROUP: tl.constexpr, BITS: tl.constexpr, PACK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    kb = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    qw = tl.load(qw_ptr + (kb * BLOCK_KP + tl.arange(0, BLOCK_KP))[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
    g = (kb * BLOCK_K) // GROUP
    s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    w = _dequant_tile(qw, s, z, BITS, PACK, BLOCK_K, BLOCK_N)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=n_mask[None, :])


# -- launchers -------------------------------------------------------------------


def _splits(k_blocks: int, split_k: int) -> tuple[int, int]:
    """(K steps per program, programs along K) for about ``split_k`` slices."""
    per = triton.cdiv(k_blocks, max(1, min(split_k, k_blocks)))
    return per, triton.cdiv(k_blocks, per)


# The in-kernel split-K reduction uses the arrival counters of framework.ops.split_k (one zeroed int32 per
# output tile; a CUDA-graph capture that finds none reduces with the second kernel instead). Per kind: add split-K partial sums in the kernel (True) or with split_k.sum_splits. Measured on an H200:
# in-kernel saves 1.5-4 us a call at M=1; for gemm tiles the last program's serial sum of S tiles costs
# about what the second launch does (M=16) or more (M=64 with many splits), so gemm keeps two kernels.
SERIAL_REDUCE = {"gemv": True, "gemm": False}


def _reduce_mode(kind: str, splits: int, tiles: int, device: torch.device) -> tuple[int, torch.Tensor | None]:
    if splits == 1:
        return 0, None
    cnt = arrival_counters(device, tiles) if SERIAL_REDUCE[kind] else None
    return (2, cnt) if cnt is not None else (1, None)


def _run_gemv(x, qweight, scales, zeros, group_size, bits, cfg: Config) -> torch.Tensor:
    K, N = x.shape[1], qweight.shape[1]
    bk = _block_k(group_size, cfg.block_k, K)
    per, splits = _splits(K // bk, cfg.split_k)
    tiles = triton.cdiv(N, cfg.block_n)
    out = torch.empty((1, N), dtype=x.dtype, device=x.device)
    reduce, cnt = _reduce_mode("gemv", splits, tiles, x.device)
    ws = torch.empty((splits, N), dtype=torch.float32, device=x.device) if splits > 1 else out
    _gemv_kernel[(tiles, splits)](
        x, qweight, scales, zeros, out, ws, cnt if cnt is not None else out, N, K, per, splits,
        GROUP=group_size, BITS=bits, PACK=32 // bits, BLOCK_N=cfg.block_n, BLOCK_K=bk, BLOCK_KP=bk * bits // 32,
        REDUCE=reduce, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if reduce == 1:
        sum_splits(ws, out)
    return out


def _run_gemm(x, qweight, scales, zeros, group_size, bits, cfg: Config) -> torch.Tensor:
    (M, K), N = x.shape, qweight.shape[1]
    bk = _block_k(group_size, cfg.block_k)
    per, splits = _splits(K // bk, cfg.split_k)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    reduce, cnt = _reduce_mode("gemm", splits, tiles, x.device)
    ws = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else out
    _gemm_kernel[(tiles, splits)](
        x, qweight, scales, zeros, out, ws, cnt if cnt is not None else out, M, N, K, x.stride(0), per, splits,
        GROUP=group_size, BITS=bits, PACK=32 // bits,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk, BLOCK_KP=bk * bits // 32, GROUP_M=8,
        REDUCE=reduce, IEEE=x.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if reduce == 1:
        sum_splits(ws, out)
    return out


def dequantize_triton(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, bits: int = 4
) -> torch.Tensor:
    """The layout above -> dense ``W^T`` as ``[K, N]`` in ``scales.dtype`` (so ``y = x @ W^T``)."""
    N = qweight.shape[1]
    K = scales.shape[0] * group_size
    bk = _block_k(group_size, 64)
    w = torch.empty((K, N), dtype=scales.dtype, device=qweight.device)
    block_n = 128
    _dequant_kernel[(K // bk, triton.cdiv(N, block_n))](
        qweight, scales, zeros, w, N,
        GROUP=group_size, BITS=bits, PACK=32 // bits, BLOCK_K=bk, BLOCK_KP=bk * bits // 32, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return w


def _run(x, qweight, scales, zeros, group_size, bits, cfg: Config) -> torch.Tensor:
    if cfg.kind == "gemv":
        return _run_gemv(x, qweight, scales, zeros, group_size, bits, cfg)
    if cfg.kind == "gemm":
        return _run_gemm(x, qweight, scales, zeros, group_size, bits, cfg)
    return torch.matmul(x, dequantize_triton(qweight, scales, zeros, group_size, bits))


# -- the op ----------------------------------------------------------------------------


def _check(x, qweight, scales, zeros, group_size, bits) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits={bits} is not supported; bits must be 4 or 8")
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [M, K] with a unit last stride; got shape {tuple(x.shape)}, strides {x.stride()}")
    K = x.shape[1]
    pack = 32 // bits
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 32 or K % group_size:
        raise ValueError(f"group_size={group_size} must be a positive multiple of 32 that divides K={K}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[0] * pack != K:
        raise ValueError(f"qweight must be int32 [K // {pack}, N] = [{K // pack}, N]; got {qweight.dtype} {tuple(qweight.shape)}")
    want = (K // group_size, qweight.shape[1])
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != want or t.dtype != x.dtype:
            raise ValueError(f"{name} must be {x.dtype} {list(want)}; got {t.dtype} {list(t.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x.dtype={x.dtype} is not supported; x must be float16, bfloat16 or float32")


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bits: int = 4,
    config: Config | None = None,
) -> torch.Tensor:
    """``x @ W^T`` for the packed layout above: ``[M, N]`` in ``x.dtype``.

    Args:
        x: ``[M, K]`` activations, unit last stride.
        qweight, scales, zeros, group_size, bits: the layer's layout (module docstring).
        config: force a ``Config`` (tests, benchmarks); None picks one.
    Returns:
        A new ``[M, N]`` tensor. On a CPU tensor without ``TRITON_INTERPRET=1``
        it dequantizes in torch and multiplies (the reference).
    """
    _check(x, qweight, scales, zeros, group_size, bits)
    M, N = x.shape[0], qweight.shape[1]
    if M == 0:
        return torch.empty((0, N), dtype=x.dtype, device=x.device)
    if not _use_triton(x):
        return torch.matmul(x, dequantize_torch(qweight, scales, zeros, group_size, bits))
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    cfg = config or choose_config(_run, x, qweight, scales, zeros, group_size, bits)
    if cfg.kind == "gemv" and M != 1:
        raise ValueError(f"the gemv config runs M=1 only; got M={M}")
    return _run(x, qweight, scales, zeros, group_size, bits, cfg)


def dequantize_torch(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, bits: int = 4
) -> torch.Tensor:
    """Pure-torch reference of ``dequantize_triton``: ``W^T`` as ``[K, N]`` in ``scales.dtype``."""
    pack = 32 // bits
    shifts = torch.arange(0, 32, bits, device=qweight.device, dtype=torch.int32)
    q = ((qweight.unsqueeze(1) >> shifts.view(1, pack, 1)) & ((1 << bits) - 1)).reshape(-1, qweight.shape[1])
    g = torch.arange(q.shape[0], device=q.device) // group_size
    return ((q.float() - zeros.float()[g]) * scales.float()[g]).to(scales.dtype)
