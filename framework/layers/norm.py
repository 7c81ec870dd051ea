"""RMSNorm with an optional fused residual add (one Triton kernel on CUDA)."""

from __future__ import annotations

import torch
from torch import nn

from framework import ops
from framework.layers.context import LayerContext
from framework.layers.weight_loading import default_weight_loader


class RMSNorm(nn.Module):
    """Root-mean-square norm as in Hugging Face's ``LlamaRMSNorm``.

    The statistics are computed in float32 and the normalised activations are
    cast back to the input dtype before the weight multiplies them, so the
    result matches transformers bit for bit in the same dtype. On CUDA (with
    Triton) one fused kernel does the add and the norm with the same rounding
    points (``framework.ops.triton_rmsnorm``).

    Args:
        hidden_size: size of the last dimension.
        eps: added to the mean square before the reciprocal square root.
        ctx: the layer context (dtype, device).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, ctx: LayerContext | None = None):
        super().__init__()
        ctx = ctx or LayerContext()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=ctx.dtype, device=ctx.device), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        xf = x.to(torch.float32)
        variance = xf.pow(2).mean(-1, keepdim=True)
        xf = xf * torch.rsqrt(variance + self.eps)
        return self.weight * xf.to(input_dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalise ``x``, or ``x + residual`` when a residual is given.

        Returns:
            ``norm(x)`` when ``residual`` is None, else the pair
            ``(norm(x + residual), x + residual)``: the second item is the new
            residual stream. The sum is taken in the input dtype, as the
            transformers decoder layer does.
        """
        if ops.use_triton(x):
            from framework.ops import triton_rmsnorm

            if triton_rmsnorm.supported(x, self.weight, residual):
                return triton_rmsnorm.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        summed = x + residual
        return self._norm(summed), summed

    def then_linear(
        self, x: torch.Tensor, residual: torch.Tensor | None, linear: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``linear(norm(x + residual))`` and the new residual stream ``x + residual`` (``x`` when
        ``residual`` is None): a decoder layer's norm and the projection after it.

        For a few rows on CUDA, with ``linear`` unquantized on one rank and the Triton GEMV on, one kernel
        computes both: the norm runs in the GEMV's load prologue
        (``framework.ops.triton_gemv.gemv_rmsnorm``; ``FRAMEWORK_TRITON_GEMV_NORM=0``: off).
        """
        if x.shape[:-1].numel() <= 8 and ops.use_triton(x) and getattr(linear, "tp_size", None) == 1:
            from framework.layers.linear import UnquantizedLinearMethod
            from framework.ops import triton_gemv, triton_rmsnorm

            if (
                type(linear.linear_method) is UnquantizedLinearMethod
                and triton_rmsnorm.supported(x, self.weight, residual)
                and triton_gemv.applies(x, linear.weight, linear.bias, norm=True)
            ):
                rows = x.reshape(-1, x.shape[-1])
                res = residual.reshape(rows.shape) if residual is not None else None
                out, summed = triton_gemv.gemv_rmsnorm(rows, res, self.weight, self.eps, linear.weight, linear.bias)
                return out.view(*x.shape[:-1], out.shape[-1]), summed.view(x.shape)
        if residual is None:
            return linear(self(x)), x
        normed, summed = self(x, residual)
        return linear(normed), summed

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
