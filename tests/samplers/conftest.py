"""Sampler tests: the Triton kernels run under the interpreter where there is no GPU.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, so
it is set here, before any test module imports a kernel module (the sampler
imports its kernel modules on first use, never at plugin load). It is set
only when CUDA is unavailable, so a GPU run compiles the real kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
