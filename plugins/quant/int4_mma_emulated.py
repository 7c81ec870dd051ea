"""The int4 tensor-core kernel's asm arithmetic in plain Triton, for the Triton interpreter.

``plugins.quant.int4_mma._mma_kernel`` calls ``emulated_step`` instead of its inline PTX when it runs on CPU
tensors (``EMULATE``), so that the CPU tests run everything else of the kernel: program shapes, slices of K,
splits and their workspace, the direct epilogue, masks. The PTX itself is tested on an emulated warp
(``tests/quant/ptx_emu.py``) and, on a GPU, against ``reference_matmul``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(v, dt, MAGIC: tl.constexpr):
    """fp32 ``v`` rounded to nearest-even in x's dtype, as fp32 (by hand for bfloat16: the interpreter's cast
    truncates)."""
    if MAGIC == 128:  # bfloat16
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(dt).to(tl.float32)


@triton.jit
def emulated_step(qw, accs, x_ptr, sxm, sz_ptr, rb, NB, G, sb, sb1, c, M, K, GROUP: tl.constexpr, MAGIC: tl.constexpr,
                   RK: tl.constexpr, U: tl.constexpr, MB: tl.constexpr):  # fmt: skip
    """The asm's arithmetic in plain Triton, for the interpreter (the CPU tests run everything else of the
    kernel through it): one step's products for every tile row and column block, added to the fragment-ordered
    accumulators (D[i] of lane 4 g + t at 128 u + 4 lane + i is output row 16 rb + g + 8 (i // 2), x row
    8 cb + 2 t + i % 2), the weights dequantized as the asm does ((q - z) s rounded once to x's dtype)."""
    dt = x_ptr.dtype.element_ty
    u = c // 128
    g = c % 128 // 16
    t = c % 16 // 4
    j = c % 4
    sbu = sb[:, None] + u[None, :]  # [RK, 128 U]
    live = sbu < sb1
    k0 = sbu * 64 + (16 * t + 4 * j)[None, :]  # the word's inputs are k0 .. k0 + 3
    zs = sz_ptr + ((tl.minimum(rb, NB - 1)[:, None] * G + tl.minimum(k0, K - 1) // GROUP) * 8 + g[None, :]) * 2
    zw, sw = tl.load(zs), tl.load(zs + 1)  # -(magic + z) and the scale: rows g (low half), g + 8 (high half)
    pos = tl.reshape(tl.arange(0, 16), (1, 1, 1, 16))  # 4 t + i within a (u, g) group of 16 slots
    new = ()
    for cb in tl.static_range(MB):
        d = tl.zeros([RK, U, 8, 16], dtype=tl.float32)
        for h in tl.static_range(2):
            negz = ((zw >> (16 * h)) & 0xFFFF).to(tl.int16).to(dt, bitcast=True).to(tl.float32)
            scale = ((sw >> (16 * h)) & 0xFFFF).to(tl.int16).to(dt, bitcast=True).to(tl.float32)
            for ml in tl.static_range(8):
                m = 8 * cb + ml
                p = tl.zeros([RK, 128 * U], dtype=tl.float32)
                for e in tl.static_range(4):
                    q = (qw >> (4 * (4 * (e % 2) + 2 * (e // 2) + h))) & 0xF
                    w = round_to(((q.to(tl.float32) + MAGIC + negz) * scale), dt, MAGIC)
                    xv = tl.load(x_ptr + m * sxm + k0 + e, mask=live & (k0 * 0 + m < M), other=0.0).to(tl.float32)
                    p += w * xv
                row = tl.sum(tl.reshape(p, (RK, U, 8, 16)), axis=3)  # over the lanes' t and words j
                d += tl.where(pos == 4 * (ml // 2) + 2 * h + ml % 2, tl.reshape(row, (RK, U, 8, 1)), 0.0)
        new = new + (accs[cb] + tl.reshape(d, (RK, 128 * U)),)
    return new
