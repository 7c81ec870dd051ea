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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
