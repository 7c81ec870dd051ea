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
