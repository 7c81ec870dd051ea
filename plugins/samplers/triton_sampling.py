"""Temperature, top-k, top-p and min-p sampling without sorting the vocabulary (Triton).

One program samples one row of ``[N, V]`` logits (few rows without top-k /
top-p take the split-vocabulary path described below). It finds the row's cut --
the value ``v`` of the last token kept by top-k / top-p and how many of the
tokens equal to ``v`` are kept -- by narrowing a bracket of values, never by
sorting V = 128k numbers, then runs the exponential race of
``standard._exponential_race`` over the kept tokens. The rule is the one of
``standard._apply_top_k_top_p`` (the torch reference), with the tokens tied
at the cut taken in vocabulary order (lowest id first), as a stable sort
ranks them.

Per row (``s = x / temperature``, divided as torch divides; mass
``e = exp(s - max s)``, so the top token has mass 1):

1. one pass: per-lane online logsumexps of x (or of the raw logits, whose
   logprobs are returned) and of s, ``min s`` over finite values, the finite
   count and the first ``argmax x`` (greedy rows stop here);
2. top-k (count target ``k``) and then top-p (mass target ``top_p * S``, S
   the mass of the top-k set or of the row): a bracket ``[lo, hi)`` of
   order-preserving int32 keys of ``s`` holds the cut; the elements at or
   above ``hi`` are kept for sure (their count and mass are carried). Each
   pass evaluates the count (and mass) at or above ``NUM_PIVOTS`` pivots at
   once -- ``lo`` itself, the key-space midpoint (so the key range at least
   halves: at most 33 passes) and values evenly spaced between ``lo`` and
   ``hi`` (which do the real work on logits) -- and keeps the sub-bracket
   where the target is crossed. Top-p starts at a bound no cut can be
   below: ``e_v > (1 - top_p) * S / V``;
3. when at most ``CAP`` elements are left in the bracket (or everything at
   or above ``lo`` fits) they are copied, in vocabulary order with their
   token ids, to a per-row scratch row, sorted in registers, and the cut is
   read off their cumulative count / mass exactly as the reference does on
   the full sort; the id of the last tied token kept comes from the copy. A
   bracket of a single value (more ties than CAP) is cut arithmetically and
   its ties are ranked during the race;
4. one pass: ``token = argmax(e / max(q, tiny))`` over the kept tokens whose
   mass is ``>= min_p`` (the top token has mass 1, so this is min-p's
   ``probs < min_p * max(probs)``), ``q`` being the caller's Exponential(1)
   noise (``standard.exponential_noise``: seeded rows keep their own
   generators); ties of the race go to the lowest id, as ``argmax``.

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

The passes keep per-lane partial results and reduce them once at the end,
and load the next blocks while the current one is used: a program per row
leaves few warps per multiprocessor, so latency, not bandwidth, is what the
loops must hide. Cost per row: 3 to 5 reads of the row plus one of ``q``
(typical logits need one or two bracket passes).

The cumulative masses are float32 sums in a different order from the
reference's ``cumsum``; a token whose cumulative mass lies within float
round-off of ``top_p`` may fall on the other side of the cut. Counts
(top-k) are exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from framework.ops.split_k import arrival_counters, num_sms
from plugins.samplers.triton_cut import (
    INT32_MIN,
    cut_at,
    key_of,
    narrow_bracket,
    scaled,
    sorted_bracket,
    take_all_if_small,
    tie_limit_id,
    tied_mass_count,
    value_of,
)

GREEDY_EPS = tl.constexpr(1e-5)  # rows with a lower temperature are greedy (as SamplingParams)
# The fastest of benchmarks/bench_sampler.py's candidates on an H200 (N=256, V=128256), 2026-11-21.
DEFAULT_CONFIG = dict(BLOCK=2048, BLOCK_E=512, BLOCK_C=4096, CAP=2048, NUM_PIVOTS=16, num_warps=16)
# The split path's launch: CHUNK elements of a row per program (V=128256: 32 chunks), BLOCK per step.
# benchmarks/bench_sampler.py --small-n on an H200, 2026-11-21 (V=128256): 14.2-19.8 us at N = 1..32
# and 34.8 us at N = 64, against the one-program kernel's 39.2-40.1 us (68.4 at N = 64); tokens equal.
SPLIT_CONFIG = dict(CHUNK=4096, BLOCK=1024, num_warps=4)


@triton.jit
def _lse_update(m, z, v):
    """Per-lane online logsumexp: ``sum exp(seen - m) == z``, updated with ``v`` (one exp)."""
    e = tl.where(v == float("-inf"), 0.0, tl.exp(-tl.abs(v - m)))  # m == -inf, v finite: exp(-inf) = 0
    z = tl.where(v > m, z * e + 1.0, z + e)
    return tl.maximum(m, v), z


@triton.jit
def _lse_reduce(m, z):
    """(max, sum of exp(. - max)) of the lanes' online logsumexps."""
    m_all = tl.max(m, axis=0)
    ref = tl.where(m_all == float("-inf"), 0.0, m_all)
    return m_all, tl.sum(z * tl.exp(m - ref), axis=0)


@triton.jit
def _first_argmax(best_v, best_i):
    """The lowest index among the lanes holding the largest value."""
    top = tl.max(best_v, axis=0)
    return tl.min(tl.where(best_v == top, best_i, 2147483647), axis=0)


@triton.jit
def _row_temperature(temperature_ptr, row):
    """``(t, sampled, unit_t)`` of a row (greedy rows: t = 1); both paths derive them here."""
    t = tl.load(temperature_ptr + row)
    sampled = t >= GREEDY_EPS
    t = tl.where(sampled, t, 1.0)
    return t, sampled, t == 1.0


@triton.jit
def _row_stats(
    x_row, raw_row, V, t, unit_t,
    HAS_TOP_K: tl.constexpr, HAS_GREEDY: tl.constexpr, HAS_RAW: tl.constexpr, BLOCK: tl.constexpr,
):
    """Step 1, one pass kept per lane and reduced once (the next block loads while this one is used).

    Returns ``(lse, m_s, z_s, min_s, n_finite, argmax)``: the logsumexp of
    the raw row (HAS_RAW) or of x; max of s and the sum of ``exp(s - m_s)``;
    the smallest finite s and the finite count (HAS_TOP_K); the first argmax
    of x (HAS_GREEDY; else 0).
    """
    lanes = tl.arange(0, BLOCK)
    m_x = tl.full([BLOCK], float("-inf"), tl.float32)
    z_x = tl.zeros([BLOCK], tl.float32)
    m_s = tl.full([BLOCK], float("-inf"), tl.float32)
    z_s = tl.zeros([BLOCK], tl.float32)
    m_r = tl.full([BLOCK], float("-inf"), tl.float32)
    z_r = tl.zeros([BLOCK], tl.float32)
    min_s = tl.full([BLOCK], float("inf"), tl.float32)
    n_finite = tl.zeros([BLOCK], tl.int32)
    best_v = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], tl.int32)
    x_next = tl.load(x_row + lanes, mask=lanes < V, other=float("-inf"))
    if HAS_RAW:
        raw_next = tl.load(raw_row + lanes, mask=lanes < V, other=float("-inf"))
    for start in range(0, V, BLOCK):
        x = x_next
        nxt = start + BLOCK + lanes
        x_next = tl.load(x_row + nxt, mask=nxt < V, other=float("-inf"))
        m_x, z_x = _lse_update(m_x, z_x, x)
        if HAS_RAW:
            raw = raw_next
            raw_next = tl.load(raw_row + nxt, mask=nxt < V, other=float("-inf"))
            m_r, z_r = _lse_update(m_r, z_r, raw)
        if HAS_GREEDY:
            better = x > best_v  # strict: each lane keeps its first maximum
            best_i = tl.where(better, start + lanes, best_i)
            best_v = tl.where(better, x, best_v)
        s = scaled(x, t, unit_t)
        if unit_t == 0:
            m_s, z_s = _lse_update(m_s, z_s, s)
        if HAS_TOP_K:
            finite = x > float("-inf")
            min_s = tl.minimum(min_s, tl.where(finite, s, float("inf")))
            n_finite += finite.to(tl.int32)
    mx, zx = _lse_reduce(m_x, z_x)
    lse = mx + tl.log(zx)
    if HAS_RAW:
        mr, zr = _lse_reduce(m_r, z_r)
        lse = mr + tl.log(zr)
    ms, zs = _lse_reduce(m_s, z_s)
    best = tl.full([], 0, tl.int32)
    if HAS_GREEDY:
        best = _first_argmax(best_v, best_i)
    return (lse, tl.where(unit_t, mx, ms), tl.where(unit_t, zx, zs), tl.min(min_s, axis=0),
            tl.sum(n_finite, axis=0), best)  # fmt: skip


@triton.jit
def _cut(
    x_row, scratch_row, index_row, V, t, unit_t, m_s, z_s, min_s, n_finite, top_k, top_p,
    HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, CAP: tl.constexpr, NUM_PIVOTS: tl.constexpr,
):
    """Steps 2-3: the row's cut. Keep key > key(cut_v), and of the keys == key(cut_v) the first n_keep.

    Returns ``(cut_v, n_keep, n_tied, tie_limit, passes)``: NaN / 0 when
    nothing is cut; ``tie_limit`` is the last kept token id among the ties
    (INT32_MAX when the ties must be ranked during the race: a one-value
    bracket is never copied); ``passes`` counts the bracket passes.
    """
    cut_v = tl.full([], float("nan"), tl.float32)
    n_keep = tl.full([], 0, tl.int32)
    n_tied = tl.full([], 0, tl.int32)
    tie_limit = tl.full([], 2147483647, tl.int32)
    passes = tl.full([], 0, tl.int32)
    top_hi = key_of(m_s) + 1
    offs_c = tl.arange(0, CAP)
    mass_total = z_s  # mass the top-p target is a share of
    floor_key = tl.full([], INT32_MIN, tl.int32)  # the top-p cut is at or above this key
    p_pending = False
    if HAS_TOP_P:
        p_pending = top_p < 1.0
    if HAS_TOP_K:
        if top_k < n_finite:
            lo, hi, ca, ma, c, passes = narrow_bracket(
                x_row, V, t, unit_t, m_s, key_of(min_s), top_hi, top_k.to(tl.float32),
                False, HAS_TOP_P, BLOCK_E, CAP, NUM_PIVOTS)  # fmt: skip
            hi, c, ca, ma = take_all_if_small(lo, hi, ca, ma, c, top_hi, CAP)
            tied = c > CAP  # one value in the bracket
            r = sorted_bracket(x_row, V, t, unit_t, lo, hi, c, scratch_row, index_row, BLOCK_C, CAP)
            cum = ma + tl.cumsum(tl.exp(r - m_s), axis=0)
            j = top_k - 1 - ca
            e_tie = tl.exp(value_of(lo) - m_s)
            keep_tied = top_k - ca
            mass_k = tl.where(tied, ma + keep_tied.to(tl.float32) * e_tie,
                              tl.max(tl.where(offs_c == j, cum, float("-inf")), axis=0))  # fmt: skip
            if HAS_TOP_P:  # top-p on the top-k set: in this bracket, or above it (a second search)
                target = top_p * mass_k
                in_bracket = p_pending & (target > ma)
                j_p = tl.minimum(tl.sum((cum < target).to(tl.int32), axis=0), c - 1)
                j = tl.where(in_bracket, tl.minimum(j, j_p), j)
                keep_tied = tl.where(
                    in_bracket, tl.minimum(keep_tied, tied_mass_count(target, ma, e_tie, c)), keep_tied)
                p_pending = p_pending & (in_bracket == 0)
                mass_total = mass_k
                floor_key = hi
            v, kept, ties = cut_at(r, offs_c, j)
            cut_v = tl.where(tied, value_of(lo), v)
            n_keep = tl.where(tied, keep_tied, kept)
            n_tied = tl.where(tied, c, ties)
            tie_limit = tl.where(tied, 2147483647, tie_limit_id(scratch_row, index_row, c, v, kept, CAP))
    if HAS_TOP_P:
        if p_pending:
            target = top_p * mass_total
            bound = m_s + tl.log((1.0 - top_p) * mass_total / (V + 1)) - 0.05
            lo = tl.maximum(key_of(bound), floor_key)
            lo, hi, ca, ma, c, more = narrow_bracket(
                x_row, V, t, unit_t, m_s, lo, top_hi, target, True, True, BLOCK_E, CAP, NUM_PIVOTS)  # fmt: skip
            passes += more
            hi, c, ca, ma = take_all_if_small(lo, hi, ca, ma, c, top_hi, CAP)
            tied = c > CAP
            r = sorted_bracket(x_row, V, t, unit_t, lo, hi, c, scratch_row, index_row, BLOCK_C, CAP)
            cum = ma + tl.cumsum(tl.exp(r - m_s), axis=0)
            j = tl.minimum(tl.sum((cum < target).to(tl.int32), axis=0), c - 1)
            v, kept, ties = cut_at(r, offs_c, j)
            e_tie = tl.exp(value_of(lo) - m_s)
            cut_v = tl.where(tied, value_of(lo), v)
            n_keep = tl.where(tied, tied_mass_count(target, ma, e_tie, c), kept)
            n_tied = tl.where(tied, c, ties)
            tie_limit = tl.where(tied, 2147483647, tie_limit_id(scratch_row, index_row, c, v, kept, CAP))
    return cut_v, n_keep, n_tied, tie_limit, passes


@triton.jit
def _race(
    x_row, q_row, V, t, unit_t, m_s, cut_key, n_keep, n_tied, tie_limit, min_p,
    HAS_MIN_P: tl.constexpr, BLOCK: tl.constexpr,
):
    """Step 4: ``argmax(e / max(q, tiny))`` over the kept tokens (per-lane best, reduced once)."""
    lanes = tl.arange(0, BLOCK)
    rank_ties = (n_keep < n_tied) & (tie_limit == 2147483647)  # a one-value bracket: rank its ties here
    ties_seen = tl.full([], 0, tl.int32)
    best_v = tl.full([BLOCK], -1.0, tl.float32)
    best_i = tl.zeros([BLOCK], tl.int32)
    x_next = tl.load(x_row + lanes, mask=lanes < V, other=float("-inf"))
    q_next = tl.load(q_row + lanes, mask=lanes < V, other=1.0)
    for start in range(0, V, BLOCK):
        x = x_next
        q = q_next
        nxt = start + BLOCK + lanes
        x_next = tl.load(x_row + nxt, mask=nxt < V, other=float("-inf"))
        q_next = tl.load(q_row + nxt, mask=nxt < V, other=1.0)
        s = scaled(x, t, unit_t)
        key = key_of(s)
        if rank_ties:  # only the first n_keep tokens equal to the cut value, in vocabulary order
            tie = (key == cut_key).to(tl.int32)
            rank = ties_seen + tl.cumsum(tie, axis=0) - 1
            keep = (key > cut_key) | ((tie > 0) & (rank < n_keep))
            ties_seen += tl.sum(tie, axis=0)
        else:
            keep = (key > cut_key) | ((key == cut_key) & (start + lanes <= tie_limit))
        e = tl.exp(s - m_s)
        if HAS_MIN_P:
            keep = keep & (e >= min_p)
        val = tl.where(keep, e / tl.maximum(q, 1.1754943508222875e-38), 0.0)
        better = (val > best_v) & (start + lanes < V)
        best_i = tl.where(better, start + lanes, best_i)
        best_v = tl.where(better, val, best_v)
    return _first_argmax(best_v, best_i).to(tl.int64)


@triton.jit
def _filtered_sample_kernel(
    x_ptr, stride_x,  # [N, V] float32 logits (after the logits processors)
    raw_ptr, stride_raw,  # [N, V] float32 raw logits (HAS_RAW): the logsumexp is theirs
    q_ptr, stride_q,  # [N, V] float32 Exponential(1) noise
    scratch_ptr, index_ptr,  # [N, CAP] float32 and int32 work space
    temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr,  # [N] float32, int64 (1..V), float32, float32
    token_ptr,  # [N] int64 out: the sampled (greedy rows: argmax) token
    lse_ptr,  # [N] float32 out: logsumexp of the row of raw (HAS_RAW) or x
    stats_ptr,  # [N, 4] float32 out: cut value, kept ties, ties, bracket passes (tests, benchmarks)
    V,
    HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, HAS_MIN_P: tl.constexpr,
    HAS_GREEDY: tl.constexpr,  # some row may be greedy (else no argmax is kept)
    HAS_RAW: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per step of the streaming passes (statistics, race)
    BLOCK_E: tl.constexpr,  # elements per step of a bracket pass (NUM_PIVOTS x BLOCK_E comparisons)
    BLOCK_C: tl.constexpr,  # elements per step of the copy of a bracket (a prefix sum per step)
    CAP: tl.constexpr,  # most bracket elements sorted in registers (power of two)
    NUM_PIVOTS: tl.constexpr,  # pivots per bracket pass (power of two, >= 4)
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    t, sampled, unit_t = _row_temperature(temperature_ptr, row)
    lse, m_s, z_s, min_s, n_finite, best = _row_stats(
        x_row, raw_ptr + row * stride_raw, V, t, unit_t, HAS_TOP_K, HAS_GREEDY, HAS_RAW, BLOCK)
    tl.store(lse_ptr + row, lse)
    token = best.to(tl.int64)
    cut_v = tl.full([], float("nan"), tl.float32)
    n_keep = tl.full([], 0, tl.int32)
    n_tied = tl.full([], 0, tl.int32)
    passes = tl.full([], 0, tl.int32)
    if sampled & (m_s > float("-inf")):
        top_k = tl.full([], 0, tl.int32)
        top_p = tl.full([], 1.0, tl.float32)
        min_p = tl.full([], 0.0, tl.float32)
        if HAS_TOP_K:
            top_k = tl.load(top_k_ptr + row).to(tl.int32)
        if HAS_TOP_P:
            top_p = tl.load(top_p_ptr + row)
        if HAS_MIN_P:
            min_p = tl.load(min_p_ptr + row)
        cut_v, n_keep, n_tied, tie_limit, passes = _cut(
            x_row, scratch_ptr + row * CAP, index_ptr + row * CAP, V, t, unit_t, m_s, z_s, min_s, n_finite,
            top_k, top_p, HAS_TOP_K, HAS_TOP_P, BLOCK_E, BLOCK_C, CAP, NUM_PIVOTS)  # fmt: skip
        cut_key = tl.where(cut_v == cut_v, key_of(cut_v), INT32_MIN)  # NaN: no cut
        token = _race(x_row, q_ptr + row * stride_q, V, t, unit_t, m_s, cut_key, n_keep, n_tied, tie_limit,
                      min_p, HAS_MIN_P, BLOCK)  # fmt: skip
    tl.store(token_ptr + row, token)
    tl.store(stats_ptr + row * 4 + 0, cut_v)
    tl.store(stats_ptr + row * 4 + 1, n_keep.to(tl.float32))
    tl.store(stats_ptr + row * 4 + 2, n_tied.to(tl.float32))
    tl.store(stats_ptr + row * 4 + 3, passes.to(tl.float32))


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


def filtered_sample(
    x: torch.Tensor,
    q: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    *,
    raw: torch.Tensor | None = None,
    any_greedy: bool = True,
    stats: torch.Tensor | None = None,
    split: bool | None = None,
    split_config: dict | None = None,
    **config,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``x``: greedy rows take the argmax, the others race over their kept tokens.

    Args:
        x: ``[N, V]`` float32 processed logits (unit stride along V).
        q: ``[N, V]`` float32 Exponential(1) noise, same layout.
        temperature: ``[N]`` float32; below ``GREEDY_EPS`` means greedy.
        top_k: ``[N]`` int64 in ``1..V`` (V = off), or None when no row has one.
        top_p: ``[N]`` float32 (1.0 = off), or None.
        min_p: ``[N]`` float32 (0.0 = off), or None.
        raw: ``[N, V]`` float32 logits whose logsumexp to return instead of x's
            (the raw logits, when the processors changed them), or None.
        any_greedy: False when no row is greedy (the argmax is then not kept).
        stats: optional ``[N, 4]`` float32 filled with each row's cut value,
            kept and total ties at it, and bracket passes (NaN/0 for greedy rows).
        split: None (default): the split-vocabulary path when ``use_split_path``
            says so; True / False force it or the one-program kernel (tests,
            benchmarks). True with top_k or top_p is an error.
        split_config: overrides of ``SPLIT_CONFIG`` (the split path's launch).
        config: overrides of ``DEFAULT_CONFIG`` (the one-program kernel's launch).
    Returns:
        ``(token_ids [N] int64, logsumexp of each row of raw, or of x [N] float32)``.
    """
    n, vocab = x.shape
    cfg = {**DEFAULT_CONFIG, **config}
    tokens = torch.empty(n, dtype=torch.int64, device=x.device)
    lse = torch.empty(n, dtype=torch.float32, device=x.device)
    if stats is None:
        stats = torch.empty(n, 4, dtype=torch.float32, device=x.device)
    if n == 0:
        return tokens, lse
    for t in (x, q) if raw is None else (x, q, raw):
        assert t.shape == x.shape and t.stride(1) == 1 and t.dtype == torch.float32
    if split is None:
        split = use_split_path(n, top_k, top_p, x.device)
    if split:
        if top_k is not None or top_p is not None:
            raise ValueError("the split path samples rows without top-k / top-p only")
        _split_sample(x, q, temperature, min_p, raw, any_greedy, tokens, lse, stats, **(split_config or {}))
        return tokens, lse
    scratch = torch.empty(n, cfg["CAP"], dtype=torch.float32, device=x.device)
    index = torch.empty(n, cfg["CAP"], dtype=torch.int32, device=x.device)
    _filtered_sample_kernel[(n,)](
        x, x.stride(0),
        raw if raw is not None else x, raw.stride(0) if raw is not None else 0,
        q, q.stride(0), scratch, index,
        temperature,
        top_k if top_k is not None else temperature,  # unread when the flag is off
        top_p if top_p is not None else temperature,
        min_p if min_p is not None else temperature,
        tokens, lse, stats, vocab,
        HAS_TOP_K=top_k is not None, HAS_TOP_P=top_p is not None, HAS_MIN_P=min_p is not None,
        HAS_GREEDY=any_greedy, HAS_RAW=raw is not None,
        **cfg,
    )  # fmt: skip
    return tokens, lse


def use_split_path(n: int, top_k: torch.Tensor | None, top_p: torch.Tensor | None, device: torch.device) -> bool:
    """Whether ``filtered_sample`` takes the split-vocabulary path (host-side: shapes and flags only).

    Rows without top-k / top-p, and at most half as many rows as the device
    has multiprocessors: the one-program kernel's time per launch is the
    time of one row on one SM whatever N is up to there, while the split
    path's grows with N's bytes spread over every SM (an estimate of where
    they cross; ``benchmarks/bench_sampler.py --small-n`` times both).
    """
    return top_k is None and top_p is None and 2 * n <= num_sms(device)


def _split_sample(x, q, temperature, min_p, raw, any_greedy, tokens, lse, stats, **overrides) -> None:
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
