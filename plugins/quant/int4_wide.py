"""Weight-only int4 / int8 GEMM for steps of many rows (``Config`` kind ``"wide"``), on ``triton_int4``'s layout.

The output is computed transposed, ``out^T [N, M] = W [N, K] @ x^T [K, M]``, so that the dequantized
weights are the first operand of ``tl.dot`` (the one the tensor cores may read from registers; the
activations, the second, go through shared memory) and ``M`` is the narrow side of the tile. No unpacked
``[BLOCK_K, BLOCK_N]`` tile is ever built: a packed word holds ``pack`` codes of consecutive ``k``, so each
K step takes ``pack`` products of ``[BLOCK_N, BLOCK_KP]`` weights, slice ``j`` of every word (``k = pack r +
j``), with the matching ``[BLOCK_KP, BLOCK_M]`` activations (a gather of every ``pack``-th input, from L1/L2).
Dequantization is ``triton_int4``'s: ``(q - z) * s`` in fp32, rounded once to x's dtype. A K step lies in
one group (``BLOCK_KP * pack`` divides ``group_size``), so its scales and zeros are one row.

Split-K programs (``split_k > 1``) write fp32 partial sums to a workspace ``[S, M, N]`` that a second kernel
adds in split order (``triton_int4._sum_splits``): the same bits every call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# the K depth of one product (tl.dot's least): BLOCK_KP words, so a step covers BLOCK_KP * pack inputs
BLOCK_KP = 16


def applicable(group_size: int, bits: int, k: int) -> bool:
    """Whether a layer's group size lets a K step lie in one group (a group size of K counts)."""
    step = BLOCK_KP * (32 // bits)
    return k % step == 0 and group_size % step == 0


@triton.jit
def _wide_kernel(
    x_ptr,  # [M, K] activations, row stride sxm
    qw_ptr,  # int32 [K // PACK, N]
    s_ptr, z_ptr,  # [G, N] in x's dtype
    out_ptr,  # [M, N] in x's dtype, or fp32 [S, M, N] partial sums (SPLIT)
    M, N, K, sxm, steps_per_split,
    GROUP: tl.constexpr, BITS: tl.constexpr, PACK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KP: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_n = pid // num_m  # the programs of one weight tile are adjacent: it is read from DRAM about once
    pid_m = pid % num_m
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n_mask = offs_n < N
    m_mask = offs_m < M
    offs_r = tl.arange(0, BLOCK_KP)
    BLOCK_K: tl.constexpr = BLOCK_KP * PACK
    kb0 = pid_k * steps_per_split
    kb1 = tl.minimum(kb0 + steps_per_split, K // BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for kb in range(kb0, kb1):
        rows = kb * BLOCK_KP + offs_r  # packed rows of this step
        qw = tl.load(qw_ptr + rows[None, :] * N + offs_n[:, None], mask=n_mask[:, None], other=0)  # [BN, BKP]
        g = (kb * BLOCK_K) // GROUP
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        for j in tl.static_range(PACK):
            q = ((qw >> (BITS * j)) & ((1 << BITS) - 1)).to(tl.float32)
            w = ((q - z) * s).to(x_ptr.dtype.element_ty)
            xt = tl.load(x_ptr + offs_m[None, :] * sxm + (rows * PACK + j)[:, None], mask=m_mask[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(w, xt, acc, input_precision="ieee")
            else:
                acc = tl.dot(w, xt, acc)
    mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT:
        tl.store(out_ptr + (pid_k * M + offs_m[None, :]) * N + offs_n[:, None], acc, mask=mask)
    else:
        tl.store(out_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(out_ptr.dtype.element_ty), mask=mask)


def run_wide(x, qweight, scales, zeros, group_size: int, bits: int, cfg) -> torch.Tensor:
    """``x @ W^T`` ``[M, N]`` with ``cfg``'s block_m, block_n, split_k, num_warps, num_stages (its block_k is
    BLOCK_KP * pack, whatever the config says)."""
    from plugins.quant.triton_int4 import _splits, _sum_splits

    (M, K), N = x.shape, qweight.shape[1]
    pack = 32 // bits
    if not applicable(group_size, bits, K):
        raise ValueError(f"the wide kernel needs group_size and K multiples of {BLOCK_KP * pack}; "
                         f"got group_size={group_size}, K={K}")  # fmt: skip
    per, splits = _splits(K // (BLOCK_KP * pack), cfg.split_k)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    ws = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else out
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), splits)
    _wide_kernel[grid](
        x, qweight, scales, zeros, ws, M, N, K, x.stride(0), per,
        GROUP=group_size, BITS=bits, PACK=pack, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_KP=BLOCK_KP,
        SPLIT=splits > 1, IEEE=x.dtype == torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if splits > 1:
        _sum_splits(ws, out)
    return out
