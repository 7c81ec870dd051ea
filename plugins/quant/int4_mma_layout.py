"""The reordered int4 layout of ``plugins.quant.int4_mma``: packing, unpacking, a torch reference, and a
Triton dequantization (no inline asm: it runs in the interpreter too).

Layout (``N`` output features, ``K`` inputs; ``N % 16 == 0``, ``K % 64 == 0``, the
group size a multiple of 64)::

    qweight  int32 [N // 16, K // 64, 32, 4]   word (r, sb, lane, j): mma j of superblock sb, row block r
    szp      int32 [N // 16, G, 8, 2]          (r, gi, g, 0): -(magic + zero) of rows 16r+g | 16r+g+8 (16-bit
                                               halves, low first); (r, gi, g, 1): their scales

A superblock is 64 inputs, four mma of 16. Lane ``L = 4 g + t`` of an m16n8k16
holds rows ``g`` and ``g + 8`` of the 16-row block and four of the mma's inputs
(its logical columns ``2t, 2t+1, 2t+8, 2t+9``); for mma ``j`` of superblock ``sb``
they are the inputs ``64 sb + 16 t + 4 j + e``, ``e = 0..3``, so a lane's 16
activations of a superblock are 32 contiguous bytes. Bits of the word: (0-3,
16-19) = row g at e = 0, 1; (4-7, 20-23) = row g+8 at e = 0, 1; (8-11, 24-27) =
row g at e = 2, 3; (12-15, 28-31) = row g+8 at e = 2, 3.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAGIC_VALUE = {torch.bfloat16: 128, torch.float16: 1024}  # the float whose last mantissa bits take a code


def supported(n: int, k: int, group_size: int, bits: int) -> bool:
    """Whether a linear of this shape can take the layout (4-bit, 16-row blocks, 64-input superblocks)."""
    return bits == 4 and n % 16 == 0 and k % 64 == 0 and group_size % 64 == 0 and k % group_size == 0


# A code's place: input k = 64 sb + 16 t + 4 j + e, output n = 16 r + 8 h + g, lane = 4 g + t, and within
# the word, bits 4 * slot with slot = 4 (e % 2) + 2 (e // 2) + h.
_PLACED = (5, 0, 7, 1, 2, 4, 3, 6)  # [NB, SB, g, t, j, e_lo, e_hi, h] from [SB, t, j, e_hi, e_lo, NB, h, g]
_UNPLACED = (1, 3, 4, 6, 5, 0, 7, 2)  # its inverse


def repack(q: torch.Tensor) -> torch.Tensor:
    """int codes ``q [K, N]`` (values 0..15) -> ``qweight [N // 16, K // 64, 32, 4]`` int32 (module docstring)."""
    k, n = q.shape
    codes = q.to(torch.int32).view(k // 64, 4, 4, 2, 2, n // 16, 2, 8).permute(*_PLACED)
    codes = codes.reshape(n // 16, k // 64, 32, 4, 8)
    words = codes[..., 0].clone()
    for slot in range(1, 7):
        words |= codes[..., slot] << (4 * slot)
    top = codes[..., 7]
    words |= (top - 16 * (top >= 8).to(torch.int32)) << 28  # the top code as a signed nibble: no int32 overflow
    return words.contiguous()


def unpack(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of ``repack``: ``[K, N]`` int32 codes."""
    nb, sbs = qweight.shape[:2]
    shifts = 4 * torch.arange(8, device=qweight.device, dtype=torch.int32)
    codes = (qweight.unsqueeze(-1) >> shifts) & 15  # [NB, SB, 32, 4, 8]
    codes = codes.view(nb, sbs, 8, 4, 4, 2, 2, 2).permute(*_UNPLACED)
    return codes.reshape(sbs * 64, nb * 16).contiguous()


def pack_scales(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """``scales, zeros [G, N]`` (16-bit float, integer zero points) -> ``szp [N // 16, G, 8, 2]`` int32."""
    dtype = scales.dtype
    if dtype not in MAGIC_VALUE:
        raise ValueError(f"scales dtype {dtype} is not supported; the mma layout takes float16 or bfloat16")
    g_count, n = scales.shape
    negz = -(zeros.float() + float(MAGIC_VALUE[dtype]))
    if not torch.equal(negz, negz.to(dtype).float()):
        raise ValueError("zero points must be small integers (exact after adding the magic) for the mma layout")

    def halves(t: torch.Tensor) -> torch.Tensor:  # [G, N] -> [N//16, G, 8, 2 halves] 16-bit patterns
        bits = t.to(dtype).contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
        return bits.view(g_count, n // 16, 2, 8).permute(1, 0, 3, 2)

    z, s = halves(negz), halves(scales)
    words = torch.stack([z[..., 0] | (z[..., 1] << 16), s[..., 0] | (s[..., 1] << 16)], dim=-1).to(torch.int64)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def pair_halves(qweight: torch.Tensor, szp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout with the row blocks of W's two halves interleaved (block 2 j = block j of the first half,
    2 j + 1 = block j of the second): a program of the kernel then holds gate and up rows of a merged gate/up
    projection together (``int4_mma.mma_matmul(paired=True, gated=True)``). Needs N / 2 a multiple of 16."""
    nb = qweight.shape[0]
    if nb % 2:
        raise ValueError(f"pairing the halves needs an even number of 16-row blocks; got {nb}")

    def pair(t: torch.Tensor) -> torch.Tensor:
        return t.view(2, nb // 2, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()

    return pair(qweight), pair(szp)


def unpack_scales(szp: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``pack_scales``: ``(scales, zeros) [G, N]`` in ``dtype``."""
    nb, g_count = szp.shape[:2]
    lo = (szp & 0xFFFF).to(torch.int16)
    hi = ((szp >> 16) & 0xFFFF).to(torch.int16)
    both = torch.stack([lo, hi], dim=-1).view(dtype)  # [nb, G, 8, 2 (z|s), 2 (h)]
    both = both.permute(1, 0, 4, 2, 3).reshape(g_count, nb * 16, 2)  # n = 16 r + 8 h + g
    negz, s = both[..., 0], both[..., 1]
    return s, (-(negz.float()) - MAGIC_VALUE[dtype]).to(dtype)


def reference_matmul(x: torch.Tensor, qweight: torch.Tensor, szp: torch.Tensor, group_size: int) -> torch.Tensor:
    """What the kernel computes, in torch: the weights dequantized to x's dtype, products summed in fp32."""
    s, z = unpack_scales(szp, x.dtype)
    q = unpack(qweight)
    g = torch.arange(q.shape[0], device=q.device) // group_size
    w = ((q.float() - z.float()[g]) * s.float()[g]).to(x.dtype)  # [K, N]
    return (x.float() @ w.float()).to(x.dtype)


# -- dense weights from the layout (steps of more rows: dequantize once, then one GEMM) ---------------


@triton.jit
def _dequant_kernel(
    qw_ptr, s_ptr, z_ptr,  # int32 [N // 16, K // 64, 32, 4]; [G, N] scales, zeros
    w_ptr,  # [K, N] out: W^T in the scales' dtype
    N, K, GROUP: tl.constexpr, SBP: tl.constexpr,  # superblocks a program
):  # fmt: skip
    r = tl.program_id(0)  # 16-row block
    sb0 = tl.program_id(1) * SBP
    offs = tl.arange(0, 128 * SBP)
    words = tl.load(qw_ptr + r.to(tl.int64) * (2 * K) + sb0 * 128 + offs, mask=sb0 + offs // 128 < K // 64, other=0)
    slot = tl.arange(0, 8)
    codes = (words[:, None] >> (4 * slot)[None, :]) & 15  # [128 SBP, 8]
    lane = (offs % 128) // 4
    kk = (64 * (sb0 + offs // 128) + 16 * (lane % 4) + 4 * (offs % 4))[:, None] + (2 * ((slot // 2) % 2) + slot // 4)[None, :]
    nn = 16 * r + (lane // 4)[:, None] + (8 * (slot % 2))[None, :]
    mask = kk < K
    gi = kk // GROUP
    s = tl.load(s_ptr + gi * N + nn, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + gi * N + nn, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptr + kk.to(tl.int64) * N + nn, ((codes.to(tl.float32) - z) * s).to(w_ptr.dtype.element_ty), mask=mask)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The layout -> dense ``W^T [K, N]`` in ``scales.dtype`` (``(q - z) * s``, one rounding), in Triton."""
    nb, sbs = qweight.shape[:2]
    n, k = nb * 16, sbs * 64
    w = torch.empty((k, n), dtype=scales.dtype, device=qweight.device)
    sbp = 4
    _dequant_kernel[(nb, triton.cdiv(sbs, sbp))](qweight, scales, zeros, w, n, k, GROUP=group_size, SBP=sbp, num_warps=4)
    return w
