"""Triton kernels: paged decode attention with split-K (flash decoding).

Each decode sequence has one query token; its keys are the ``seq_len`` rows
of the paged cache its block-table row points to.

Algorithm. The keys of a sequence are cut into ``num_splits`` contiguous
ranges of ``split_len = ceil(ceil(seq_len / num_splits) / BLOCK_N) * BLOCK_N``
tokens (computed in the kernel from ``seq_len``, so any ``num_splits`` is
correct for any length; it only changes how the work is spread).

* ``_decode_split_kernel``, grid ``(num_seqs, num_kv_heads, num_splits)``:
  one program takes one KV head and all ``GROUP = Hq / Hk`` query heads that
  share it (GQA), as the rows of a ``[BLOCK_G, D]`` query tile padded to 16
  rows for ``tl.dot``. It walks its range in tiles of ``BLOCK_N`` keys (each
  key's page looked up in the block table, so ``BLOCK_N`` and the page size
  are independent), with an online softmax in base 2. It writes the
  normalised partial output and its log-sum-exp (base 2); an empty range
  writes zeros and ``-inf``. With one split it writes the final output
  instead and the reduction is skipped.
* The splits of a (sequence, KV head) are combined, weighting each by
  ``2 ** (lse_s - max lse)``, in the same launch by default: each split
  program stores its partials, then bumps an int32 counter of its
  (sequence, KV head) with an acquire-release atomic; the one that sees
  ``num_splits - 1`` (the last to finish) resets the counter to 0 and reads
  the partials back to write the output. The counters live in a persistent,
  zeroed per-device buffer that every launch leaves zeroed, so a CUDA graph
  replays the launch as is. ``_decode_reduce_kernel``, grid
  ``(num_seqs, Hq)``, does the same combination as a second launch
  (``fuse_reduce=False``, or a capture that would need a larger buffer).

FP8 cache (``KV_FP8``): keys and values load as fp8 and convert exactly to
the query dtype for ``tl.dot``; the scales are applied in float32 where they
factor out: ``k_scale`` multiplies the scores (folded into the softmax scale)
and ``v_scale`` the normalised output, so ``q . (k * k_scale)`` and
``sum p * (v * v_scale)`` cost nothing per key.

A row with ``seq_len == 0`` (a CUDA-graph bucket's padding) gets zeros.
Shapes depend only on ``(num_seqs, num_splits)``, never on the lengths, so a
decode step of a given batch size can be captured in a CUDA graph once
``num_splits`` is fixed for it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from framework.ops import pdl
from framework.ops.pdl import pdl_start
from framework.ops.split_k import arrival_counters

LOG2E = 1.4426950408889634
MIN_TOKENS_PER_SPLIT = 256  # below this, the extra reduction costs more than the parallelism gains
MAX_SPLITS = 32


# fmt: off
# stride_bt (the widest block table of the step) changes from eager step to eager step: not specialised on,
# so that the batch growing does not compile new variants (see triton_prefill).
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_split_kernel(
    q_ptr,  # [B, Hq, D]
    key_cache_ptr,  # [slots, Hk, D]
    value_cache_ptr,  # [slots, Hk, D]
    block_tables_ptr,  # [B, W] int32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [B, Hq, D] final output (NUM_SPLITS_IS_ONE)
    part_out_ptr,  # [B, Hq, S, D] float32 normalised partial outputs (else)
    part_lse_ptr,  # [B, Hq, S] float32 partial log2-sum-exp (else)
    k_scale_ptr,  # [] float32 fp8 key scale (read only when KV_FP8)
    v_scale_ptr,  # [] float32 fp8 value scale (read only when KV_FP8)
    counters_ptr,  # [>= B * Hk] int32, all 0 (FUSED_REDUCE): splits finished per (seq, kv head)
    scale_log2,  # softmax scale * log2(e)
    num_splits,
    stride_qb, stride_qh,
    stride_cs, stride_ch,
    stride_bt,
    stride_ob, stride_oh,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,  # tokens per KV-cache block
    BLOCK_G: tl.constexpr,  # max(16, next power of two >= GROUP)
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM
    BLOCK_N: tl.constexpr,  # keys per tile
    NUM_SPLITS_IS_ONE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs, else "tf32" (unused by 16-bit dots)
    KV_FP8: tl.constexpr,  # the cache holds fp8 values x / scale
    FUSED_REDUCE: tl.constexpr,  # the last split of a (seq, kv head) to finish combines them
    BLOCK_GR: tl.constexpr,  # next power of two >= GROUP (the fused reduction's head rows)
    BLOCK_S: tl.constexpr,  # next power of two >= num_splits (FUSED_REDUCE)
    PDL: tl.constexpr = False,  # a programmatic dependent launch (framework.ops.pdl)
):
# fmt: on
    pdl_start(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if KV_FP8:
        scale_log2 = scale_log2 * tl.load(k_scale_ptr)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_offset = kv_head * stride_ch

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for tile in range(start, end, BLOCK_N):
        offs_n = tile + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        page = tl.load(block_table + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        rows = page * PAGE_SIZE + offs_n % PAGE_SIZE
        k = tl.load(  # [BLOCK_D, BLOCK_N]: transposed for q @ k
            key_cache_ptr + rows[None, :] * stride_cs + kv_offset + offs_d[:, None],
            mask=n_mask[None, :] & d_mask[:, None],
            other=0.0,
        )
        scores = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * scale_log2
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(  # [BLOCK_N, BLOCK_D]; masked rows read as 0 (never the stale cache)
            value_cache_ptr + rows[:, None] * stride_cs + kv_offset + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new

    nonempty = l_i > 0.0
    out = tl.where(nonempty[:, None], acc / tl.where(nonempty, l_i, 1.0)[:, None], 0.0)
    if KV_FP8:
        out = out * tl.load(v_scale_ptr)
    mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS_IS_ONE:
        dst = out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        row = (seq.to(tl.int64) * (GROUP * tl.num_programs(1)) + heads) * num_splits + split  # [BLOCK_G]
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask)
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_mask)
        if FUSED_REDUCE:
            # Publish this split's partials (every thread's stores, then one release), count it;
            # the program that counts last acquires the others' and writes the output.
            tl.debug_barrier()
            counter = counters_ptr + seq * tl.num_programs(1) + kv_head
            done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if done == num_splits - 1:
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next launch
                # All partials in one load each (as _decode_reduce_kernel), not one split at a time:
                # this tail is on the launch's critical path.
                offs_r = tl.arange(0, BLOCK_GR)
                offs_s = tl.arange(0, BLOCK_S)
                r_heads = kv_head * GROUP + offs_r
                r_rows = (seq.to(tl.int64) * (GROUP * tl.num_programs(1)) + r_heads)[:, None] * num_splits + offs_s[None, :]
                r_mask = (offs_r < GROUP)[:, None] & (offs_s < num_splits)[None, :]  # [BLOCK_GR, BLOCK_S]
                r_lse = tl.load(part_lse_ptr + r_rows, mask=r_mask, other=float("-inf"), cache_modifier=".cg")
                r_max = tl.max(r_lse, 1)
                r_ref = tl.where(r_max > float("-inf"), r_max, 0.0)  # a padded row: every split empty
                r_w = tl.where(r_lse > float("-inf"), tl.exp2(r_lse - r_ref[:, None]), 0.0)
                r_total = tl.sum(r_w, 1)
                r_parts = tl.load(
                    part_out_ptr + r_rows[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                    mask=r_mask[:, :, None] & d_mask[None, None, :], other=0.0, cache_modifier=".cg",
                )
                r_out = tl.sum(r_w[:, :, None] * r_parts, 1) / tl.where(r_total > 0.0, r_total, 1.0)[:, None]
                r_dst = out_ptr + seq.to(tl.int64) * stride_ob + r_heads[:, None] * stride_oh + offs_d[None, :]
                tl.store(r_dst, r_out.to(out_ptr.dtype.element_ty), mask=(offs_r < GROUP)[:, None] & d_mask[None, :])


# fmt: off
@triton.jit
def _decode_reduce_kernel(
    part_out_ptr,  # [B, Hq, S, D] float32
    part_lse_ptr,  # [B, Hq, S] float32
    out_ptr,  # [B, Hq, D]
    num_splits,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next power of two >= num_splits
    BLOCK_D: tl.constexpr,
):
# fmt: on
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    row = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits + offs_s  # [BLOCK_S]
    lse = tl.load(part_lse_ptr + row, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    # A padded row (seq_len 0) has every split empty: weight nothing, output 0.
    weight = tl.where(lse > float("-inf"), tl.exp2(lse - tl.where(lse_max > float("-inf"), lse_max, 0.0)), 0.0)
    parts = tl.load(
        part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0
    )
    total = tl.sum(weight, 0)
    out = tl.sum(weight[:, None] * parts, 0) / tl.where(total > 0.0, total, 1.0)
    dst = out_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + offs_d
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=d_mask)


_MAX_FUSED_REDUCE_ELEMENTS = 16384  # GROUP x splits x head_dim (padded) of the in-launch reduction


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Splits per sequence (a power of two, host arithmetic only).

    Split only while the grid ``num_seqs * num_kv_heads`` fills fewer than two
    waves of ``num_sms`` programs, and keep at least ``MIN_TOKENS_PER_SPLIT``
    keys per split of the longest sequence. ``max_seq_len`` is the bucket the
    metadata holds (next power of two of the longest decode), so the choice is
    stable from step to step and a CUDA graph can be captured per bucket.
    """
    by_length = max(1, max_seq_len // MIN_TOKENS_PER_SPLIT)
    by_occupancy = max(1, math.ceil(2 * num_sms / max(1, num_seqs * num_kv_heads)))
    return min(MAX_SPLITS, 1 << (min(by_length, by_occupancy).bit_length() - 1))


def decode_block_n(head_dim: int) -> int:
    return 32 if head_dim > 128 else 64


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    key_cache: torch.Tensor,  # [slots, Hk, D]
    value_cache: torch.Tensor,  # [slots, Hk, D]
    block_tables: torch.Tensor,  # [B, W] int32
    seq_lens: torch.Tensor,  # [B] int32
    out: torch.Tensor,  # [B, Hq, D], written
    scale: float,
    page_size: int,
    num_splits: int,
    block_n: int | None = None,
    k_scale: torch.Tensor | None = None,  # [] float32, fp8 caches only (None: 1.0)
    v_scale: torch.Tensor | None = None,
    fuse_reduce: bool = True,
) -> None:
    """Attention of one query token per sequence over its paged keys; writes ``out``.

    An fp8 cache is read as ``stored * k_scale`` / ``stored * v_scale``.
    With ``fuse_reduce`` (and ``num_splits > 1``) the splits are combined in
    the same launch (see the module docstring); otherwise by a second one.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[1]
    if num_seqs == 0:
        return
    group = num_heads // num_kv_heads
    assert q.stride(2) == 1 and out.stride(2) == 1 and key_cache.stride(2) == 1
    block_d = triton.next_power_of_2(head_dim)
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    block_gr, block_s = triton.next_power_of_2(group), triton.next_power_of_2(num_splits)
    # the reduction holds [GROUP, splits, D] float32 partials in registers: only while that is small
    fuse_reduce = fuse_reduce and num_splits > 1 and block_gr * block_s * block_d <= _MAX_FUSED_REDUCE_ELEMENTS
    counters = arrival_counters(q.device, num_seqs * num_kv_heads) if fuse_reduce else None
    fused_reduce = counters is not None
    kv_fp8 = key_cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    if kv_fp8 and (k_scale is None or v_scale is None):
        one = torch.ones((), dtype=torch.float32, device=q.device)
        k_scale, v_scale = (one if k_scale is None else k_scale), (one if v_scale is None else v_scale)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, key_cache, value_cache, block_tables, seq_lens, out, part_out, part_lse,
        k_scale if kv_fp8 else seq_lens, v_scale if kv_fp8 else seq_lens,
        counters if fused_reduce else seq_lens,
        scale * LOG2E, num_splits,
        q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_N=block_n or decode_block_n(head_dim),
        NUM_SPLITS_IS_ONE=num_splits == 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        KV_FP8=kv_fp8,
        FUSED_REDUCE=fused_reduce,
        BLOCK_GR=block_gr,
        BLOCK_S=block_s,
        num_warps=4,
        num_stages=2,
        **pdl.launch_args(q.device, num_seqs),
    )  # fmt: skip
    if num_splits > 1 and not fused_reduce:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, num_splits,
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
            num_warps=4,
        )  # fmt: skip
