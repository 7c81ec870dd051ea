"""Fused SiLU-and-mul (the SwiGLU gate) in Triton.

``out = silu(x[..., :d]) * x[..., d:]``, rounded as the torch code rounds:
``silu`` is computed in float32 and cast to the dtype, then the product is
taken in float32 and cast again. Grid ``(rows, ceil(d / BLOCK))``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from framework.ops import pdl
from framework.ops.pdl import pdl_start

BLOCK = 1024


# fmt: off
@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [R, 2d]: gate | up
    out_ptr,  # [R, d]
    stride_x, stride_o,  # row strides
    d,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,  # a programmatic dependent launch (framework.ops.pdl)
):
# fmt: on
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + offs, (silu.to(tl.float32) * up).to(out_ptr.dtype.element_ty), mask=mask)


def supported(x: torch.Tensor) -> bool:
    return x.dtype in (torch.float32, torch.float16, torch.bfloat16) and x.shape[-1] % 2 == 0


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` as a new ``[..., d]`` tensor."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    if x2.shape[0] and d:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, BLOCK))](
            x2, out, x2.stride(0), out.stride(0), d, BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False,
            **pdl.launch_args(x.device, x2.shape[0]),
        )
    return out.view(*x.shape[:-1], d)
