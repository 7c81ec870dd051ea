"""The epilogues of the int4 tensor-core kernel (``plugins.quant.int4_mma``): where each fragment slot's sum
goes in the output, the outputs of a tile (plain, paired halves back in order, or ``silu(gate) * up``), and
the sum of split-K partials from the fragment-ordered workspace."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def out_index(rb, M, N, NB, cb):
    """Output element (n, m) of each of a row-block tile's fragment slots ``[R, 128]`` (slot 4 lane + i holds
    D[i] of that lane's mma: rows 16 rb + lane // 4 (+ 8 for i >= 2), x row 8 cb + 2 (lane % 4) + i % 2),
    and the mask of the ones inside the output."""
    ci = tl.arange(0, 128)
    li = ci // 4
    i = ci % 4
    n = rb[:, None] * 16 + (li // 4)[None, :] + (8 * (i // 2))[None, :]
    m = (8 * cb + 2 * (li % 4) + i % 2)[None, :]
    return m * N + n, (rb < NB)[:, None] & (m < M)


@triton.jit
def store_tile(out_ptr, y, rb0, M, N, NB, cb, R: tl.constexpr, PAIRED: tl.constexpr, GATED: tl.constexpr):
    """Store the outputs ``y [R, 128]`` (fragment slots) of row blocks ``rb0 .. rb0 + R - 1``. PAIRED: the layout
    interleaves the two halves of the rows (block 2 j is block j of the first half, 2 j + 1 block j of the
    second): written back in the checkpoint's order, or, GATED, as ``silu(first) * second`` ([M, N / 2]: the
    SwiGLU gate, rounded as the projection's output and ``SiluAndMul`` round)."""
    if GATED:
        pair = tl.reshape(y, (R // 2, 2, 128))
        half = tl.reshape(tl.arange(0, 2), (1, 2, 1))
        dt = out_ptr.dtype.element_ty
        gate = tl.sum(tl.where(half == 0, pair, 0.0), axis=1).to(dt).to(tl.float32)
        up = tl.sum(tl.where(half == 1, pair, 0.0), axis=1).to(dt).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        offs, mask = out_index(rb0 // 2 + tl.arange(0, R // 2), M, N // 2, NB // 2, cb)
        tl.store(out_ptr + offs, (silu * up).to(dt), mask=mask)
    else:
        rb = rb0 + tl.arange(0, R)
        if PAIRED:
            offs, mask = out_index(tl.where(rb % 2 == 0, rb // 2, NB // 2 + rb // 2), M, N, NB, cb)
            mask = mask & (rb < NB)[:, None]
        else:
            offs, mask = out_index(rb, M, N, NB, cb)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def write_out(ws_ptr, out_ptr, tile, M, N, NB, num_splits, R: tl.constexpr, U: tl.constexpr, MB: tl.constexpr,
               PAIRED: tl.constexpr = False, GATED: tl.constexpr = False):  # fmt: skip
    """out[m, n] for the tile's rows: the fragment-ordered partials of every split and unroll slot, summed in
    order. ws: fp32 [S, tiles, MB, R, 128 U]; element (cb, r, 128 u + 4 lane + i) is D[i] of that lane's
    mma for column block cb (rows 8 cb.. of x) and row block r."""
    ci = tl.arange(0, 128)
    rb = tile * R + tl.arange(0, R)
    tiles = tl.num_programs(0)
    for cb in tl.static_range(MB):
        _, live = out_index(rb, M, N, NB, cb)
        y = tl.zeros([R, 128], dtype=tl.float32)
        for s in range(num_splits):
            base = ws_ptr + (((s * tiles + tile) * MB + cb) * R) * (128 * U)
            for uu in tl.static_range(U):
                y += tl.load(base + tl.arange(0, R)[:, None] * (128 * U) + uu * 128 + ci[None, :], mask=live,
                             other=0.0, cache_modifier=".cg")  # fmt: skip
        store_tile(out_ptr, y, tile * R, M, N, NB, cb, R, PAIRED, GATED)


@triton.jit(do_not_specialize=["M", "num_splits"])
def mma_out_kernel(ws_ptr, out_ptr, M, N, num_splits, R: tl.constexpr, U: tl.constexpr, MB: tl.constexpr,
                    PAIRED: tl.constexpr = False, GATED: tl.constexpr = False):  # fmt: skip
    write_out(ws_ptr, out_ptr, tl.program_id(0), M, N, N // 16, num_splits, R, U, MB, PAIRED, GATED)
