"""Triton kernel: paged causal prefill over variable-length packed sequences.

The prefill part of a step is sequences ``first_seq .. first_seq +
num_prefills - 1`` of the batch. Sequence ``i`` has ``q_len`` new tokens at
rows ``query_start_loc[i] ..`` of ``q`` and ``seq_len`` keys in the paged
cache (its ``context = seq_len - q_len`` cached tokens first, then the new
ones, already written): fresh prompts (context 0), chunked prefill and
prefix-cache hits (context > 0) are all the same case. New token ``r`` has
position ``context + r`` and sees keys ``0 .. context + r``.

Grid ``(num_q_tiles, Hq)``. Query tiles are ``BLOCK_M`` new tokens of one
sequence and one query head (GQA: head ``h`` reads KV head ``h // GROUP``).
Without padding the batch, sequence ``i`` owns the tiles starting at
``tile_start(i) = (query_start_loc[i] - query_start_loc[first_seq]) // BLOCK_M + i'``
(``i'`` its index among the prefills): that is at least ``ceil(q_len /
BLOCK_M)`` tiles per sequence, and ``num_prefill_tokens // BLOCK_M +
num_prefills`` in all, a bound the host knows. A program finds its sequence
by binary search over ``query_start_loc`` and exits if its tile lies past the
sequence's end. It then walks keys ``0 .. min(seq_len, context + tile end)``
in tiles of ``BLOCK_N`` (each key's page looked up in the block table), with
an online softmax in base 2.

FP8 cache (``KV_FP8``): keys and values load as fp8 and convert exactly to
the query dtype; ``k_scale`` is folded into the softmax scale and
``v_scale`` multiplies the normalised output, both in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# fmt: off
# Arguments that change from step to step are not specialised on (Triton would compile a variant for each
# value that is 1 or a multiple of 16): without this a run compiles dozens of copies of the kernel as the batch
# changes, each one a pause of a second or more in the middle of serving.
@triton.jit(do_not_specialize=["first_seq", "num_prefills", "stride_bt"])
def _prefill_kernel(
    q_ptr,  # [T, Hq, D]
    key_cache_ptr,  # [slots, Hk, D]
    value_cache_ptr,  # [slots, Hk, D]
    block_tables_ptr,  # [B, W] int32
    seq_lens_ptr,  # [B] int32
    query_start_loc_ptr,  # [B + 1] int32
    out_ptr,  # [T, Hq, D]
    k_scale_ptr,  # [] float32 fp8 key scale (read only when KV_FP8)
    v_scale_ptr,  # [] float32 fp8 value scale (read only when KV_FP8)
    scale_log2,  # softmax scale * log2(e)
    first_seq,  # batch index of the first prefill sequence
    num_prefills,
    stride_qt, stride_qh,
    stride_cs, stride_ch,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query tokens per tile
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,  # the cache holds fp8 values x / scale
):
# fmt: on
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    qsl = query_start_loc_ptr + first_seq
    base = tl.load(qsl)

    # Binary search: the last prefill i with tile_start(i) <= tile.
    lo = tl.full([], 0, tl.int32)
    hi = num_prefills + lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        mid_start = (tl.load(qsl + mid) - base) // BLOCK_M + mid
        lo = tl.where(mid_start <= tile, mid, lo)
        hi = tl.where(mid_start <= tile, hi, mid)
    q_start = tl.load(qsl + lo)
    q_len = tl.load(qsl + lo + 1) - q_start
    m_start = (tile - ((q_start - base) // BLOCK_M + lo)) * BLOCK_M
    if m_start >= q_len:
        return
    seq = first_seq + lo
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len
    if KV_FP8:
        scale_log2 = scale_log2 * tl.load(k_scale_ptr)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    rows_q = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows_q[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    q_pos = context + offs_m  # absolute position of each query row
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_offset = kv_head * stride_ch

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys past the tile's last row are invisible to every row of it.
    kv_end = tl.minimum(seq_len, context + m_start + BLOCK_M)
    for key_tile in range(0, kv_end, BLOCK_N):
        offs_n = key_tile + tl.arange(0, BLOCK_N)
        n_mask = offs_n < kv_end
        page = tl.load(block_table + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        rows = page * PAGE_SIZE + offs_n % PAGE_SIZE
        k = tl.load(  # [BLOCK_D, BLOCK_N]
            key_cache_ptr + rows[None, :] * stride_cs + kv_offset + offs_d[:, None],
            mask=n_mask[None, :] & d_mask[:, None],
            other=0.0,
        )
        scores = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * scale_log2
        visible = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        # Every row sees key 0 in the first tile, so m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(  # [BLOCK_N, BLOCK_D]
            value_cache_ptr + rows[:, None] * stride_cs + kv_offset + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    if KV_FP8:
        out = out * tl.load(v_scale_ptr)
    dst = out_ptr + rows_q[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def prefill_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch settings (a starting point; tuned in benchmarks/)."""
    wide = dtype == torch.float32 or head_dim > 128  # registers and shared memory run out sooner
    return {
        "BLOCK_M": 64,
        "BLOCK_N": 32 if wide else 64,
        "num_warps": 8 if head_dim > 128 else 4,
        "num_stages": 2,
    }


def prefill_attention(
    q: torch.Tensor,  # [T, Hq, D]
    key_cache: torch.Tensor,  # [slots, Hk, D]
    value_cache: torch.Tensor,  # [slots, Hk, D]
    block_tables: torch.Tensor,  # [B, W] int32
    seq_lens: torch.Tensor,  # [B] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    out: torch.Tensor,  # [T, Hq, D], rows of the prefill tokens written
    scale: float,
    page_size: int,
    first_seq: int,
    num_prefills: int,
    num_prefill_tokens: int,
    config: dict | None = None,
    k_scale: torch.Tensor | None = None,  # [] float32, fp8 caches only (None: 1.0)
    v_scale: torch.Tensor | None = None,
) -> None:
    """Causal attention of sequences ``first_seq ..`` over their paged keys (host ints give the grid).

    An fp8 cache is read as ``stored * k_scale`` / ``stored * v_scale``.
    """
    if num_prefills == 0:
        return
    _, num_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[1]
    assert q.stride(2) == 1 and out.stride(2) == 1 and key_cache.stride(2) == 1
    config = dict(config or prefill_config(head_dim, q.dtype))
    num_tiles = num_prefill_tokens // config["BLOCK_M"] + num_prefills
    kv_fp8 = key_cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    if kv_fp8 and (k_scale is None or v_scale is None):
        one = torch.ones((), dtype=torch.float32, device=q.device)
        k_scale, v_scale = (one if k_scale is None else k_scale), (one if v_scale is None else v_scale)
    _prefill_kernel[(num_tiles, num_heads)](
        q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out,
        k_scale if kv_fp8 else seq_lens, v_scale if kv_fp8 else seq_lens,
        scale * LOG2E, first_seq, num_prefills,
        q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_D=triton.next_power_of_2(head_dim),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        KV_FP8=kv_fp8,
        **config,
    )  # fmt: skip
