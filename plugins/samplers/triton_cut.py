"""The cut of one row for top-k / top-p, found by narrowing a bracket of values (Triton helpers).

Used by ``triton_sampling``'s kernel, one program per row; ``s`` is the
row's temperature-scaled logits and ``e = exp(s - max s)`` their mass.

The cut lies in a bracket ``[lo, hi)`` of order-preserving int32 keys of
``s`` (``key_of``); the elements at or above ``hi`` are kept for sure, and
their count and mass are carried. ``narrow_bracket`` evaluates the count
(and mass) at or above ``NUM_PIVOTS`` pivots in one pass over the row --
``lo`` itself, the key-space midpoint (so the key range at least halves: at
most 33 passes) and values evenly spaced between ``lo`` and ``hi`` (which do
the real work on logits) -- and keeps the sub-bracket where the target
(a count for top-k, a mass for top-p) is crossed, until at most ``CAP``
elements are left or the bracket holds one value. ``sorted_bracket`` then
copies the bracket, in vocabulary order with its token ids, to a per-row
scratch row and returns it sorted, so the cut is read off the cumulative
count / mass exactly as the reference reads it off a full sort
(``cut_at``); ``tie_limit_id`` names the last tied token kept. A bracket of
one value with more than ``CAP`` elements is cut arithmetically
(``tied_mass_count``).
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_PASSES = tl.constexpr(64)  # bracket passes per search; 33 always suffice (see the module docstring)
INT32_MIN = tl.constexpr(-2147483648)


@triton.jit
def key_of(s):
    """Order-preserving int32 key of float32 ``s`` (``-0.0`` counted as ``+0.0``): s < t <=> key(s) < key(t)."""
    b = tl.where(s == 0.0, 0.0, s).to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def value_of(key):
    """The float32 whose key is ``key`` (the inverse of ``key_of``)."""
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def scaled(x, t, unit_t):
    """``x / t`` rounded as torch rounds it (IEEE division; none when ``t == 1``)."""
    if unit_t:
        s = x
    else:
        s = tl.math.div_rn(x, tl.full(x.shape, 0.0, tl.float32) + t)
    return s


@triton.jit
def narrow_bracket(
    x_row, V, t, unit_t, m_s,  # the row, its length, temperature (and t == 1), max of s
    lo, hi,  # int32 keys: the cut is in [lo, hi); F(lo) >= target
    target,  # float32: count (exact up to 2**24) or mass
    BY_MASS: tl.constexpr,  # the target is a mass (top-p), else a count (top-k)
    TRACK_MASS: tl.constexpr,  # sum the mass even so (ma is needed after a count search when top-p follows)
    BLOCK_E: tl.constexpr, CAP: tl.constexpr, NUM_PIVOTS: tl.constexpr,
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
    lanes = tl.arange(0, BLOCK_E)[None, :]
    while (passes == 0) | ((c > CAP) & (hi.to(tl.int64) - lo.to(tl.int64) > 1) & (passes < MAX_PASSES)):
        lo_v = value_of(lo)
        hi_v = value_of(hi)
        mid = (lo.to(tl.int64) + (hi.to(tl.int64) - lo.to(tl.int64)) // 2).to(tl.int32)
        pk = tl.where(j == 0, lo, tl.where(j == 1, mid, key_of(lo_v + (hi_v - lo_v) * frac)))
        pk = tl.minimum(tl.maximum(pk, lo), hi - 1)  # NaN/inf pivots of a huge span land on the ends
        # Per-lane partial sums ([pivot, lane]), reduced once after the pass: no
        # cross-thread traffic inside the loop (the row is read as [1, BLOCK_E]
        # so that it broadcasts against the pivots without a layout change),
        # and the blocks up to three steps ahead are already being loaded.
        pivots = pk[:, None]
        acc_cnt = tl.zeros([NUM_PIVOTS, BLOCK_E], dtype=tl.float32)  # counts: exact in float32 up to 2**24
        acc_mass = tl.zeros([NUM_PIVOTS, BLOCK_E], dtype=tl.float32)
        x_a = tl.load(x_row + lanes, mask=lanes < V, other=float("-inf"))
        x_b = tl.load(x_row + BLOCK_E + lanes, mask=BLOCK_E + lanes < V, other=float("-inf"))
        x_c = tl.load(x_row + 2 * BLOCK_E + lanes, mask=2 * BLOCK_E + lanes < V, other=float("-inf"))
        for start in range(0, V, BLOCK_E):
            x = x_a
            x_a = x_b
            x_b = x_c
            nxt = start + 3 * BLOCK_E + lanes
            x_c = tl.load(x_row + nxt, mask=nxt < V, other=float("-inf"))
            s = scaled(x, t, unit_t)
            k = key_of(s)
            inside = (k >= lo) & (k < hi)  # the -inf padding is below lo
            ge = tl.where(inside, k, INT32_MIN) >= pivots  # [NUM_PIVOTS, BLOCK_E]; pivots >= lo > key(-inf)
            acc_cnt += tl.where(ge, 1.0, 0.0)
            if TRACK_MASS:
                e = tl.where(inside, tl.exp(s - m_s), 0.0)
                acc_mass += tl.where(ge, e, 0.0)
        cnt = tl.sum(acc_cnt, axis=1).to(tl.int32)
        mass = tl.sum(acc_mass, axis=1)
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
def take_all_if_small(lo, hi, ca, ma, c, top_hi, CAP: tl.constexpr):
    """When everything at or above ``lo`` fits in CAP, widen the bracket to it (then top-p needs no second search)."""
    small = ca + c <= CAP
    return tl.where(small, top_hi, hi), tl.where(small, ca + c, c), tl.where(small, 0, ca), tl.where(small, 0.0, ma)


@triton.jit
def sorted_bracket(
    x_row, V, t, unit_t, lo, hi, n, scratch_row, index_row, BLOCK_C: tl.constexpr, CAP: tl.constexpr
):
    """The ``n <= CAP`` values of s with a key in ``[lo, hi)``, sorted descending, padded with -inf.

    They are also left in the scratch row in vocabulary order, with their
    token ids in the index row (for ``tie_limit_id``). ``n > CAP`` (a bracket
    of one tied value): no copy, all -inf.
    """
    tl.debug_barrier()  # the scratch row may still be read by an earlier stage
    if n <= CAP:
        written = tl.full([], 0, tl.int32)
        lanes = tl.arange(0, BLOCK_C)
        x_next = tl.load(x_row + lanes, mask=lanes < V, other=float("-inf"))
        for start in range(0, V, BLOCK_C):
            x = x_next
            nxt = start + BLOCK_C + lanes
            x_next = tl.load(x_row + nxt, mask=nxt < V, other=float("-inf"))
            s = scaled(x, t, unit_t)
            k = key_of(s)
            inside = ((k >= lo) & (k < hi)).to(tl.int32)  # the -inf padding is below lo
            pos = written + tl.cumsum(inside, axis=0) - 1
            tl.store(scratch_row + pos, s, mask=(inside > 0) & (pos < CAP))
            tl.store(index_row + pos, start + lanes, mask=(inside > 0) & (pos < CAP))
            written += tl.sum(inside, axis=0)
    tl.debug_barrier()  # the copies are read by other threads
    offs = tl.arange(0, CAP)
    r = tl.load(scratch_row + offs, mask=offs < tl.where(n <= CAP, n, 0), other=float("-inf"))
    return tl.sort(r, descending=True)


@triton.jit
def tie_limit_id(scratch_row, index_row, n, v, n_keep, CAP: tl.constexpr):
    """Token id of the ``n_keep``-th copied value equal to ``v``, in vocabulary order (the last tie kept)."""
    offs = tl.arange(0, CAP)
    valid = offs < n
    vals = tl.load(scratch_row + offs, mask=valid, other=float("-inf"))
    ids = tl.load(index_row + offs, mask=valid, other=0)
    tie = (valid & (vals == v)).to(tl.int32)
    rank = tl.cumsum(tie, axis=0)  # 1-based among the ties
    return tl.max(tl.where((tie > 0) & (rank <= n_keep), ids, -1), axis=0)


@triton.jit
def cut_at(r, offs, j):
    """Cut after position ``j`` of the sorted bracket ``r``: (value, kept ties, ties in the bracket)."""
    v = tl.max(tl.where(offs == j, r, float("-inf")), axis=0)
    n_greater = tl.sum((r > v).to(tl.int32), axis=0)
    n_tied = tl.sum((r == v).to(tl.int32), axis=0)
    return v, j + 1 - n_greater, n_tied


@triton.jit
def tied_mass_count(target, ma, e_tie, n):
    """Tokens of one tied value (mass ``e_tie`` each, ``n`` of them) kept by a mass cut: ceil((target - ma) / e_tie)."""
    need = tl.minimum(tl.ceil((target - ma) / e_tie), n.to(tl.float32))  # e_tie == 0: inf -> n
    return tl.maximum(need, 1.0).to(tl.int32)
