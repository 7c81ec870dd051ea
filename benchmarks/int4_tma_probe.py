"""Probe (measured, then removed: see docs/benchmarks.md, "sixth pass"): the int4 tensor-core kernel with its
weight stream through TMA tensor descriptors and the compiler's software pipeline instead of the register ring.

    python3 benchmarks/int4_tma_probe.py OUT_DIR

``tma_matmul``: one step an iteration, scale words in the step (``zload=1``) or through the pipeline;
``tma_ring_matmul``: two steps an iteration, scale words two steps ahead in two register sets, activations
in their step, ``box4``: boxes of [R, KS U, 32, 4] (no swizzle) instead of [R, KS U, 128].
"""


from __future__ import annotations

import torch
import triton
import triton.language as tl

from framework.ops.pdl import gdc_launch_dependents
from framework.ops.split_k import arrival_counters, num_sms
from plugins.quant.int4_mma_asm import _asm, _load_step, _load_z, _mma_step
from plugins.quant.int4_mma_epilogue import mma_out_kernel, store_tile, write_out

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None


# fmt: off
@triton.jit(do_not_specialize=["M", "G", "sb_per_split", "num_splits"])
def _tma_kernel(
    x_ptr, w_desc, sz_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, sxm, G, sb_per_split, num_splits,
    GROUP: tl.constexpr, R: tl.constexpr, U: tl.constexpr, KS: tl.constexpr, SERIAL: tl.constexpr,
    ASM: tl.constexpr, CONSTRAINTS: tl.constexpr, MB: tl.constexpr = 1, PDL: tl.constexpr = False,
    DIRECT: tl.constexpr = False, STAGES: tl.constexpr = 3, ZLOAD: tl.constexpr = 0,
):
# fmt: on
    if PDL:
        gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    SB = K // 64
    NB = N // 16
    a = tl.arange(0, R * KS)
    rb = pid_n * R + a // KS
    c = tl.arange(0, 128 * U)
    u = c // 128
    lane = (c % 128) // 4
    g = lane // 4
    t = lane % 4
    accs = ()
    for cb in tl.static_range(MB):
        accs = accs + (tl.zeros([R * KS, 128 * U], dtype=tl.float32),)
    sb0 = pid_k * sb_per_split
    sb1 = tl.minimum(sb0 + sb_per_split, SB)
    x_row = (x_ptr + g * sxm + t * 16).to(tl.int64, bitcast=True)
    x_step = sxm.to(tl.int64) * 16
    x_dead = g - M
    z_rows = (sz_ptr + (tl.minimum(rb, NB - 1)[:, None] * G * 8 + g[None, :]) * 2).to(tl.int64, bitcast=True)
    # scale words as plain loads (pipelined too): element (a, c) is word j % 2 of row g's pair
    z_elem = sz_ptr + (tl.minimum(rb, NB - 1)[:, None] * G * 8 + g[None, :]) * 2 + (c % 2)[None, :]
    if PDL:
        tl.inline_asm_elementwise("griddepcontrol.wait;\nmov.b32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                                  pack=1)  # fmt: skip
    for i in tl.range(0, sb_per_split, KS * U, num_stages=STAGES):
        blk = w_desc.load([pid_n * R, sb0 + i, 0])  # [R, KS U, 128]
        qw = tl.reshape(blk, (R * KS, 128 * U))
        sb = sb0 + i + (a % KS) * U
        sbu = sb[:, None] + u[None, :]
        if ZLOAD == 0:
            zv = tl.load(z_elem + (tl.minimum(sbu * 64, K - 1) // GROUP) * 16)
            xvs, _ = _load_step(x_row, x_step, x_dead, z_rows, sb, sb1, u, K, GROUP, MB, PDL)
        else:
            xvs, zv = _load_step(x_row, x_step, x_dead, z_rows, sb, sb1, u, K, GROUP, MB, PDL)
        accs = _mma_step(ASM, CONSTRAINTS, (qw,) + accs + xvs + (zv,), MB)
    if DIRECT:
        for cb in tl.static_range(MB):
            y = tl.sum(tl.reshape(accs[cb], (R, KS * U, 128)), axis=1)
            store_tile(out_ptr, y, pid_n * R, M, N, NB, cb, R, False, False)
    else:
        tiles = tl.num_programs(0)
        for cb in tl.static_range(MB):
            acc = accs[cb]
            if KS > 1:
                acc = tl.sum(tl.reshape(acc, (R, KS, 128 * U)), axis=1)
            ws_tile = ws_ptr + (((pid_k * tiles + pid_n) * MB + cb) * R) * (128 * U)
            live = 8 * cb + 2 * t + c % 2 < M
            tl.store(ws_tile + tl.arange(0, R)[:, None] * (128 * U) + c[None, :], acc, mask=live[None, :])
        if SERIAL:
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if arrived == num_splits - 1:
                write_out(ws_ptr, out_ptr, pid_n, M, N, NB, num_splits, R, U, MB, False, False)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)


_DESCS: dict = {}


def descriptor(qweight: torch.Tensor, rows: int, steps: int) -> "TensorDescriptor":
    key = (qweight.data_ptr(), tuple(qweight.shape), rows, steps)
    d = _DESCS.get(key)
    if d is None:
        nb, sbs = qweight.shape[0], qweight.shape[1]
        view = qweight.view(nb, sbs, 128)
        d = _DESCS[key] = TensorDescriptor(view, list(view.shape), list(view.stride()), [rows, steps, 128])
    return d


def tma_matmul(x, qweight, szp, group_size, rows=2, unroll=2, kslices=1, split=1, num_warps=4, stages=3, pdl=False,
               zload=0):
    M, K = x.shape
    nb = qweight.shape[0]
    N = nb * 16
    sbs = K // 64
    tiles = triton.cdiv(nb, rows)
    step = unroll * kslices
    if split <= 0:
        split = max(1, min(sbs // step, triton.cdiv(4 * num_sms(x.device), tiles)))
    per = triton.cdiv(triton.cdiv(sbs, split), step) * step
    splits = triton.cdiv(sbs, per)
    mb = 1 << (triton.cdiv(max(M, 1), 8) - 1).bit_length()
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    direct = splits == 1
    ws = out if direct else torch.empty((splits, tiles, mb, rows, 128 * unroll), dtype=torch.float32, device=x.device)
    cnt = None if direct else arrival_counters(x.device, tiles)
    asm, constraints = _asm(x.dtype == torch.bfloat16, mb)
    desc = descriptor(qweight, rows, step)
    _tma_kernel[(tiles, splits)](
        x, desc, szp, out, ws, cnt if cnt is not None else ws,
        M, N, K, x.stride(0), szp.shape[1], per, splits,
        GROUP=group_size, R=rows, U=unroll, KS=kslices, SERIAL=cnt is not None, ASM=asm, CONSTRAINTS=constraints,
        MB=mb, PDL=pdl, DIRECT=direct, STAGES=stages, ZLOAD=zload, num_warps=num_warps, launch_pdl=pdl,
    )  # fmt: skip
    return out


@triton.jit
def _stream_kernel(w_desc, out_ptr, sb_per_split, R: tl.constexpr, S: tl.constexpr, STAGES: tl.constexpr):
    """The weight stream alone: boxes [R, S, 128] through TMA, xor-summed (the bandwidth ceiling of the design)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    acc = tl.zeros([R, S, 128], dtype=tl.int32)
    for i in tl.range(0, sb_per_split, S, num_stages=STAGES):
        acc = acc ^ w_desc.load([pid_n * R, pid_k * sb_per_split + i, 0])
    tl.store(out_ptr + pid_n * tl.num_programs(1) + pid_k, tl.sum(tl.reshape(acc, [R * S * 128]), 0))


def stream(qweight, rows, steps, split, stages, num_warps=4):
    nb, sbs = qweight.shape[0], qweight.shape[1]
    tiles = triton.cdiv(nb, rows)
    per = triton.cdiv(triton.cdiv(sbs, split), steps) * steps
    splits = triton.cdiv(sbs, per)
    out = torch.empty(tiles * splits, dtype=torch.int32, device=qweight.device)
    _stream_kernel[(tiles, splits)](descriptor(qweight, rows, steps), out, per, R=rows, S=steps, STAGES=stages,
                                    num_warps=num_warps)
    return out


# fmt: off
@triton.jit(do_not_specialize=["M", "G", "sb_per_split", "num_splits"])
def _tma_ring_kernel(
    x_ptr, w_desc, sz_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, sxm, G, sb_per_split, num_splits,
    GROUP: tl.constexpr, R: tl.constexpr, U: tl.constexpr, KS: tl.constexpr, SERIAL: tl.constexpr,
    ASM: tl.constexpr, CONSTRAINTS: tl.constexpr, MB: tl.constexpr = 1, PDL: tl.constexpr = False,
    DIRECT: tl.constexpr = False, STAGES: tl.constexpr = 3, BOX4: tl.constexpr = False,
):
# fmt: on
    """TMA weights (pipelined STAGES deep), scale words two steps ahead in two register sets (a ring), the
    activations in their step (L1 hits). Two steps an iteration."""
    if PDL:
        gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    SB = K // 64
    NB = N // 16
    a = tl.arange(0, R * KS)
    rb = pid_n * R + a // KS
    c = tl.arange(0, 128 * U)
    u = c // 128
    lane = (c % 128) // 4
    g = lane // 4
    t = lane % 4
    accs = ()
    for cb in tl.static_range(MB):
        accs = accs + (tl.zeros([R * KS, 128 * U], dtype=tl.float32),)
    STEP: tl.constexpr = KS * U
    sb0 = pid_k * sb_per_split
    sb1 = tl.minimum(sb0 + sb_per_split, SB)
    x_row = (x_ptr + g * sxm + t * 16).to(tl.int64, bitcast=True)
    x_step = sxm.to(tl.int64) * 16
    x_dead = g - M
    z_rows = (sz_ptr + (tl.minimum(rb, NB - 1)[:, None] * G * 8 + g[None, :]) * 2).to(tl.int64, bitcast=True)
    sba = sb0 + (a % KS) * U
    za = _load_z(z_rows, sba, u, K, GROUP, False, False)
    zb = _load_z(z_rows, sba + STEP, u, K, GROUP, False, False)
    if PDL:
        tl.inline_asm_elementwise("griddepcontrol.wait;\nmov.b32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                                  pack=1)  # fmt: skip
    for i in tl.range(0, sb_per_split, 2 * STEP, num_stages=STAGES):
        sb = sba + i
        if BOX4:
            qa = tl.reshape(w_desc.load([pid_n * R, sb0 + i, 0, 0]), (R * KS, 128 * U))
        else:
            qa = tl.reshape(w_desc.load([pid_n * R, sb0 + i, 0]), (R * KS, 128 * U))
        xa, _ = _load_step(x_row, x_step, x_dead, z_rows, sb, sb1, u, K, GROUP, MB, PDL)
        accs = _mma_step(ASM, CONSTRAINTS, (qa,) + accs + xa + (za,), MB)
        za = _load_z(z_rows, sb + 2 * STEP, u, K, GROUP, False, False)
        if BOX4:
            qb = tl.reshape(w_desc.load([pid_n * R, sb0 + i + STEP, 0, 0]), (R * KS, 128 * U))
        else:
            qb = tl.reshape(w_desc.load([pid_n * R, sb0 + i + STEP, 0]), (R * KS, 128 * U))
        xb, _ = _load_step(x_row, x_step, x_dead, z_rows, sb + STEP, sb1, u, K, GROUP, MB, PDL)
        accs = _mma_step(ASM, CONSTRAINTS, (qb,) + accs + xb + (zb,), MB)
        zb = _load_z(z_rows, sb + 3 * STEP, u, K, GROUP, False, False)
    if DIRECT:
        for cb in tl.static_range(MB):
            y = tl.sum(tl.reshape(accs[cb], (R, KS * U, 128)), axis=1)
            store_tile(out_ptr, y, pid_n * R, M, N, NB, cb, R, False, False)
    else:
        tiles = tl.num_programs(0)
        for cb in tl.static_range(MB):
            acc = accs[cb]
            if KS > 1:
                acc = tl.sum(tl.reshape(acc, (R, KS, 128 * U)), axis=1)
            ws_tile = ws_ptr + (((pid_k * tiles + pid_n) * MB + cb) * R) * (128 * U)
            live = 8 * cb + 2 * t + c % 2 < M
            tl.store(ws_tile + tl.arange(0, R)[:, None] * (128 * U) + c[None, :], acc, mask=live[None, :])
        if SERIAL:
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if arrived == num_splits - 1:
                write_out(ws_ptr, out_ptr, pid_n, M, N, NB, num_splits, R, U, MB, False, False)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)


def descriptor4(qweight, rows, steps):
    key = ("b4", qweight.data_ptr(), tuple(qweight.shape), rows, steps)
    d = _DESCS.get(key)
    if d is None:
        d = _DESCS[key] = TensorDescriptor(qweight, list(qweight.shape), list(qweight.stride()), [rows, steps, 32, 4])
    return d


def tma_ring_matmul(x, qweight, szp, group_size, rows=2, unroll=2, kslices=1, split=1, num_warps=4, stages=3,
                    pdl=False, box4=False):
    M, K = x.shape
    nb = qweight.shape[0]
    N = nb * 16
    sbs = K // 64
    tiles = triton.cdiv(nb, rows)
    step = unroll * kslices
    if split <= 0:
        split = max(1, min(sbs // (2 * step), triton.cdiv(4 * num_sms(x.device), tiles)))
    per = triton.cdiv(triton.cdiv(sbs, split), 2 * step) * 2 * step
    splits = triton.cdiv(sbs, per)
    mb = 1 << (triton.cdiv(max(M, 1), 8) - 1).bit_length()
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    direct = splits == 1
    ws = out if direct else torch.empty((splits, tiles, mb, rows, 128 * unroll), dtype=torch.float32, device=x.device)
    cnt = None if direct else arrival_counters(x.device, tiles)
    asm, constraints = _asm(x.dtype == torch.bfloat16, mb)
    desc = descriptor4(qweight, rows, step) if box4 else descriptor(qweight, rows, step)
    _tma_ring_kernel[(tiles, splits)](
        x, desc, szp, out, ws, cnt if cnt is not None else ws,
        M, N, K, x.stride(0), szp.shape[1], per, splits,
        GROUP=group_size, R=rows, U=unroll, KS=kslices, SERIAL=cnt is not None, ASM=asm, CONSTRAINTS=constraints,
        MB=mb, PDL=pdl, DIRECT=direct, STAGES=stages, BOX4=box4, num_warps=num_warps, launch_pdl=pdl,
    )  # fmt: skip
    return out


# -- the sweep (M = 1, the Llama-3-8B shapes, against the table's ring programs) --------------------------
import itertools, json, math, sys, time  # noqa: E401,E402
from pathlib import Path  # noqa: E402

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.check_gemv import graph_time_us
    from benchmarks.check_int4_mma import SHAPES, make_layer
    from plugins.quant import int4_mma, int4_mma_layout as layout
    out_dir = Path(sys.argv[1]); out_dir.mkdir(parents=True, exist_ok=True)
    res = []
    def log(**kw):
        res.append(kw); print(json.dumps(kw), flush=True)
        (out_dir / "tma2.json").write_text(json.dumps(res, indent=1))
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    PROGS = [(2, 2, 2, 4), (4, 1, 2, 4), (1, 4, 2, 4), (2, 2, 1, 4), (1, 8, 1, 8), (4, 2, 1, 8), (2, 4, 2, 8), (1, 2, 2, 2), (8, 1, 1, 8)]
    t0 = time.time()
    for name, (n, k) in SHAPES.items():
        q, s, z = make_layer(n, k, 128, torch.bfloat16)
        nbytes = n * k // 2 + (k // 128) * n * 4
        qws = [layout.repack(q) for _ in range(max(2, math.ceil(3 * l2 / nbytes)))]
        szp = layout.pack_scales(s, z)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = layout.reference_matmul(x, qws[0], szp, 128).float()
        for rep in range(2):
            us = graph_time_us([lambda qw=qw: int4_mma.matmul(x, qw, szp, 128) for qw in qws], 30)
            log(shape=name, kind="ring_tuned", us=round(us, 2))
        best = []
        for (r, ks, u, w), split, stages, box4 in itertools.product(PROGS, (1, 0), (3, 4, 6), (True, False)):
            kw = dict(rows=r, kslices=ks, unroll=u, num_warps=w, split=split, stages=stages, box4=box4)
            try:
                o = tma_ring_matmul(x, qws[0], szp, 128, **kw).float()
                err = ((o - ref).abs().max() / ref.abs().max()).item()
                us = graph_time_us([lambda qw=qw, kw=kw: tma_ring_matmul(x, qw, szp, 128, **kw) for qw in qws], 30)
                log(shape=name, kind="tma_ring", **kw, us=round(us, 2), err=round(err, 4))
            except Exception as e:
                log(shape=name, kind="tma_ring", **kw, error=repr(e)[:200])
        print("elapsed", time.time() - t0, flush=True)
