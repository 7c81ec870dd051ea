"""int4 weight-only linears for decode steps of few rows (up to 64), on the tensor cores (Marlin-style).

The packed weights are reordered once at load time (``repack``) so that each
thread's 32-bit word holds exactly the eight 4-bit codes of its share of one
``mma.m16n8k16`` A fragment. The kernel then never converts a layout: a warp
loads 16 bytes a lane (four k-blocks of one 16-row block, coalesced), turns
each word into four bf16x2 (or f16x2) registers with one ``lop3`` a pair
(``(w >> 4i) & 0x000F000F | magic`` is ``magic + q`` in both halves), takes off
``magic + zero`` and multiplies by the scale with packed 16-bit arithmetic
(both exact but for the one rounding of ``(q - z) * s``, the rounding the
reference dequantization makes), and issues the ``mma`` with the activations
as the B operand (column ``m`` of B is row ``m`` of x: 8 rows a column block,
up to 8 blocks, all served by one pass over the weights; fp32 accumulation).
That, and the loads of activations and scale words a step ahead, is inline PTX
(``tl.inline_asm_elementwise`` with ``pack=4``: one invocation per thread and
per four words) inside a Triton loop whose tensors all have one layout, so it
runs on CUDA only (sm_80 and newer) in the engine. On CPU tensors (the Triton
interpreter) ``int4_mma_emulated.emulated_step`` does the asm's arithmetic in
plain Triton, so the CPU tests run the rest of the kernel (program shapes,
slices, splits, epilogues); they run the PTX strings themselves on an emulated
warp (``tests/quant/ptx_emu.py``) and check the layout with ``unpack`` /
``reference_matmul``; ``usable`` checks the compiled kernel on the GPU at load time.

The layout, its packing, a torch reference and a Triton dequantization (for
steps of more rows) are in ``plugins.quant.int4_mma_layout``; the PTX and the
main loop's per-step helpers in ``plugins.quant.int4_mma_asm``.
"""

from __future__ import annotations

import functools
import json
import logging
import os

import torch
import triton
import triton.language as tl

from framework.ops import pdl as pdl_launch
from framework.ops.pdl import gdc_launch_dependents
from framework.ops.split_k import arrival_counters, num_sms
from plugins.quant.int4_mma_asm import (  # noqa: F401 - _asm and the load asm re-exported (tests, ablations)
    _LOAD_X_ASM, _LOAD_X_CONSTRAINTS, _LOAD_Z_ASM, _LOAD_Z_CONSTRAINTS, _asm, _load_step, _load_words, _load_z,
    _mma_step, _ring_half,
)
from plugins.quant.int4_mma_emulated import emulated_step
from plugins.quant.int4_mma_epilogue import mma_out_kernel, store_tile, write_out
from plugins.quant.int4_mma_layout import MAGIC_VALUE, pack_scales, reference_matmul, repack
from plugins.quant.int4_mma_tuned import DEFAULT, TUNED, band as _band, tuned as _tuned  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

# -- the kernel ----------------------------------------------------------------------------


# fmt: off
@triton.jit(do_not_specialize=["M", "G", "sb_per_split", "num_splits"])
def _mma_kernel(
    x_ptr,  # [M, K] activations (16-bit), row stride sxm, 32-byte aligned rows
    qw_ptr,  # int32 [N // 16, K // 64, 32, 4]
    sz_ptr,  # int32 [N // 16, G, 8, 2]
    out_ptr,  # [M, N] in x's dtype
    ws_ptr,  # fp32 [S, tiles, MB, R, 128 U] fragment-ordered partial sums
    cnt_ptr,  # int32 arrival counters, one per tile (SERIAL)
    M, N, K, sxm, G, sb_per_split, num_splits,
    row_words,  # 2 * K: int32 words per 16-row block
    GROUP: tl.constexpr, R: tl.constexpr, U: tl.constexpr, SERIAL: tl.constexpr,
    ASM: tl.constexpr, CONSTRAINTS: tl.constexpr,
    DEPTH: tl.constexpr = 1,  # steps of weight words in flight ahead of the one computing (1 or 2)
    EVICT: tl.constexpr = "",  # eviction policy of the weight stream ("" or "evict_first")
    MB: tl.constexpr = 1,  # column blocks of B: rows 8 cb .. 8 cb + 7 of x, M <= 8 MB
    PDL: tl.constexpr = False,  # launched as a programmatic dependent launch (sm_90+): see the wait below
    KS: tl.constexpr = 1,  # slices of the program's superblocks, one a tile row: summed in the program at the end
    DIRECT: tl.constexpr = False,  # one split: the program writes its outputs (no workspace, no counters)
    EMULATE: tl.constexpr = False,  # the Triton interpreter: emulated_step instead of the asm (CPU tests)
    MAGIC: tl.constexpr = 128,  # EMULATE: the dtype's magic value (int4_mma_layout.MAGIC_VALUE)
    PAIRED: tl.constexpr = False,  # the layout interleaves the two halves of the rows (int4_mma_epilogue.store_tile)
    GATED: tl.constexpr = False,  # PAIRED: write silu(first half) * second half, [M, N / 2]
    XJIT: tl.constexpr = False,  # load each step's activations in that step (the scales stay a step ahead)
    BARRIER: tl.constexpr = False,  # XJIT, with a CTA barrier after the next step's loads: see the main loop
    RING: tl.constexpr = False,  # two steps' loads in flight in two register sets, no copies: see the main loop
    INTERLEAVE: tl.constexpr = False,  # slice s takes superblocks s U .. s U + U - 1 of every KS U (not a run)
    EARLY: tl.constexpr = False,  # RING: both register sets' weight and scale loads before the PDL wait
):
# fmt: on
    # Every tensor of the main loop is [R KS, 128 U] and reaches memory only through loads and stores contiguous
    # along its last axis, so the compiler gives the loop one layout: 4 consecutive elements a thread, 32
    # threads along that axis. The PTX relies on it (lane L holds elements 4L..4L+3 of each 128). Tile row
    # a = KS r + s is row block r of the program, over slice s of its superblocks (per_ks = sb_per_split / KS
    # of them: the host makes sb_per_split a multiple of KS U); the slices' sums meet in the program, which
    # costs less than a split across programs (no workspace round trip, no arrival counter).
    if PDL:  # the next kernel may launch now (it waits for this one's end before reading what it writes)
        gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    SB = K // 64
    NB = N // 16
    a = tl.arange(0, R * KS)
    rb = pid_n * R + a // KS  # 16-row blocks
    rb_mask = rb < NB
    c = tl.arange(0, 128 * U)  # (u, lane, j): word j of the lane's four in superblock u of the step
    u = c // 128
    lane = (c % 128) // 4
    g = lane // 4
    t = lane % 4
    accs = ()
    for cb in tl.static_range(MB):
        accs = accs + (tl.zeros([R * KS, 128 * U], dtype=tl.float32),)
    per_ks = sb_per_split // KS
    sb1 = tl.minimum((pid_k + 1) * sb_per_split, SB)
    # each tile row's next superblock; with INTERLEAVE a step's tile rows read one run of KS U superblocks of a row
    # block (KS U x 512 contiguous bytes), not KS runs of U far apart
    STEP: tl.constexpr = KS * U if INTERLEAVE else U
    sb = pid_k * sb_per_split + (a % KS) * (U if INTERLEAVE else per_ks)
    w_rows = qw_ptr + rb.to(tl.int64)[:, None] * row_words
    x_row = (x_ptr + g * sxm + t * 16).to(tl.int64, bitcast=True)
    x_step = sxm.to(tl.int64) * 16  # bytes between rows g and g + 8
    x_dead = g - M  # >= 0: B's column is past M (zeros)
    z_rows = (sz_ptr + (tl.minimum(rb, NB - 1)[:, None] * G * 8 + g[None, :]) * 2).to(tl.int64, bitcast=True)
    if RING and not INTERLEAVE:  # the ring's last step may run past its slice (an odd count of steps): masked
        lim = tl.minimum(sb + per_ks, sb1)[:, None]
    else:
        lim = sb1
    qw = _load_words(w_rows, c, rb_mask, sb, lim, u, EVICT)
    if RING and EARLY:
        # Both register sets' words and scales (read-only: non-coherent) before the wait below, so that under PDL
        # two steps' weights stream in while the kernel before this one still runs (the activations come after)
        qb = _load_words(w_rows, c, rb_mask, sb + STEP, lim, u, EVICT)
        zv = _load_z(z_rows, sb, u, K, GROUP, False, EMULATE)
        zvb = _load_z(z_rows, sb + STEP, u, K, GROUP, False, EMULATE)
    if DEPTH == 2:  # the step after the first, in flight too
        qw_later = _load_words(w_rows, c, rb_mask, sb + STEP, sb1, u, EVICT)
    if PDL:
        # The previous kernel may still run: the weights and scales are read-only, so their first loads are
        # issued above; x, the workspace, the output and the shared arrival counters are touched only after
        # this wait; x is read with coherent loads, which the compiler keeps below it (it moves .nc loads above).
        tl.inline_asm_elementwise("griddepcontrol.wait;\nmov.b32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                                  pack=1)  # fmt: skip
    if RING and EARLY:
        xvs, _ = _load_step(x_row, x_step, x_dead, z_rows, sb, lim, u, K, GROUP, MB, PDL, EMULATE)
        xvb, _ = _load_step(x_row, x_step, x_dead, z_rows, sb + STEP, lim, u, K, GROUP, MB, PDL, EMULATE)
    else:
        xvs, zv = _load_step(x_row, x_step, x_dead, z_rows, sb, lim, u, K, GROUP, MB, PDL, EMULATE)
    if RING:
        # Loads held a step ahead in registers and then copied into the registers the mma reads (the loop-carried
        # values below) make every step wait out a DRAM round trip: the copy waits for the load (seen in the SASS:
        # ptxas then issues the loads just before it, after the step's mma). Two register sets, each reloaded
        # right after its mma reads it and read again a step later, need no copy: two steps' words and scales
        # (and activations, but with XJIT or BARRIER) are in flight when a step waits.
        if not EARLY:
            qb = _load_words(w_rows, c, rb_mask, sb + STEP, lim, u, EVICT)
            xvb, zvb = _load_step(x_row, x_step, x_dead, z_rows, sb + STEP, lim, u, K, GROUP, MB, PDL, EMULATE)
        for _ in range(0, per_ks, 2 * U):
            qw, xvs, zv, accs = _ring_half(qw, xvs, zv, accs, sb, w_rows, c, rb_mask, lim, u, x_row, x_step, x_dead,
                                           z_rows, K, x_ptr, sxm, sz_ptr, rb, NB, G, M, GROUP, MB, U, R * KS, MAGIC,
                                           ASM, CONSTRAINTS, EVICT, PDL or BARRIER, XJIT or BARRIER, BARRIER,
                                           EMULATE, STEP)  # fmt: skip
            qb, xvb, zvb, accs = _ring_half(qb, xvb, zvb, accs, sb + STEP, w_rows, c, rb_mask, lim, u, x_row,
                                            x_step, x_dead, z_rows, K, x_ptr, sxm, sz_ptr, rb, NB, G, M, GROUP, MB, U,
                                            R * KS, MAGIC, ASM, CONSTRAINTS, EVICT, PDL or BARRIER, XJIT or BARRIER,
                                            BARRIER, EMULATE, STEP)  # fmt: skip
            sb = sb + 2 * STEP
    else:
        for _ in range(0, per_ks, U):
            nxt = sb + STEP  # the next step's loads are in flight while this step computes
            if DEPTH == 2:
                qw_next = qw_later
                qw_later = _load_words(w_rows, c, rb_mask, sb + 2 * STEP, sb1, u, EVICT)
            else:
                qw_next = _load_words(w_rows, c, rb_mask, nxt, sb1, u, EVICT)
            # (with XJIT or BARRIER only the scales of these are used: the activations come in the step, below)
            xvs_next, zv_next = _load_step(x_row, x_step, x_dead, z_rows, nxt, sb1, u, K, GROUP, MB, PDL or BARRIER,
                                           EMULATE)  # fmt: skip
            if BARRIER:
                # Without it ptxas issues the next step's loads after this step's mma (it sinks them to their use
                # at the loop's end; seen in the SASS), so each step waits out a DRAM round trip. Coherent loads
                # cannot cross a CTA barrier: the weight and scale loads above stay above it, this step's
                # activations (loaded below, in the step) and so the mma stay below.
                tl.debug_barrier()
            if XJIT or BARRIER:  # this step's activations now (L1 hits), not a step ahead: fewer registers held
                xvs, _ = _load_step(x_row, x_step, x_dead, z_rows, sb, sb1, u, K, GROUP, MB, PDL or BARRIER,
                                    EMULATE)  # fmt: skip
            if EMULATE:
                accs = emulated_step(qw, accs, x_ptr, sxm, sz_ptr, rb, NB, G, sb, sb1, c, M, K, GROUP, MAGIC,
                                     R * KS, U, MB)  # fmt: skip
            else:
                accs = _mma_step(ASM, CONSTRAINTS, (qw,) + accs + xvs + (zv,), MB)
            qw, zv = qw_next, zv_next
            if not (XJIT or BARRIER):
                xvs = xvs_next
            sb = nxt
    if DIRECT:  # the slices' and unroll slots' sums, then the outputs straight from them
        for cb in tl.static_range(MB):
            y = tl.sum(tl.reshape(accs[cb], (R, KS * U, 128)), axis=1)  # tile row KS r + s, slot 128 u + j
            store_tile(out_ptr, y, pid_n * R, M, N, NB, cb, R, PAIRED, GATED)
    else:
        tiles = tl.num_programs(0)
        # only the accumulators of x's M rows (D[i] of lane 4g + t in column block cb is row 8 cb + 2t + i % 2):
        # at M = 1 an eighth of the tile, which matters when split-K partials are a fair part of a small layer's
        # traffic
        for cb in tl.static_range(MB):
            acc = accs[cb]
            if KS > 1:
                acc = tl.sum(tl.reshape(acc, (R, KS, 128 * U)), axis=1)
            ws_tile = ws_ptr + (((pid_k * tiles + pid_n) * MB + cb) * R) * (128 * U)
            live = 8 * cb + 2 * t + c % 2 < M
            tl.store(ws_tile + tl.arange(0, R)[:, None] * (128 * U) + c[None, :], acc, mask=live[None, :])
        if SERIAL:
            tl.debug_barrier()  # every thread's partial stored before the counter moves
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if arrived == num_splits - 1:
                write_out(ws_ptr, out_ptr, pid_n, M, N, NB, num_splits, R, U, MB, PAIRED, GATED)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)


MAX_M = 64  # eight column blocks of B, 8 rows of x each
# The layers send steps of up to this many rows here (``FRAMEWORK_INT4_MMA_MAX_M``, at most MAX_M). 32 (four
# column blocks) is where the kernel still beat the tiled one at every Llama-3-8B shape on an H200
# (docs/benchmarks.md: e.g. gate_up 42.4 against 75.8 us at 32 rows); at 64 rows the tiled kernel won at every
# shape (gate_up 84.4 against 90.3 us), and batch-64 decode was slower with 64 here (7.41 against 7.00 ms).
LAYER_MAX_M = min(MAX_M, int(os.environ.get("FRAMEWORK_INT4_MMA_MAX_M", "32")))


def aligned(x: torch.Tensor) -> bool:
    """Whether ``x`` [M, K] can be read by the kernel: unit last stride, 32-byte aligned rows."""
    return x.stride(1) == 1 and x.stride(0) % 16 == 0 and x.data_ptr() % 32 == 0


def matmul(
    x: torch.Tensor, qweight: torch.Tensor, szp: torch.Tensor, group_size: int, paired: bool = False,
    gated: bool = False,
) -> torch.Tensor:  # fmt: skip
    """``mma_matmul`` with the measured config for the shape, launched as a programmatic dependent where the
    decode kernels are (``framework.ops.pdl``: by default for steps of up to 8 rows)."""
    kwargs = dict(_tuned().get((qweight.shape[0] * 16, x.shape[1]) + _band(x.shape[0]), DEFAULT))
    if "pdl" not in kwargs and pdl_launch.enabled(x.device, x.shape[0]):
        kwargs["pdl"] = True
    return mma_matmul(x, qweight, szp, group_size, paired=paired, gated=gated, **kwargs)


@functools.cache
def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Run the kernel once on a small random layer against ``reference_matmul`` (the PTX assumes the layout
    the compiler gives the main loop; a Triton that lays it out otherwise computes garbage, caught here)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    n, k, group = 48, 256, 128  # the usual group size: the compiled variants are the ones a model then uses
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // group, n, generator=gen) * 0.1 + 0.01).to(dtype)
    zeros = torch.randint(0, 16, (k // group, n), generator=gen).to(dtype)
    qw, szp = repack(q), pack_scales(scales, zeros)
    table = _tuned()
    # each row band the layers use (one column block of B up to their most), with every program shape the
    # table holds for it: the variants the decode graphs then compile anyway
    rows = sorted({3} | {m for m in (16, 32, 64) if m <= LAYER_MAX_M} | {LAYER_MAX_M})
    for m in rows:
        cfgs = [DEFAULT] + [cfg for key, cfg in table.items() if key[2:] == _band(m)]
        x = torch.randn(m, k, generator=gen).to(dtype)
        ref = reference_matmul(x, qw, szp, group).float()
        for cfg in {json.dumps(c, sort_keys=True): c for c in cfgs}.values():
            try:
                out = mma_matmul(x.to(device), qw.to(device), szp.to(device), group, **cfg).float().cpu()
            except Exception as err:  # noqa: BLE001 - an old GPU (no bf16 mma) or a compiler that refuses the PTX
                logger.warning("int4 tensor-core kernel unusable on %s (%r); int4 decode uses the GEMV", device, err)
                return False
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            if not err < 1e-2:
                logger.warning("int4 tensor-core kernel failed its self-check on %s (M=%d, %s, relative error %.3g)",
                               device, m, cfg, err)  # fmt: skip
                return False
    return True


def mma_matmul(
    x: torch.Tensor, qweight: torch.Tensor, szp: torch.Tensor, group_size: int,
    rows: int = 4, unroll: int = 2, split: int = 0, num_warps: int = 4, depth: int = 1, evict: str = "",
    pdl: bool = False, kslices: int = 1, paired: bool = False, gated: bool = False, xjit: bool = False,
    maxnreg: int = 0, barrier: bool = False, ring: bool = False, interleave: bool = False, early: bool = False,
) -> torch.Tensor:  # fmt: skip
    """``x @ W^T`` for ``M <= 64`` rows of 16-bit ``x`` and the layout above (CUDA only).

    A program takes ``rows`` 16-row blocks over ``kslices`` slices of its superblocks (``rows * kslices`` tile
    rows, a power of two; a warp takes one or more of them, never less), ``unroll`` superblocks a step;
    ``split`` programs share each tile's superblocks (0: enough for about four programs a multiprocessor) and
    sum through a workspace, or, with one split, the program writes the output itself. ``paired``: the row
    blocks of the two halves of W are interleaved (``int4_mma_layout.pair_halves``); ``gated`` then gives
    ``silu(first) * second``, ``[M, N / 2]`` (a program takes at least two row blocks: one pair). ``xjit``:
    each step loads its own activations (L1 hits) instead of holding the next step's in registers;
    ``barrier``: that, with a CTA barrier between the next step's loads and this step's, which keeps the next
    step's loads in flight during this step's mma; ``maxnreg``: a cap on the registers a thread (0: the
    compiler's choice), so that more programs fit a multiprocessor; ``ring``: two steps' loads in flight, in
    two register sets that the loop never copies (with ``xjit`` or ``barrier`` as above); ``interleave``: the
    slices take turns at the superblocks, U each (a step of the program reads KS U contiguous superblocks of a
    row block) instead of one run each; ``early`` (with ``ring``): both register sets' weight and scale loads
    before the PDL wait, not only the first set's weights."""
    M, K = x.shape
    nb = qweight.shape[0]
    N = nb * 16
    if M > MAX_M or x.dtype not in MAGIC_VALUE or x.stride(1) != 1 or x.stride(0) % 16 or x.data_ptr() % 32:
        raise ValueError(
            f"mma_matmul takes M <= {MAX_M} rows of 16-bit x with 32-byte aligned rows; got {tuple(x.shape)} {x.dtype}"
        )
    if rows * kslices & (rows * kslices - 1) or unroll & (unroll - 1):
        raise ValueError(f"rows * kslices ({rows} * {kslices}) and unroll ({unroll}) must be powers of two")
    if early and not ring:
        raise ValueError("early loads the ring's second register set before the PDL wait: it needs ring")
    if gated and not paired:
        raise ValueError("gated needs the paired layout (int4_mma_layout.pair_halves)")
    if gated and rows < 2:
        rows, kslices = 2, max(1, kslices // 2)  # one (gate, up) pair a program; as many tile rows as before
    if num_warps > rows * kslices:
        # more warps than tile rows: the compiler spreads the tile over the warps in a layout other than the
        # one the PTX assumes (measured on an H200: garbage, or NaN)
        raise ValueError(f"num_warps ({num_warps}) must be at most the tile rows, rows * kslices ({rows} * {kslices})")
    emulate = not x.is_cuda  # the Triton interpreter (CPU tests): the asm's arithmetic in plain Triton
    if emulate and pdl:
        raise ValueError("pdl needs a CUDA device")
    sbs = K // 64
    tiles = triton.cdiv(nb, rows)
    step = unroll * kslices  # superblocks a split holds a multiple of
    if split <= 0:
        split = max(1, min(sbs // step, triton.cdiv(4 * num_sms(x.device), tiles)))
    per = triton.cdiv(triton.cdiv(sbs, split), step) * step
    splits = triton.cdiv(sbs, per)
    mb = 1 << (triton.cdiv(max(M, 1), 8) - 1).bit_length()  # 1, 2, 4 or 8 column blocks of B (zeros past M)
    out = torch.empty((M, N // 2 if gated else N), dtype=x.dtype, device=x.device)
    direct = splits == 1
    ws = out if direct else torch.empty((splits, tiles, mb, rows, 128 * unroll), dtype=torch.float32, device=x.device)
    cnt = None if direct else arrival_counters(x.device, tiles)
    asm, constraints = _asm(x.dtype == torch.bfloat16, mb)
    _mma_kernel[(tiles, splits)](
        x, qweight, szp, out, ws, cnt if cnt is not None else ws,
        M, N, K, x.stride(0), szp.shape[1], per, splits, 2 * K,
        GROUP=group_size, R=rows, U=unroll, SERIAL=cnt is not None, ASM=asm, CONSTRAINTS=constraints,
        DEPTH=depth, EVICT=evict, MB=mb, PDL=pdl, KS=kslices, DIRECT=direct, PAIRED=paired, GATED=gated,
        num_warps=num_warps, num_stages=1,
        XJIT=xjit, BARRIER=barrier, RING=ring, INTERLEAVE=interleave, EARLY=early,
        **({"EMULATE": True, "MAGIC": MAGIC_VALUE[x.dtype]} if emulate else {"launch_pdl": pdl}),
        **({"maxnreg": maxnreg} if maxnreg and not emulate else {}),
    )  # fmt: skip
    if cnt is None and not direct:
        mma_out_kernel[(tiles,)](ws, out, M, N, splits, R=rows, U=unroll, MB=mb, PAIRED=paired, GATED=gated,
                                  num_warps=4)  # fmt: skip
    return out
