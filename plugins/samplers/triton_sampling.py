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

Few rows without top-k / top-p take the split-vocabulary path instead
(``triton_split_sample``): programs over (row, vocabulary chunk), with the
same per-element arithmetic, so the same tokens.

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
        split: None (default): the split-vocabulary path when ``triton_split_sample.use_split_path``
            says so; True / False force it or the one-program kernel (tests,
            benchmarks). True with top_k or top_p is an error.
        split_config: overrides of ``triton_split_sample.SPLIT_CONFIG`` (the split path's launch).
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
    from plugins.samplers import triton_split_sample  # it builds on this module's helpers

    if split is None:
        split = triton_split_sample.use_split_path(n, top_k, top_p, x.device)
    if split:
        if top_k is not None or top_p is not None:
            raise ValueError("the split path samples rows without top-k / top-p only")
        triton_split_sample.split_sample(x, q, temperature, min_p, raw, any_greedy, tokens, lse, stats,
                                         **(split_config or {}))  # fmt: skip
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
