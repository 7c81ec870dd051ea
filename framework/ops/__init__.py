"""Fused Triton ops behind ``framework.layers`` (CUDA only).

``RMSNorm``, ``RotaryEmbedding`` and ``SiluAndMul`` call these kernels when
their input is on a CUDA device and Triton can be imported, and their torch
code otherwise, so every model plugin built from the layers gets them. Each
op keeps the rounding points of the torch code it replaces (the arithmetic is
float32 inside, cast to the activation dtype where torch casts). They launch
with ``enable_fp_fusion=False``: with fusion on, the compiler turns
``(a * b).to(fp16) - (c * d).to(fp16)`` into one ``fma.rn.f16`` (seen in the
sm90 PTX), and the rotary output then differs from torch's in the last place
for about 14% of the elements.

The kernel modules import Triton at import time, so the layers import them
only on first use. ``set_enabled(False)`` (or ``FRAMEWORK_TRITON_OPS=0`` in the
environment) sends every layer back to its torch code, e.g. to compare.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

_enabled = os.environ.get("FRAMEWORK_TRITON_OPS", "1") != "0"


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` can succeed (looked up once, nothing imported)."""
    return importlib.util.find_spec("triton") is not None


def set_enabled(enabled: bool) -> None:
    """Turn the fused ops on or off for the whole process (the torch code runs when off)."""
    global _enabled
    _enabled = bool(enabled)


def use_triton(x: torch.Tensor) -> bool:
    """True when a layer should run its fused Triton op on ``x``."""
    return _enabled and x.is_cuda and triton_available()
