"""The split-vocabulary path of ``triton_sampling.filtered_sample``: few rows without top-k / top-p.

Split-vocabulary path (``use_split_path``: rows without top-k / top-p, at
most half as many rows as the device has multiprocessors; ``split=`` forces
either path). One program per row leaves all but N multiprocessors idle and
makes a row's 2 serial passes the latency of the launch, so there each row
is cut into chunks of ``CHUNK`` elements and each program takes one (row,
chunk):

A. ``_split_stats_kernel``: the chunk's online logsumexp (of the raw logits
   or of x), max of s and first argmax of x, with step 1's per-lane
   arithmetic, to a ``[N, 5, C]`` / ``[N, 2, C]`` work space (C chunks);
B. ``_split_race_kernel``: ``m_s`` = the max of the row's C chunk maxima,
   then step 4 on the chunk with no cut (every token kept, the same
   ``e = exp(s - m_s)``, min-p test and division), its winner and value
   written beside A's partials;
C. the row's finish: lse from the chunks' logsumexps; token = the race
   winner of the chunks (the largest value, the lowest chunk on ties, so
   the lowest id, as one program's lanes reduce), greedy rows and rows of
   -inf the first argmax. It is done by the last program of the row to
   arrive in B (an arrival counter of ``framework.ops.split_k``), or by a
   third launch when no counters can be had (a CUDA-graph capture needing
   more than exist).

Each element's arithmetic is the one-program kernel's and max and argmax do
not depend on the order of reduction, so the tokens are identical; the lse
differs by float round-off (another summation order). ``stats`` rows get
NaN, 0, 0, 0, as the one-program kernel writes for rows without a cut.
Cost per row: two reads of x (and raw, if given, in A) and one of q.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from framework.ops.split_k import arrival_counters, num_sms
from plugins.samplers.triton_cut import scaled
from plugins.samplers.triton_sampling import _first_argmax, _lse_reduce, _lse_update, _row_temperature

# The split path's launch: CHUNK elements of a row per program (V=128256: 32 chunks), BLOCK per step.
# benchmarks/bench_sampler.py --small-n on an H200, 2026-11-21 (V=128256): 14.2-19.8 us at N = 1..32
# and 34.8 us at N = 64, against the one-program kernel's 39.2-40.1 us (68.4 at N = 64); tokens equal.
SPLIT_CONFIG = dict(CHUNK=4096, BLOCK=1024, num_warps=4)


# --- The split-vocabulary path: rows without a cut, few rows (see the module docstring) ---------------


@triton.jit
def _split_stats_kernel(
    x_ptr, stride_x,  # [N, V] float32 logits
    raw_ptr, stride_raw,  # [N, V] float32 raw logits (HAS_RAW)
    temperature_ptr,  # [N] float32
    part_ptr,  # [N, 5, C] float32 out, per chunk: lse max, lse sum, max s, max x (HAS_GREEDY); [4] is kernel B's
    index_ptr,  # [N, 2, C] int32 out, per chunk: [0] first argmax of x (HAS_GREEDY); [1] is kernel B's
    V, C,  # vocabulary, chunks per row
    HAS_GREEDY: tl.constexpr, HAS_RAW: tl.constexpr,
    CHUNK: tl.constexpr,  # elements per program (a multiple of BLOCK)
    BLOCK: tl.constexpr,  # elements per step
):
    """Kernel A, one program per (row, chunk): ``_row_stats``'s per-lane arithmetic on the chunk."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    t, _, unit_t = _row_temperature(temperature_ptr, row)
    x_row = x_ptr + row * stride_x
    raw_row = raw_ptr + row * stride_raw
    lanes = tl.arange(0, BLOCK)
    m_l = tl.full([BLOCK], float("-inf"), tl.float32)  # online logsumexp of raw (HAS_RAW) or x
    z_l = tl.zeros([BLOCK], tl.float32)
    m_s = tl.full([BLOCK], float("-inf"), tl.float32)
    best_v = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], tl.int32)
    for off in range(0, CHUNK, BLOCK):
        idx = chunk * CHUNK + off + lanes
        x = tl.load(x_row + idx, mask=idx < V, other=float("-inf"))
        if HAS_RAW:
            m_l, z_l = _lse_update(m_l, z_l, tl.load(raw_row + idx, mask=idx < V, other=float("-inf")))
        else:
            m_l, z_l = _lse_update(m_l, z_l, x)
        if HAS_GREEDY:
            better = x > best_v  # strict: each lane keeps its first maximum
            best_i = tl.where(better, idx, best_i)
            best_v = tl.where(better, x, best_v)
        m_s = tl.maximum(m_s, scaled(x, t, unit_t))  # as _lse_update keeps the max
    lse_m, lse_z = _lse_reduce(m_l, z_l)
    part_row = part_ptr + row * 5 * C + chunk
    tl.store(part_row, lse_m)
    tl.store(part_row + C, lse_z)
    tl.store(part_row + 2 * C, tl.max(m_s, axis=0))
    if HAS_GREEDY:
        tl.store(part_row + 3 * C, tl.max(best_v, axis=0))
        tl.store(index_ptr + row * 2 * C + chunk, _first_argmax(best_v, best_i))


@triton.jit
def _split_row_max_s(part_row, C, BLOCK_P: tl.constexpr):
    """The row's ``m_s`` (max of s) from kernel A's per-chunk maxima."""
    p = tl.arange(0, BLOCK_P)
    return tl.max(tl.load(part_row + 2 * C + p, mask=p < C, other=float("-inf")), axis=0)


@triton.jit
def _split_finish(
    part_row, index_row, C, token_ptr, lse_ptr, stats_ptr, row, raced,
    HAS_GREEDY: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Step 3: the row's lse, token (race winner over the chunks, else the first argmax) and stats."""
    p = tl.arange(0, BLOCK_P)
    valid = p < C
    lse_m = tl.load(part_row + p, mask=valid, other=float("-inf"), cache_modifier=".cg")
    lse_z = tl.load(part_row + C + p, mask=valid, other=0.0, cache_modifier=".cg")
    m, z = _lse_reduce(lse_m, lse_z)
    tl.store(lse_ptr + row, m + tl.log(z))
    token = tl.full([], 0, tl.int32)  # a row of -inf without HAS_GREEDY: token 0, as the one-program kernel
    if HAS_GREEDY:  # chunks in vocabulary order: the lowest chunk holding the max has the first argmax
        token = _first_argmax(
            tl.load(part_row + 3 * C + p, mask=valid, other=float("-inf"), cache_modifier=".cg"),
            tl.load(index_row + p, mask=valid, other=0, cache_modifier=".cg"))  # fmt: skip
    if raced:  # padding as _race's lanes start: value -1, index 0
        token = _first_argmax(
            tl.load(part_row + 4 * C + p, mask=valid, other=-1.0, cache_modifier=".cg"),
            tl.load(index_row + C + p, mask=valid, other=0, cache_modifier=".cg"))  # fmt: skip
    tl.store(token_ptr + row, token.to(tl.int64))
    zero = tl.full([], 0.0, tl.float32)
    tl.store(stats_ptr + row * 4 + 0, zero + float("nan"))  # no cut, as the one-program kernel writes it
    tl.store(stats_ptr + row * 4 + 1, zero)
    tl.store(stats_ptr + row * 4 + 2, zero)
    tl.store(stats_ptr + row * 4 + 3, zero)


@triton.jit
def _split_race_kernel(
    x_ptr, stride_x,  # [N, V] float32 logits
    q_ptr, stride_q,  # [N, V] float32 Exponential(1) noise
    temperature_ptr, min_p_ptr,  # [N] float32
    part_ptr, index_ptr,  # kernel A's partials; out: [N, 4, C] race value, [N, 1, C] race index
    counter_ptr,  # [N] int32 zeroed arrival counters (FUSED_FINISH): left zeroed
    token_ptr, lse_ptr, stats_ptr,  # outs (FUSED_FINISH), as _filtered_sample_kernel's
    V, C,
    HAS_MIN_P: tl.constexpr, HAS_GREEDY: tl.constexpr,
    FUSED_FINISH: tl.constexpr,  # the last program of a row to arrive finishes it (else _split_finish_kernel)
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,  # next power of two >= C
):
    """Kernel B, one program per (row, chunk): ``_race``'s arithmetic (no cut) on the chunk."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    t, sampled, unit_t = _row_temperature(temperature_ptr, row)
    part_row = part_ptr + row * 5 * C
    index_row = index_ptr + row * 2 * C
    m_s = _split_row_max_s(part_row, C, BLOCK_P)
    raced = sampled & (m_s > float("-inf"))
    if raced:
        min_p = tl.full([], 0.0, tl.float32)
        if HAS_MIN_P:
            min_p = tl.load(min_p_ptr + row)
        x_row = x_ptr + row * stride_x
        q_row = q_ptr + row * stride_q
        lanes = tl.arange(0, BLOCK)
        best_v = tl.full([BLOCK], -1.0, tl.float32)
        best_i = tl.zeros([BLOCK], tl.int32)
        for off in range(0, CHUNK, BLOCK):
            idx = chunk * CHUNK + off + lanes
            x = tl.load(x_row + idx, mask=idx < V, other=float("-inf"))
            q = tl.load(q_row + idx, mask=idx < V, other=1.0)
            s = scaled(x, t, unit_t)
            e = tl.exp(s - m_s)
            val = e / tl.maximum(q, 1.1754943508222875e-38)  # _race without a cut keeps every token
            if HAS_MIN_P:
                val = tl.where(e >= min_p, val, 0.0)
            better = (val > best_v) & (idx < V)
            best_i = tl.where(better, idx, best_i)
            best_v = tl.where(better, val, best_v)
        tl.store(part_row + 4 * C + chunk, tl.max(best_v, axis=0))
        tl.store(index_row + C + chunk, _first_argmax(best_v, best_i))
    if FUSED_FINISH:
        # Publish this chunk's partials (every thread's stores, then one release) and count it; the
        # program that counts last acquires the others' and finishes the row.
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel", scope="gpu")
        if arrived == C - 1:
            tl.atomic_xchg(counter_ptr + row, 0, sem="relaxed", scope="gpu")  # ready for the next launch
            _split_finish(part_row, index_row, C, token_ptr, lse_ptr, stats_ptr, row, raced, HAS_GREEDY, BLOCK_P)


@triton.jit
def _split_finish_kernel(
    temperature_ptr, part_ptr, index_ptr, token_ptr, lse_ptr, stats_ptr, C,
    HAS_GREEDY: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Step 3 as a launch of its own, one program per row (when no arrival counters are at hand)."""
    row = tl.program_id(0).to(tl.int64)
    _, sampled, _ = _row_temperature(temperature_ptr, row)
    part_row = part_ptr + row * 5 * C
    raced = sampled & (_split_row_max_s(part_row, C, BLOCK_P) > float("-inf"))
    _split_finish(part_row, index_ptr + row * 2 * C, C, token_ptr, lse_ptr, stats_ptr, row, raced,
                  HAS_GREEDY, BLOCK_P)  # fmt: skip


def use_split_path(n: int, top_k: torch.Tensor | None, top_p: torch.Tensor | None, device: torch.device) -> bool:
    """Whether ``filtered_sample`` takes the split-vocabulary path (host-side: shapes and flags only).

    Rows without top-k / top-p, and at most half as many rows as the device
    has multiprocessors: the one-program kernel's time per launch is the
    time of one row on one SM whatever N is up to there, while the split
    path's grows with N's bytes spread over every SM (an estimate of where
    they cross; ``benchmarks/bench_sampler.py --small-n`` times both).
    """
    return top_k is None and top_p is None and 2 * n <= num_sms(device)


def split_sample(x, q, temperature, min_p, raw, any_greedy, tokens, lse, stats, **overrides) -> None:
    """Launch kernels A and B (and the finish kernel when no arrival counters are at hand) on ``[N, V]``."""
    cfg = {**SPLIT_CONFIG, **overrides}
    chunk, block, num_warps = cfg["CHUNK"], cfg["BLOCK"], cfg["num_warps"]
    assert chunk % block == 0, "CHUNK must be a multiple of BLOCK"
    n, vocab = x.shape
    num_chunks = triton.cdiv(vocab, chunk)
    block_p = triton.next_power_of_2(num_chunks)
    part = torch.empty(n, 5, num_chunks, dtype=torch.float32, device=x.device)
    index = torch.empty(n, 2, num_chunks, dtype=torch.int32, device=x.device)
    _split_stats_kernel[(n, num_chunks)](
        x, x.stride(0), raw if raw is not None else x, raw.stride(0) if raw is not None else 0,
        temperature, part, index, vocab, num_chunks,
        HAS_GREEDY=any_greedy, HAS_RAW=raw is not None, CHUNK=chunk, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    counters = arrival_counters(x.device, n)
    _split_race_kernel[(n, num_chunks)](
        x, x.stride(0), q, q.stride(0), temperature, min_p if min_p is not None else temperature,
        part, index, counters if counters is not None else index, tokens, lse, stats, vocab, num_chunks,
        HAS_MIN_P=min_p is not None, HAS_GREEDY=any_greedy, FUSED_FINISH=counters is not None,
        CHUNK=chunk, BLOCK=block, BLOCK_P=block_p, num_warps=num_warps,
    )  # fmt: skip
    if counters is None:
        _split_finish_kernel[(n,)](
            temperature, part, index, tokens, lse, stats, num_chunks,
            HAS_GREEDY=any_greedy, BLOCK_P=block_p, num_warps=1,
        )  # fmt: skip
