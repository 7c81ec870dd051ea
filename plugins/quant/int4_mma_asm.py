"""The per-step pieces of the int4 tensor-core kernel (``plugins.quant.int4_mma``): the inline PTX of a
superblock's dequantization and ``mma`` (``_asm``) and of the activation and scale loads, and the Triton
helpers the main loop calls for one step (``_load_step``, ``_mma_step``, ``_load_words``, ``_ring_half``)."""

from __future__ import annotations

import functools

import triton
import triton.language as tl

from plugins.quant.int4_mma_emulated import emulated_step


@functools.cache
def _asm(bf16: bool, mb: int = 1) -> tuple[str, str]:
    """PTX for one thread and one 64-input superblock: dequantize the lane's four words and, for each, issue
    one m16n8k16 mma per column block of B (``mb`` blocks of 8 rows of x) into its fp32 accumulators.

    A word gives four bf16x2 (or f16x2) A-fragment registers with one ``lop3`` each (``(w >> 4i) &
    0x000F000F | magic`` is ``magic + q`` in both halves), ``magic + zero`` taken off and the scale applied
    in packed 16-bit arithmetic (exact but for the one rounding of ``(q - z) * s``, the reference's). Operands:
    the accumulators out (f32, four a column block); then in: the four words, the accumulators (four a
    block), the B fragments (one b64 a k-block, four a block), and the (-(magic + zero) pair, scale pair)
    of the lane's two rows (two registers, then two copies)."""
    ty = "bf16" if bf16 else "f16"
    magic = 0x43004300 if bf16 else 0x64006400
    one = 0x3F803F80 if bf16 else 0x3C003C00
    words, acc_in, frags, zs = 4 * mb, 4 * mb + 4, 8 * mb + 4, 12 * mb + 4
    lines = [
        "{",
        ".reg .b32 a0, a1, a2, a3, t1, t2, t3, zg, zh, sg, sh, b0, b1, one, nz;",
        f"mov.b32 one, {one:#x};",
        "mov.b32 nz, 0x80008000;",  # -0 in both halves: fma(a, s, -0) == a * s
        f"prmt.b32 zg, ${zs}, ${zs}, 0x1010;",
        f"prmt.b32 zh, ${zs}, ${zs}, 0x3232;",
        f"prmt.b32 sg, ${zs + 1}, ${zs + 1}, 0x1010;",
        f"prmt.b32 sh, ${zs + 1}, ${zs + 1}, 0x3232;",
    ]
    for j in range(4):
        w = f"${words + j}"
        lines += [
            f"shr.u32 t1, {w}, 4;",
            f"shr.u32 t2, {w}, 8;",
            f"shr.u32 t3, {w}, 12;",
            f"lop3.b32 a0, {w}, 0x000F000F, {magic:#x}, 0xEA;",  # (w & 0x000F000F) | magic: magic + q, two at once
            f"lop3.b32 a1, t1, 0x000F000F, {magic:#x}, 0xEA;",
            f"lop3.b32 a2, t2, 0x000F000F, {magic:#x}, 0xEA;",
            f"lop3.b32 a3, t3, 0x000F000F, {magic:#x}, 0xEA;",
            f"fma.rn.{ty}x2 a0, a0, one, zg;",  # q - z, exact
            f"fma.rn.{ty}x2 a1, a1, one, zh;",
            f"fma.rn.{ty}x2 a2, a2, one, zg;",
            f"fma.rn.{ty}x2 a3, a3, one, zh;",
            f"fma.rn.{ty}x2 a0, a0, sg, nz;",  # (q - z) * s, rounded once
            f"fma.rn.{ty}x2 a1, a1, sh, nz;",
            f"fma.rn.{ty}x2 a2, a2, sg, nz;",
            f"fma.rn.{ty}x2 a3, a3, sh, nz;",
        ]
        for cb in range(mb):
            out = ", ".join(f"${4 * cb + i}" for i in range(4))
            c = ", ".join(f"${acc_in + 4 * cb + i}" for i in range(4)) if j == 0 else out
            lines += [
                f"mov.b64 {{b0, b1}}, ${frags + 4 * cb + j};",
                f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{{out}}}, {{a0, a1, a2, a3}}, {{b0, b1}}, {{{c}}};",
            ]
    lines.append("}")
    constraints = ",".join(["=f"] * 4 * mb + ["r"] * 4 + ["f"] * 4 * mb + ["l"] * 4 * mb + ["r"] * 4)
    return "\n".join(lines), constraints


# One thread's activations of a superblock for one column block of B, a step ahead of their use: the 16 of
# its row of x (32 contiguous bytes at $4) as four b64 ($0-$3), or zeros when the "dead" flag $8 is >= 0 (the
# row is past M, or the superblock past the split). Only the first of the four registers of each input is
# read. The flag is an integer operand rather than a select on the address: a lane-dependent, loop-invariant
# condition outside the asm lets LLVM unswitch the loop, and lanes that run different copies of an mma.sync
# hang the warp.
_LOAD_X_ASM = "\n".join([
    "{",
    ".reg .pred px;",
    "setp.lt.s32 px, $8, 0;",
    "mov.b64 $0, 0;",
    "mov.b64 $1, 0;",
    "mov.b64 $2, 0;",
    "mov.b64 $3, 0;",
    "@px ld.global.nc.v2.b64 {$0, $1}, [$4];",
    "@px ld.global.nc.v2.b64 {$2, $3}, [$4+16];",
    "}",
])  # fmt: skip
_LOAD_X_CONSTRAINTS = ",".join(["=l"] * 4 + ["l"] * 4 + ["r"] * 4)
# The lane's rows' scale/zero words (two registers from address $4, then two copies).
_LOAD_Z_ASM = "ld.global.nc.v2.b32 {$0, $1}, [$4];\nmov.b32 $2, $0;\nmov.b32 $3, $1;"
_LOAD_Z_CONSTRAINTS = ",".join(["=r"] * 4 + ["l"] * 4)


_LOAD_X_ASM_C = tl.constexpr(_LOAD_X_ASM)
# The same with coherent loads, for PDL: x may be written by the kernel before until griddepcontrol.wait, and
# the compiler moves non-coherent (.nc, "read-only for the kernel's lifetime") loads above that wait.
_LOAD_X_COHERENT_ASM_C = tl.constexpr(_LOAD_X_ASM.replace("ld.global.nc.", "ld.global."))
_LOAD_X_CONSTRAINTS_C = tl.constexpr(_LOAD_X_CONSTRAINTS)
_LOAD_Z_ASM_C = tl.constexpr(_LOAD_Z_ASM)
_LOAD_Z_COHERENT_ASM_C = tl.constexpr(_LOAD_Z_ASM.replace("ld.global.nc.", "ld.global."))
_LOAD_Z_CONSTRAINTS_C = tl.constexpr(_LOAD_Z_CONSTRAINTS)

@triton.jit
def _load_step(x_row, x_step, x_dead, z_rows, sb, sb1, u, K, GROUP: tl.constexpr, MB: tl.constexpr,
               COHERENT: tl.constexpr = False, EMULATE: tl.constexpr = False):  # fmt: skip
    """The activations (B fragments: a tuple of MB tensors) and scale/zero words of superblock ``sb + u``
    (``sb``: the step's first superblock of each row of the tile, ``[R KS]``); placeholders under EMULATE
    (``emulated_step`` loads what it needs)."""
    sbu = sb[:, None] + u[None, :]
    xvs = ()
    if EMULATE:
        for cb in tl.static_range(MB):
            xvs = xvs + (sbu.to(tl.int64),)
        zv = sbu
    else:
        xa = x_row[None, :] + sbu * 128  # bytes: 64 activations a superblock
        dead = x_dead[None, :] + 64 * (sbu >= sb1).to(tl.int32)  # past the split: no row is loaded
        for cb in tl.static_range(MB):
            xv = tl.inline_asm_elementwise(
                _LOAD_X_COHERENT_ASM_C if COHERENT else _LOAD_X_ASM_C, _LOAD_X_CONSTRAINTS_C,
                [xa + cb * x_step, dead + 8 * cb], dtype=tl.int64, is_pure=True, pack=4,
            )  # fmt: skip
            xvs = xvs + (xv,)
        zv = _load_z(z_rows, sb, u, K, GROUP, COHERENT, EMULATE)
    return xvs, zv


@triton.jit
def _load_z(z_rows, sb, u, K, GROUP: tl.constexpr, COHERENT: tl.constexpr = False, EMULATE: tl.constexpr = False):
    """The scale/zero words of superblock ``sb + u`` (``_load_step``'s second half; a placeholder under EMULATE)."""
    sbu = sb[:, None] + u[None, :]
    if EMULATE:
        zv = sbu
    else:
        za = z_rows + tl.minimum(sbu * 64, K - 1) // GROUP * 64  # bytes: 8 lanes x 8 a group
        zv = tl.inline_asm_elementwise(_LOAD_Z_COHERENT_ASM_C if COHERENT else _LOAD_Z_ASM_C, _LOAD_Z_CONSTRAINTS_C,
                                       [za], dtype=tl.int32, is_pure=True, pack=4)  # fmt: skip
    return zv


@triton.jit
def _mma_step(ASM: tl.constexpr, CONSTRAINTS: tl.constexpr, args, MB: tl.constexpr):
    """One superblock's mma for MB column blocks: the new accumulators, a tuple of MB tensors. (The output
    types are written out per MB: a tuple of dtypes built in a loop does not compile on every Triton.)"""
    if MB == 1:
        accs = (tl.inline_asm_elementwise(ASM, CONSTRAINTS, args, dtype=tl.float32, is_pure=True, pack=4),)
    elif MB == 2:
        accs = tl.inline_asm_elementwise(ASM, CONSTRAINTS, args, dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    elif MB == 4:
        accs = tl.inline_asm_elementwise(ASM, CONSTRAINTS, args, dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
                                         is_pure=True, pack=4)  # fmt: skip
    else:
        tl.static_assert(MB == 8, "MB must be 1, 2, 4 or 8")
        accs = tl.inline_asm_elementwise(
            ASM, CONSTRAINTS, args,
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True, pack=4,
        )  # fmt: skip
    return accs


@triton.jit
def _load_words(w_rows, c, rb_mask, sb, sb1, u, EVICT: tl.constexpr):
    """The step's weight words ``[R KS, 128 U]`` (zeros past the split or the last row block)."""
    return tl.load(w_rows + sb[:, None] * 128 + c[None, :], mask=rb_mask[:, None] & (sb[:, None] + u[None, :] < sb1),
                   other=0, eviction_policy=EVICT)  # fmt: skip


@triton.jit
def _ring_half(q, xv, zv, accs, sb, w_rows, c, rb_mask, lim, u, x_row, x_step, x_dead, z_rows, K, x_ptr, sxm, sz_ptr,
               rb, NB, G, M, GROUP: tl.constexpr, MB: tl.constexpr, U: tl.constexpr, RK: tl.constexpr,
               MAGIC: tl.constexpr, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr, EVICT: tl.constexpr,
               COHERENT: tl.constexpr, INSTEP: tl.constexpr, BARRIER: tl.constexpr, EMULATE: tl.constexpr,
               STEP: tl.constexpr):  # fmt: skip
    """One step of the ring (``RING``): the mma of one register set's words ``q`` and scales ``zv`` (superblock
    ``sb``) with activations ``xv`` (or, with INSTEP, this step's, loaded here), then that set's loads for two
    steps on (``STEP`` superblocks a step). With BARRIER a CTA barrier follows the loads: ptxas otherwise
    issues them after the next mma."""
    if INSTEP:
        xs, _ = _load_step(x_row, x_step, x_dead, z_rows, sb, lim, u, K, GROUP, MB, COHERENT, EMULATE)
    else:
        xs = xv
    if EMULATE:
        accs = emulated_step(q, accs, x_ptr, sxm, sz_ptr, rb, NB, G, sb, lim, c, M, K, GROUP, MAGIC, RK, U, MB)
    else:
        accs = _mma_step(ASM, CONSTRAINTS, (q,) + accs + xs + (zv,), MB)
    q = _load_words(w_rows, c, rb_mask, sb + 2 * STEP, lim, u, EVICT)
    xn, zv = _load_step(x_row, x_step, x_dead, z_rows, sb + 2 * STEP, lim, u, K, GROUP, MB, COHERENT, EMULATE)
    if not INSTEP:  # (with INSTEP the activations loaded here are unused and compiled away)
        xv = xn
    if BARRIER:
        tl.debug_barrier()
    return q, xv, zv, accs
