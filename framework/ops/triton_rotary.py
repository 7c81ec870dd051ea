"""Fused rotary embedding (NeoX / Hugging Face "rotate half" layout) in Triton.

Rotates ``q [T, Hq*D]`` and ``k [T, Hk*D]`` in one launch, one program per
token, reading its ``cos | sin`` row of the precomputed table by position.
Within each head the first ``rotary_dim`` features rotate as pairs
``(x[i], x[i + rotary_dim/2])``; the rest are copied::

    out[:half]  = x1 * cos - x2 * sin
    out[half:]  = x2 * cos + x1 * sin

Rounded as ``framework.layers.RotaryEmbedding``'s torch code: the table is
cast to the activation dtype, and each product and each sum is cast to the
dtype (torch computes every op in float32 and rounds its result). The inputs
may be strided views (the q/k slices of a fused qkv output); the outputs are
new contiguous tensors, so the inputs are left as they were.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rotate_head_halves(
    src,  # this token's first element (row of [T, H*D]); heads HEAD_DIM apart
    cos,  # [1, BLOCK_HALF] float32, already rounded to the dtype
    sin,
    num_heads,
    dtype: tl.constexpr,  # the activation dtype: every product and sum rounds to it
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,  # rotary_dim // 2
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """The rotated halves ``[BLOCK_H, BLOCK_HALF]`` of every head (in ``dtype``), their offsets and mask.

    Shared with ``plugins.kernels.triton_cache_write`` (rotary fused into the
    KV-cache write), so both round alike. Callers launch with
    ``enable_fp_fusion=False``.
    """
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_r = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (offs_h < num_heads) & (offs_r < HALF)
    first = offs_h * HEAD_DIM + offs_r
    x1 = tl.load(src + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + first + HALF, mask=mask, other=0.0).to(tl.float32)
    a = (x1 * cos).to(dtype).to(tl.float32)
    b = (x2 * sin).to(dtype).to(tl.float32)
    lo = (a - b).to(dtype)
    a = (x2 * cos).to(dtype).to(tl.float32)
    b = (x1 * sin).to(dtype).to(tl.float32)
    hi = (a + b).to(dtype)
    return lo, hi, offs_h, offs_r, mask


@triton.jit
def _rotate_heads(
    src,  # this token's first element (row of [T, H*D])
    dst,
    cos,  # [1, BLOCK_HALF] float32, already rounded to the dtype
    sin,
    num_heads,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,  # rotary_dim // 2
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr,  # next power of two >= HEAD_DIM - 2 * HALF (0: nothing passes through)
):
    lo, hi, offs_h, offs_r, mask = rotate_head_halves(
        src, cos, sin, num_heads, dst.dtype.element_ty, HEAD_DIM, HALF, BLOCK_H, BLOCK_HALF
    )
    first = offs_h * HEAD_DIM + offs_r
    tl.store(dst + first, lo, mask=mask)
    tl.store(dst + first + HALF, hi, mask=mask)
    if BLOCK_REST > 0:
        offs_p = tl.arange(0, BLOCK_REST)[None, :]
        mask = (offs_h < num_heads) & (offs_p < HEAD_DIM - 2 * HALF)
        rest = offs_h * HEAD_DIM + 2 * HALF + offs_p
        tl.store(dst + rest, tl.load(src + rest, mask=mask), mask=mask)


# fmt: off
@triton.jit
def _rotary_kernel(
    positions_ptr,  # [T] int64
    cos_sin_ptr,  # [P, 2 * HALF]: cos | sin
    q_ptr, k_ptr,  # [T, Hq*D], [T, Hk*D] with row strides
    q_out_ptr, k_out_ptr,  # contiguous outputs
    stride_qt, stride_kt,
    stride_cache,
    num_q_heads, num_k_heads,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr,
):
# fmt: on
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_HALF)[None, :]
    dtype = q_out_ptr.dtype.element_ty
    row = cos_sin_ptr + pos * stride_cache
    cos = tl.load(row + offs_r, mask=offs_r < HALF, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(row + HALF + offs_r, mask=offs_r < HALF, other=0.0).to(dtype).to(tl.float32)
    _rotate_heads(
        q_ptr + token * stride_qt, q_out_ptr + token * (num_q_heads * HEAD_DIM), cos, sin, num_q_heads,
        HEAD_DIM, HALF, BLOCK_HQ, BLOCK_HALF, BLOCK_REST,
    )  # fmt: skip
    _rotate_heads(
        k_ptr + token * stride_kt, k_out_ptr + token * (num_k_heads * HEAD_DIM), cos, sin, num_k_heads,
        HEAD_DIM, HALF, BLOCK_HK, BLOCK_HALF, BLOCK_REST,
    )  # fmt: skip


def supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    return (
        q.dim() == 2 and k.dim() == 2 and q.dtype == k.dtype
        and q.stride(1) == 1 and k.stride(1) == 1
        and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
    )  # fmt: skip


def rotary_embedding(
    positions: torch.Tensor,  # [T]
    q: torch.Tensor,  # [T, Hq*D]
    k: torch.Tensor,  # [T, Hk*D]
    cos_sin_cache: torch.Tensor,  # [P, rotary_dim]
    head_dim: int,
    rotary_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of ``q`` and ``k``."""
    num_tokens = q.shape[0]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    num_q_heads, num_k_heads = q.shape[1] // head_dim, k.shape[1] // head_dim
    half, rest = rotary_dim // 2, head_dim - rotary_dim
    assert cos_sin_cache.stride(1) == 1
    _rotary_kernel[(num_tokens,)](
        positions, cos_sin_cache, q, k, q_out, k_out,
        q.stride(0), k.stride(0), cos_sin_cache.stride(0),
        num_q_heads, num_k_heads,
        HEAD_DIM=head_dim,
        HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_k_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_REST=triton.next_power_of_2(rest) if rest else 0,
        num_warps=4,
        enable_fp_fusion=False,  # no fma contraction: round where torch rounds
    )  # fmt: skip
    return q_out, k_out
