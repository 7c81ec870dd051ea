"""Fused RMSNorm (with an optional residual add) in Triton.

Same arithmetic as ``framework.layers.RMSNorm``'s torch code (Hugging Face's
``LlamaRMSNorm``): ``summed = x + residual`` rounded to the input dtype,
statistics in float32, the normalised row cast to the input dtype and only
then multiplied by the weight (a product rounded to the dtype). One program
normalises one row; the row must fit one block (hidden size <= 65536).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from framework.ops import pdl
from framework.ops.pdl import pdl_start

MAX_HIDDEN = 65536


# fmt: off
@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [R, H] input rows
    residual_ptr,  # [R, H] residual rows (HAS_RESIDUAL)
    weight_ptr,  # [H]
    out_ptr,  # [R, H] normalised output
    summed_ptr,  # [R, H] x + residual, the new residual stream (HAS_RESIDUAL)
    stride_x, stride_r, stride_o, stride_s,  # row strides
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # next power of two >= hidden
    PDL: tl.constexpr = False,  # a programmatic dependent launch (framework.ops.pdl)
):
# fmt: on
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # the sum, rounded as torch does
        tl.store(summed_ptr + row * stride_s + offs, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, 0) / hidden
    normed = (xf * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    out = (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + offs, out, mask=mask)


def supported(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Shapes and dtypes this kernel takes (others use the torch code)."""
    same = weight.dtype == x.dtype and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape))
    return same and x.shape[-1] <= MAX_HIDDEN and x.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., H] as [R, H] with a unit last stride (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``weight * norm(x)``, or ``(weight * norm(x + residual), x + residual)``; new tensors."""
    shape, hidden = x.shape, x.shape[-1]
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    r2 = _rows(residual) if residual is not None else x2
    summed = torch.empty_like(out) if residual is not None else out
    if x2.shape[0]:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, summed,
            x2.stride(0), r2.stride(0), out.stride(0), summed.stride(0),
            hidden, eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
            enable_fp_fusion=False,  # no fma contraction: round where torch rounds
            **pdl.launch_args(x.device, x2.shape[0]),
        )  # fmt: skip
    if residual is None:
        return out.view(shape)
    return out.view(shape), summed.view(shape)
