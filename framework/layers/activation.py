"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from framework import ops


class SiluAndMul(nn.Module):
    """``silu(x[..., :d]) * x[..., d:]`` with ``d = x.shape[-1] // 2`` (the SwiGLU gate).

    The input is the output of a ``MergedColumnParallelLinear`` holding
    ``[gate | up]``; the result has half its last dimension. On CUDA (with
    Triton) one fused kernel computes it (``framework.ops.triton_activation``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ops.use_triton(x):
            from framework.ops import triton_activation

            if triton_activation.supported(x):
                return triton_activation.silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]

    def then_linear(self, x: torch.Tensor, down: nn.Module) -> torch.Tensor:
        """``down(self(x))``: the SwiGLU MLP's tail.

        For a few rows on CUDA, with ``down`` unquantized on one rank and the
        Triton GEMV on, one kernel computes it: the SiLU-and-mul runs in the
        GEMV's load prologue (``framework.ops.triton_gemv.gemv_silu_mul``).
        """
        if x.shape[:-1].numel() <= 8 and ops.use_triton(x) and getattr(down, "tp_size", None) == 1:
            from framework.layers.linear import UnquantizedLinearMethod
            from framework.ops import triton_gemv

            if type(down.linear_method) is UnquantizedLinearMethod and triton_gemv.applies(x, down.weight, down.bias, True):
                out = triton_gemv.gemv_silu_mul(x.reshape(-1, x.shape[-1]), down.weight, down.bias)
                return out.view(*x.shape[:-1], out.shape[-1])
        return down(self(x))
