"""Triton kernel: write a step's new K/V into the paged cache.

Cache layout (as the torch backend): ``kv_cache[0]`` keys, ``kv_cache[1]``
values, each ``[num_blocks, block_size, num_kv_heads, head_dim]``; token
slot ``s = block_id * block_size + offset`` is row ``s`` of the flat view
``[num_blocks * block_size, num_kv_heads, head_dim]``.

One program per token copies its K and V (all KV heads) to row
``slot_mapping[t]``, cast to the cache dtype. A negative slot means "padding"
(a CUDA-graph bucket's unused rows): nothing is written.

An fp8 cache (float8_e4m3fn / float8_e5m2) stores ``x / scale`` in float32,
saturated to the dtype's finite range, rounded to nearest even; the scales
are float32 scalars on the device (``k_scale`` for keys, ``v_scale`` for
values), read by the kernel, so a CUDA graph sees their current values.

``rotary_write_kv_cache`` fuses the rotary embedding in front of the write
(the backend's ``fuses_rotary``): one program per token rotates its query
heads (into a new contiguous q) and its key heads, and stores the rotated
keys and the values as ``write_kv_cache`` does. The rotation is
``framework.ops.triton_rotary``'s (the same helper, launched with
``enable_fp_fusion=False``), so q and the stored keys equal the unfused
path's bit for bit: keys are rounded to the activation dtype first, then
cast (or fp8-quantised) to the cache dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from framework.ops import pdl
from framework.ops.pdl import pdl_start
from framework.ops.triton_rotary import rotate_head_halves

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


# fmt: off
@triton.jit
def _write_kv_kernel(
    k_ptr,  # [T, Hk, D] new keys (any strides, last dim contiguous)
    v_ptr,  # [T, Hk, D] new values
    key_cache_ptr,  # [slots, Hk, D] flat key cache
    value_cache_ptr,  # [slots, Hk, D] flat value cache
    slot_mapping_ptr,  # [T] int64 cache row of each token; < 0 = skip
    k_scale_ptr,  # [] float32 key scale (read only when KV_FP8)
    v_scale_ptr,  # [] float32 value scale (read only when KV_FP8)
    stride_kt, stride_kh,  # k strides (token, head)
    stride_vt, stride_vh,  # v strides (token, head)
    stride_cs, stride_ch,  # cache strides (slot, head); the same for keys and values
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,  # next power of two >= NUM_KV_HEADS
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM
    KV_FP8: tl.constexpr,  # the cache is fp8: store saturate(x / scale)
    FP8_MAX: tl.constexpr,  # largest finite value of the fp8 dtype
):
# fmt: on
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    src = offs_h[:, None] * stride_kh + offs_d[None, :]
    k = tl.load(k_ptr + token.to(tl.int64) * stride_kt + src, mask=mask)
    src = offs_h[:, None] * stride_vh + offs_d[None, :]
    v = tl.load(v_ptr + token.to(tl.int64) * stride_vt + src, mask=mask)
    if KV_FP8:  # div_rn: IEEE division, so the stored bytes equal plugins.quant.fp8_kv.quantize
        k = tl.clamp(tl.div_rn(k.to(tl.float32), tl.load(k_scale_ptr)), -FP8_MAX, FP8_MAX)
        v = tl.clamp(tl.div_rn(v.to(tl.float32), tl.load(v_scale_ptr)), -FP8_MAX, FP8_MAX)
    dst = slot * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
    tl.store(key_cache_ptr + dst, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + dst, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    k: torch.Tensor,  # [T, Hk, D]
    v: torch.Tensor,  # [T, Hk, D]
    key_cache: torch.Tensor,  # [slots, Hk, D], a view of kv_cache[0]
    value_cache: torch.Tensor,  # [slots, Hk, D], a view of kv_cache[1]
    slot_mapping: torch.Tensor,  # [T] int64
    k_scale: torch.Tensor | None = None,  # [] float32, fp8 caches only (None: 1.0)
    v_scale: torch.Tensor | None = None,
) -> None:
    """Store ``k[t]``/``v[t]`` at cache row ``slot_mapping[t]`` for every t (skipping negative slots).

    For an fp8 cache the stored values are ``saturate(k / k_scale)`` and ``saturate(v / v_scale)``.
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k.stride(2) == 1 and v.stride(2) == 1 and key_cache.stride(2) == 1, "head_dim must be contiguous"
    assert key_cache.stride() == value_cache.stride()
    kv_fp8 = key_cache.dtype in FP8_DTYPES
    if kv_fp8:
        one = None if k_scale is not None and v_scale is not None else torch.ones((), device=k.device)
        k_scale = one if k_scale is None else k_scale
        v_scale = one if v_scale is None else v_scale
    _write_kv_kernel[(num_tokens,)](
        k, v, key_cache, value_cache, slot_mapping,
        k_scale if kv_fp8 else slot_mapping, v_scale if kv_fp8 else slot_mapping,
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        key_cache.stride(0), key_cache.stride(1),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        KV_FP8=kv_fp8,
        FP8_MAX=torch.finfo(key_cache.dtype).max if kv_fp8 else 0.0,
        num_warps=4,
    )  # fmt: skip


@triton.jit
def _store_kv_rows(ptr, rows, scale_ptr, mask, KV_FP8: tl.constexpr, FP8_MAX: tl.constexpr):
    """Store ``rows`` (activation dtype) at ``ptr``: cast, or ``saturate(x / scale)`` into fp8."""
    if KV_FP8:
        rows = tl.clamp(tl.div_rn(rows.to(tl.float32), tl.load(scale_ptr)), -FP8_MAX, FP8_MAX)
    tl.store(ptr, rows.to(ptr.dtype.element_ty), mask=mask)


# fmt: off
@triton.jit
def _rotary_write_kv_kernel(
    positions_ptr,  # [T] int64
    cos_sin_ptr,  # [P, 2 * HALF]: cos | sin, in the activation dtype
    q_ptr,  # [T, Hq, D] un-rotated queries (token stride stride_qt; heads HEAD_DIM apart)
    q_out_ptr,  # [T, Hq, D] contiguous rotated queries
    k_ptr,  # [T, Hk, D] un-rotated keys (heads HEAD_DIM apart)
    v_ptr,  # [T, Hk, D] values
    key_cache_ptr,  # [slots, Hk, D] flat key cache
    value_cache_ptr,  # [slots, Hk, D] flat value cache
    slot_mapping_ptr,  # [T] int64; < 0 = padding (q still rotated, nothing written)
    k_scale_ptr,  # [] float32 (read only when KV_FP8)
    v_scale_ptr,
    stride_qt, stride_kt, stride_vt, stride_vh,
    stride_cos,
    stride_cs, stride_ch,
    num_q_heads,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,  # rotary_dim // 2
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,  # next power of two >= NUM_KV_HEADS
    BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr,  # next power of two >= HEAD_DIM - 2 * HALF (0: all features rotate)
    BLOCK_D: tl.constexpr,
    KV_FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
    PDL: tl.constexpr = False,  # a programmatic dependent launch (framework.ops.pdl)
):
# fmt: on
    pdl_start(PDL)
    token = tl.program_id(0).to(tl.int64)
    dtype = q_out_ptr.dtype.element_ty
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_HALF)[None, :]
    row = cos_sin_ptr + pos * stride_cos
    cos = tl.load(row + offs_r, mask=offs_r < HALF, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(row + HALF + offs_r, mask=offs_r < HALF, other=0.0).to(dtype).to(tl.float32)

    # queries -> q_out
    src = q_ptr + token * stride_qt
    dst = q_out_ptr + token * (num_q_heads * HEAD_DIM)
    lo, hi, offs_h, offs_c, mask = rotate_head_halves(
        src, cos, sin, num_q_heads, dtype, HEAD_DIM, HALF, BLOCK_HQ, BLOCK_HALF
    )
    first = offs_h * HEAD_DIM + offs_c
    tl.store(dst + first, lo, mask=mask)
    tl.store(dst + first + HALF, hi, mask=mask)
    if BLOCK_REST > 0:
        offs_p = tl.arange(0, BLOCK_REST)[None, :]
        rest_mask = (offs_h < num_q_heads) & (offs_p < HEAD_DIM - 2 * HALF)
        rest = offs_h * HEAD_DIM + 2 * HALF + offs_p
        tl.store(dst + rest, tl.load(src + rest, mask=rest_mask), mask=rest_mask)

    # keys: rotated (rounded to the activation dtype), then cast / quantised into the cache;
    # values as write_kv_cache. A padding token (slot < 0) writes nothing.
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    write = (tl.zeros([1, 1], tl.int64) + slot) >= 0  # [1, 1]: broadcasts into the masks
    k_src = k_ptr + token * stride_kt
    k_lo, k_hi, offs_hk, offs_ck, k_mask = rotate_head_halves(
        k_src, cos, sin, NUM_KV_HEADS, dtype, HEAD_DIM, HALF, BLOCK_HK, BLOCK_HALF
    )
    k_mask = k_mask & write
    k_dst = key_cache_ptr + slot * stride_cs + offs_hk * stride_ch
    _store_kv_rows(k_dst + offs_ck, k_lo, k_scale_ptr, k_mask, KV_FP8, FP8_MAX)
    _store_kv_rows(k_dst + HALF + offs_ck, k_hi, k_scale_ptr, k_mask, KV_FP8, FP8_MAX)
    if BLOCK_REST > 0:
        offs_pk = tl.arange(0, BLOCK_REST)[None, :]
        k_rest_mask = (offs_hk < NUM_KV_HEADS) & (offs_pk < HEAD_DIM - 2 * HALF) & write
        k_rest = tl.load(k_src + offs_hk * HEAD_DIM + 2 * HALF + offs_pk, mask=k_rest_mask)
        _store_kv_rows(k_dst + 2 * HALF + offs_pk, k_rest, k_scale_ptr, k_rest_mask, KV_FP8, FP8_MAX)
    offs_v = tl.arange(0, BLOCK_HK)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    v_mask = (offs_v < NUM_KV_HEADS) & (offs_d < HEAD_DIM) & write
    v = tl.load(v_ptr + token * stride_vt + offs_v * stride_vh + offs_d, mask=v_mask)
    v_dst = value_cache_ptr + slot * stride_cs + offs_v * stride_ch + offs_d
    _store_kv_rows(v_dst, v, v_scale_ptr, v_mask, KV_FP8, FP8_MAX)


def rotary_supported(q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> bool:
    """Whether ``rotary_write_kv_cache`` takes these (else rotate first, then ``write_kv_cache``)."""
    head_dim = q.shape[2]
    return (
        q.dtype == k.dtype and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and q.stride(2) == 1 and q.stride(1) == head_dim and k.stride(2) == 1 and k.stride(1) == head_dim
        and cos_sin_cache.dim() == 2 and cos_sin_cache.stride(1) == 1
    )  # fmt: skip


def rotary_write_kv_cache(
    positions: torch.Tensor,  # [T] int64
    q: torch.Tensor,  # [T, Hq, D] un-rotated
    k: torch.Tensor,  # [T, Hk, D] un-rotated
    v: torch.Tensor,  # [T, Hk, D]
    key_cache: torch.Tensor,  # [slots, Hk, D]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64
    cos_sin_cache: torch.Tensor,  # [P, rotary_dim] (RotaryEmbedding.cos_sin_cache)
    rotary_dim: int,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate q and k by ``positions`` and store the rotated k and v at ``slot_mapping``.

    Returns the rotated queries, a new contiguous ``[T, Hq, D]`` tensor (the
    inputs are left as they were). Rows of ``q`` past ``len(slot_mapping)``
    are not rotated (the caller's padding: their output is unused).
    """
    num_tokens = slot_mapping.shape[0]
    _, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    if not rotary_supported(q, k, cos_sin_cache):
        raise ValueError("rotary_write_kv_cache: q/k must share a 16/32-bit float dtype, with contiguous heads")
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim or cos_sin_cache.shape[1] != rotary_dim:
        raise ValueError(
            f"rotary_dim={rotary_dim} must be even, at most head_dim={head_dim} and the cos/sin table's "
            f"width {cos_sin_cache.shape[1]}"
        )
    assert v.stride(2) == 1 and key_cache.stride(2) == 1 and key_cache.stride() == value_cache.stride()
    kv_fp8 = key_cache.dtype in FP8_DTYPES
    if kv_fp8 and (k_scale is None or v_scale is None):
        one = torch.ones((), dtype=torch.float32, device=q.device)
        k_scale, v_scale = (one if k_scale is None else k_scale), (one if v_scale is None else v_scale)
    half, rest = rotary_dim // 2, head_dim - rotary_dim
    _rotary_write_kv_kernel[(num_tokens,)](
        positions, cos_sin_cache, q, q_out, k, v, key_cache, value_cache, slot_mapping,
        k_scale if kv_fp8 else slot_mapping, v_scale if kv_fp8 else slot_mapping,
        q.stride(0), k.stride(0), v.stride(0), v.stride(1),
        cos_sin_cache.stride(0),
        key_cache.stride(0), key_cache.stride(1),
        num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_REST=triton.next_power_of_2(rest) if rest else 0,
        BLOCK_D=triton.next_power_of_2(head_dim),
        KV_FP8=kv_fp8,
        FP8_MAX=torch.finfo(key_cache.dtype).max if kv_fp8 else 0.0,
        num_warps=4,
        enable_fp_fusion=False,  # no fma contraction: round where torch rounds (see triton_rotary)
        **pdl.launch_args(q.device, num_tokens),
    )  # fmt: skip
    return q_out
