"""What the GEMV tests share (test_triton_gemv.py, test_triton_gemv_norm.py): the module under test,
devices and dtypes, the error bounds, the configs that cover every code path, and the reference check.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py sets it before anything
imports triton) in float32 and float16; with one, bfloat16 too.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from framework.ops import gemv_configs, triton_gemv  # noqa: E402

if not torch.cuda.is_available() and "Interpreted" not in type(triton_gemv._gemv_kernel).__name__:
    triton_gemv = importlib.reload(triton_gemv)  # imported before the interpreter was asked for

Config = gemv_configs.Config
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
REL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

# configs that cover both inner loops, split-K, and blocks that do not divide N or K
FMA = Config(dot=False, block_n=16, block_k=64)
FMA_SPLIT = Config(dot=False, block_n=8, block_k=32, split=3)
DOT = Config(dot=True, block_n=16, block_k=64)
DOT_SPLIT = Config(dot=True, block_n=32, block_k=32, split=4)


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def rand(*shape, dtype, seed, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE, dtype)


def poisoned(m, n, dtype):
    return torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)


def check(out, x, w, b, dtype):
    """``out`` against ``F.linear(x, w, b)`` in float64 on the same inputs: Frobenius and per-element bounds."""
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    scale = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    err = out.double() - ref
    rel = (err.norm() / ref.norm()).item()
    assert rel < REL[dtype], f"relative error {rel:.2e} over {REL[dtype]:.0e}"
    worst = (err.abs() / (4 * ULP[dtype] * scale + 1e-30)).max().item()
    assert worst <= 1.0, f"an element is off by {worst:.2f}x its bound of 4 ulp of |x| @ |W|^T"
