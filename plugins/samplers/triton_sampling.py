"""Temperature, top-k, top-p and min-p sampling without sorting the vocabulary (Triton).

One program samples one row of ``[N, V]`` logits. It finds the row's cut --
the value ``v`` of the last token kept by top-k / top-p and how many of the
tokens equal to ``v`` are kept -- by narrowing a bracket of values, never by
sorting V = 128k numbers, then runs the exponential race of
``standard._exponential_race`` over the kept tokens. The rule is the one of
``standard._apply_top_k_top_p`` (the torch reference), with the tokens tied
at the cut taken in vocabulary order (lowest id first), as a stable sort
ranks them.

Per row (``s = x / temperature``; mass ``e = exp(s - max s)``, so the top
token has mass 1):

1. one pass: ``max x``, ``sum exp(x - max x)`` (the row's logsumexp, returned
   for the raw-logprob path), the same for ``s``, ``min s`` over finite
   values, the finite count and ``argmax x`` (greedy rows stop here);
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
   or above ``lo`` fits) they are copied to a per-row scratch row, sorted in
   registers and the cut is read off their cumulative count / mass exactly
   as the reference does on the full sort. A bracket of a single value
   (ties) is cut arithmetically;
4. one pass: ``token = argmax(e / max(q, tiny))`` over the kept tokens whose
   mass is ``>= min_p`` (the top token has mass 1, so this is min-p's
   ``probs < min_p * max(probs)``), ``q`` being the caller's Exponential(1)
   noise (``standard.exponential_noise``: seeded rows keep their own
   generators).

Cost per row: 3 to 5 reads of the row plus one of ``q`` (typical logits need
one bracket pass; flat ones two), against a full sort of ``[N, V]``.

The cumulative masses are float32 sums in a different order from the
reference's ``cumsum``; a token whose cumulative mass lies within float
round-off of ``top_p`` may fall on the other side of the cut. Counts
(top-k) are exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GREEDY_EPS = tl.constexpr(1e-5)  # rows with a lower temperature are greedy (as SamplingParams)
MAX_PASSES = tl.constexpr(64)  # bracket passes per search; 33 always suffice (see the module docstring)
_INT32_MIN = tl.constexpr(-2147483648)
DEFAULT_CONFIG = dict(BLOCK=4096, BLOCK_E=1024, CAP=2048, NUM_PIVOTS=16, STAGES=1, num_warps=8)


@triton.jit
def _key(s):
    """Order-preserving int32 key of float32 ``s`` (``-0.0`` counted as ``+0.0``): s < t <=> key(s) < key(t)."""
    b = tl.where(s == 0.0, 0.0, s).to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _value(key):
    """The float32 whose key is ``key`` (the inverse of ``_key``)."""
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _scale(x, t, unit_t):
    """``x / t`` rounded as torch rounds it (IEEE division; none when ``t == 1``)."""
    if unit_t:
        s = x
    else:
        s = tl.math.div_rn(x, tl.full(x.shape, 0.0, tl.float32) + t)
    return s


@triton.jit
def _bracket(
    x_row, V, t, unit_t, m_s,  # the row, its length, temperature (and t == 1), max of s
    lo, hi,  # int32 keys: the cut is in [lo, hi); F(lo) >= target
    target,  # float32: count (exact up to 2**24) or mass
    BY_MASS: tl.constexpr,  # the target is a mass (top-p), else a count (top-k)
    TRACK_MASS: tl.constexpr,  # sum the mass even so (ma is needed after a count search when top-p follows)
    BLOCK_E: tl.constexpr, CAP: tl.constexpr, NUM_PIVOTS: tl.constexpr, STAGES: tl.constexpr,
):
    """Narrow ``[lo, hi)`` until it holds at most CAP elements or one key.

    F(key) = count (or mass) of the elements with a key >= ``key``. Returns
    ``lo, hi, ca, ma, c, passes``: the final bracket, the count and mass of
    the elements at or above ``hi`` (all kept), the count in the bracket and
    the number of passes over the row.
    """
    ca = tl.full([], 0, tl.int32)
    ma = tl.full([], 0.0, tl.float32)
    c = tl.full([], 0, tl.int32)  # set by the first pass, which always runs
    passes = tl.full([], 0, tl.int32)
    j = tl.arange(0, NUM_PIVOTS)
    frac = (j - 1).to(tl.float32) / (NUM_PIVOTS - 1)  # j >= 2: evenly spaced values in (lo, hi)
    while (passes == 0) | ((c > CAP) & (hi.to(tl.int64) - lo.to(tl.int64) > 1) & (passes < MAX_PASSES)):
        lo_v = _value(lo)
        hi_v = _value(hi)
        mid = (lo.to(tl.int64) + (hi.to(tl.int64) - lo.to(tl.int64)) // 2).to(tl.int32)
        pk = tl.where(j == 0, lo, tl.where(j == 1, mid, _key(lo_v + (hi_v - lo_v) * frac)))
        pk = tl.minimum(tl.maximum(pk, lo), hi - 1)  # NaN/inf pivots of a huge span land on the ends
        cnt = tl.zeros([NUM_PIVOTS], dtype=tl.int32)
        mass = tl.zeros([NUM_PIVOTS], dtype=tl.float32)
        for start in tl.range(0, V, BLOCK_E, num_stages=STAGES):
            offs = start + tl.arange(0, BLOCK_E)
            s = _scale(tl.load(x_row + offs, mask=offs < V, other=float("-inf")), t, unit_t)
            k = _key(s)
            inside = (offs < V) & (k >= lo) & (k < hi)
            k = tl.where(inside, k, _INT32_MIN)  # below every pivot (pivots >= lo > key(-inf))
            ge = k[:, None] >= pk[None, :]
            cnt += tl.sum(ge.to(tl.int32), axis=0)
            if TRACK_MASS:
                e = tl.where(inside, tl.exp(s - m_s), 0.0)
                mass += tl.sum(tl.where(ge, e[:, None], 0.0), axis=0)
        if BY_MASS:
            reached = (ma + mass) >= target
        else:
            reached = (ca + cnt).to(tl.float32) >= target
        reached = reached | (j == 0)  # F(lo) >= target is the invariant
        new_lo = tl.max(tl.where(reached, pk, lo), axis=0)
        new_hi = tl.min(tl.where(reached, hi, pk), axis=0)
        c_lo = tl.max(tl.where(pk == new_lo, cnt, 0), axis=0)
        c_hi = tl.max(tl.where(pk == new_hi, cnt, 0), axis=0)  # 0 when hi did not move
        ma += tl.max(tl.where(pk == new_hi, mass, 0.0), axis=0)
        ca += c_hi
        c = c_lo - c_hi
        lo = new_lo
        hi = new_hi
        passes += 1
    return lo, hi, ca, ma, c, passes


@triton.jit
def _take_all_if_small(lo, hi, ca, ma, c, top_hi, CAP: tl.constexpr):
    """When everything at or above ``lo`` fits in CAP, widen the bracket to it (then top-p needs no second search)."""
    small = ca + c <= CAP
    return tl.where(small, top_hi, hi), tl.where(small, ca + c, c), tl.where(small, 0, ca), tl.where(small, 0.0, ma)


@triton.jit
def _sorted_bracket(
    x_row, V, t, unit_t, lo, hi, n, scratch_row, BLOCK: tl.constexpr, CAP: tl.constexpr, STAGES: tl.constexpr
):
    """The ``n <= CAP`` values of s with a key in ``[lo, hi)``, sorted descending, padded with -inf.

    ``n > CAP`` (a bracket of one tied value): no copy, all -inf.
    """
    tl.debug_barrier()  # the scratch row may still be read by an earlier stage
    if n <= CAP:
        written = tl.full([], 0, tl.int32)
        for start in tl.range(0, V, BLOCK, num_stages=STAGES):
            offs = start + tl.arange(0, BLOCK)
            s = _scale(tl.load(x_row + offs, mask=offs < V, other=float("-inf")), t, unit_t)
            k = _key(s)
            inside = ((offs < V) & (k >= lo) & (k < hi)).to(tl.int32)
            pos = written + tl.cumsum(inside, axis=0) - 1
            tl.store(scratch_row + pos, s, mask=(inside > 0) & (pos < CAP))
            written += tl.sum(inside, axis=0)
    tl.debug_barrier()  # the copies are read by other threads
    offs = tl.arange(0, CAP)
    r = tl.load(scratch_row + offs, mask=offs < tl.where(n <= CAP, n, 0), other=float("-inf"))
    return tl.sort(r, descending=True)


@triton.jit
def _cut_at(r, offs, j):
    """Cut after position ``j`` of the sorted bracket ``r``: (value, kept ties, ties in the bracket)."""
    v = tl.max(tl.where(offs == j, r, float("-inf")), axis=0)
    n_greater = tl.sum((r > v).to(tl.int32), axis=0)
    n_tied = tl.sum((r == v).to(tl.int32), axis=0)
    return v, j + 1 - n_greater, n_tied


@triton.jit
def _tied_mass_count(target, ma, e_tie, n):
    """Tokens of one tied value (mass ``e_tie`` each, ``n`` of them) kept by a mass cut: ceil((target - ma) / e_tie)."""
    need = tl.minimum(tl.ceil((target - ma) / e_tie), n.to(tl.float32))  # e_tie == 0: inf -> n
    return tl.maximum(need, 1.0).to(tl.int32)


@triton.jit
def _filtered_sample_kernel(
    x_ptr, stride_x,  # [N, V] float32 logits (after the logits processors)
    q_ptr, stride_q,  # [N, V] float32 Exponential(1) noise
    scratch_ptr,  # [N, CAP] float32 work space
    temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr,  # [N] float32, int64 (1..V), float32, float32
    token_ptr,  # [N] int64 out: the sampled (greedy rows: argmax) token
    lse_ptr,  # [N] float32 out: logsumexp of the row of x (no temperature)
    stats_ptr,  # [N, 4] float32 out: cut value, kept ties, ties, bracket passes (tests, benchmarks)
    V,
    HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, HAS_MIN_P: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per step of the streaming passes (statistics, copy, race)
    BLOCK_E: tl.constexpr,  # elements per step of a bracket pass (BLOCK_E x NUM_PIVOTS comparisons)
    CAP: tl.constexpr,  # most bracket elements sorted in registers (power of two)
    NUM_PIVOTS: tl.constexpr,  # pivots per bracket pass (power of two, >= 4)
    STAGES: tl.constexpr,  # software-pipelining depth of the streaming passes' loads
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    scratch_row = scratch_ptr + row * CAP
    t = tl.load(temperature_ptr + row)
    sampled = t >= GREEDY_EPS
    t = tl.where(sampled, t, 1.0)
    unit_t = t == 1.0

    # 1. row statistics: online max / sum of exp for x and s, min finite s, finite count, argmax
    m_x = tl.full([], float("-inf"), tl.float32)
    z_x = tl.full([], 0.0, tl.float32)
    m_s = tl.full([], float("-inf"), tl.float32)
    z_s = tl.full([], 0.0, tl.float32)
    min_s = tl.full([], float("inf"), tl.float32)
    n_finite = tl.full([], 0, tl.int32)
    best = tl.full([], 0, tl.int32)
    for start in tl.range(0, V, BLOCK, num_stages=STAGES):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < V, other=float("-inf"))
        s = _scale(x, t, unit_t)
        block_max = tl.max(x, axis=0)
        best = tl.where(block_max > m_x, start + tl.argmax(x, axis=0), best)  # first index of the max
        new_m = tl.maximum(m_x, block_max)
        ref = tl.where(new_m == float("-inf"), 0.0, new_m)
        z_x = z_x * tl.exp(m_x - ref) + tl.sum(tl.exp(x - ref), axis=0)
        m_x = new_m
        new_m = tl.maximum(m_s, tl.max(s, axis=0))
        ref = tl.where(new_m == float("-inf"), 0.0, new_m)
        z_s = z_s * tl.exp(m_s - ref) + tl.sum(tl.exp(s - ref), axis=0)
        m_s = new_m
        finite = x > float("-inf")
        min_s = tl.minimum(min_s, tl.min(tl.where(finite, s, float("inf")), axis=0))
        n_finite += tl.sum(finite.to(tl.int32), axis=0)
    tl.store(lse_ptr + row, m_x + tl.log(z_x))

    token = best.to(tl.int64)
    cut_v = tl.full([], float("nan"), tl.float32)
    n_keep = tl.full([], 0, tl.int32)
    n_tied = tl.full([], 0, tl.int32)
    passes = tl.full([], 0, tl.int32)
    if sampled & (m_s > float("-inf")):
        # 2-3. the cut: keep key > cut_key, and the first n_keep of the n_tied keys == cut_key
        cut_key = tl.full([], _INT32_MIN, tl.int32)  # keep everything
        top_hi = _key(m_s) + 1
        offs_c = tl.arange(0, CAP)
        mass_total = z_s  # mass the top-p target is a share of
        floor_key = tl.full([], _INT32_MIN, tl.int32)  # the top-p cut is at or above this key
        p_pending = False
        if HAS_TOP_P:
            top_p = tl.load(top_p_ptr + row)
            p_pending = top_p < 1.0
        if HAS_TOP_K:
            top_k = tl.load(top_k_ptr + row).to(tl.int32)
            if top_k < n_finite:
                lo, hi, ca, ma, c, passes = _bracket(
                    x_row, V, t, unit_t, m_s, _key(min_s), top_hi, top_k.to(tl.float32),
                    False, HAS_TOP_P, BLOCK_E, CAP, NUM_PIVOTS, STAGES)  # fmt: skip
                hi, c, ca, ma = _take_all_if_small(lo, hi, ca, ma, c, top_hi, CAP)
                tied = c > CAP  # one value in the bracket
                r = _sorted_bracket(x_row, V, t, unit_t, lo, hi, c, scratch_row, BLOCK, CAP, STAGES)
                cum = ma + tl.cumsum(tl.exp(r - m_s), axis=0)
                j = top_k - 1 - ca
                e_tie = tl.exp(_value(lo) - m_s)
                keep_tied = top_k - ca
                mass_k = tl.where(tied, ma + keep_tied.to(tl.float32) * e_tie,
                                  tl.max(tl.where(offs_c == j, cum, float("-inf")), axis=0))  # fmt: skip
                if HAS_TOP_P:
                    target = top_p * mass_k
                    in_bracket = p_pending & (target > ma)
                    j_p = tl.minimum(tl.sum((cum < target).to(tl.int32), axis=0), c - 1)
                    j = tl.where(in_bracket, tl.minimum(j, j_p), j)
                    keep_tied = tl.where(
                        in_bracket, tl.minimum(keep_tied, _tied_mass_count(target, ma, e_tie, c)), keep_tied)
                    p_pending = p_pending & (in_bracket == 0)
                    mass_total = mass_k
                    floor_key = hi
                v, kept, ties = _cut_at(r, offs_c, j)
                cut_v = tl.where(tied, _value(lo), v)
                n_keep = tl.where(tied, keep_tied, kept)
                n_tied = tl.where(tied, c, ties)
                cut_key = _key(cut_v)
        if HAS_TOP_P:
            if p_pending:
                target = top_p * mass_total
                bound = m_s + tl.log((1.0 - top_p) * mass_total / (V + 1)) - 0.05
                lo = tl.maximum(_key(bound), floor_key)
                lo, hi, ca, ma, c, more = _bracket(
                    x_row, V, t, unit_t, m_s, lo, top_hi, target, True, True, BLOCK_E, CAP, NUM_PIVOTS, STAGES)  # fmt: skip
                passes += more
                hi, c, ca, ma = _take_all_if_small(lo, hi, ca, ma, c, top_hi, CAP)
                tied = c > CAP
                r = _sorted_bracket(x_row, V, t, unit_t, lo, hi, c, scratch_row, BLOCK, CAP, STAGES)
                cum = ma + tl.cumsum(tl.exp(r - m_s), axis=0)
                j = tl.minimum(tl.sum((cum < target).to(tl.int32), axis=0), c - 1)
                v, kept, ties = _cut_at(r, offs_c, j)
                e_tie = tl.exp(_value(lo) - m_s)
                cut_v = tl.where(tied, _value(lo), v)
                n_keep = tl.where(tied, _tied_mass_count(target, ma, e_tie, c), kept)
                n_tied = tl.where(tied, c, ties)
                cut_key = _key(cut_v)

        # 4. the exponential race over the kept tokens
        if HAS_MIN_P:
            min_p = tl.load(min_p_ptr + row)
        q_row = q_ptr + row * stride_q
        rank_ties = n_keep < n_tied
        ties_seen = tl.full([], 0, tl.int32)
        best_val = tl.full([], -1.0, tl.float32)
        for start in tl.range(0, V, BLOCK, num_stages=STAGES):
            offs = start + tl.arange(0, BLOCK)
            s = _scale(tl.load(x_row + offs, mask=offs < V, other=float("-inf")), t, unit_t)
            key = _key(s)
            if rank_ties:  # only the first n_keep tokens equal to the cut value, in vocabulary order
                tie = (key == cut_key).to(tl.int32)
                rank = ties_seen + tl.cumsum(tie, axis=0) - 1
                keep = (key > cut_key) | ((tie > 0) & (rank < n_keep))
                ties_seen += tl.sum(tie, axis=0)
            else:
                keep = key >= cut_key
            e = tl.exp(s - m_s)
            if HAS_MIN_P:
                keep = keep & (e >= min_p)
            q = tl.maximum(tl.load(q_row + offs, mask=offs < V, other=1.0), 1.1754943508222875e-38)
            val = tl.where(keep & (offs < V), e / q, 0.0)
            block_max = tl.max(val, axis=0)
            token = tl.where(block_max > best_val, (start + tl.argmax(val, axis=0)).to(tl.int64), token)
            best_val = tl.maximum(best_val, block_max)
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
    stats: torch.Tensor | None = None,
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
        stats: optional ``[N, 4]`` float32 filled with each row's cut value,
            kept and total ties at it, and bracket passes (NaN/0 for greedy rows).
        config: overrides of ``DEFAULT_CONFIG`` (benchmarks).
    Returns:
        ``(token_ids [N] int64, logsumexp of each row of x [N] float32)``.
    """
    n, vocab = x.shape
    cfg = {**DEFAULT_CONFIG, **config}
    tokens = torch.empty(n, dtype=torch.int64, device=x.device)
    lse = torch.empty(n, dtype=torch.float32, device=x.device)
    if stats is None:
        stats = torch.empty(n, 4, dtype=torch.float32, device=x.device)
    if n == 0:
        return tokens, lse
    assert x.stride(1) == 1 and q.stride(1) == 1 and q.shape == x.shape and x.dtype == torch.float32
    scratch = torch.empty(n, cfg["CAP"], dtype=torch.float32, device=x.device)
    _filtered_sample_kernel[(n,)](
        x, x.stride(0), q, q.stride(0), scratch,
        temperature,
        top_k if top_k is not None else temperature,  # unread when the flag is off
        top_p if top_p is not None else temperature,
        min_p if min_p is not None else temperature,
        tokens, lse, stats, vocab,
        HAS_TOP_K=top_k is not None, HAS_TOP_P=top_p is not None, HAS_MIN_P=min_p is not None,
        **cfg,
    )  # fmt: skip
    return tokens, lse
