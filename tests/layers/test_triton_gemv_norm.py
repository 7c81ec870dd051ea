"""RMSNorm folded into the small-M GEMV (``triton_gemv.gemv_rmsnorm``, ``RMSNorm.then_linear``).

The reference is the unfused path: ``framework.layers.RMSNorm``'s torch code, then ``F.linear`` in float64
on its (dtype-rounded) output. The new residual must equal ``x + residual`` bit for bit; the product must
meet the GEMV's bounds (tests/layers/test_triton_gemv.py: relative Frobenius error and 4 ulp of
``|h| @ |W|^T`` per element), and with an identity weight the kernel's normalised row must equal the torch
norm's (its rounding points) but for rare one-ulp flips from the mean square's summation order. Without a
GPU the kernels run under ``TRITON_INTERPRET=1`` (float32 and float16; bfloat16 too with one).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gemv_helpers import (  # tests/layers/conftest.py puts this directory on sys.path
    DEVICE,
    DOT,
    DOT_SPLIT,
    DTYPES,
    FMA,
    FMA_SPLIT,
    ULP,
    check,
    dtype_id,
    poisoned,
    rand,
    triton_gemv,
)

from framework import ops
from framework.ops import gemv_configs, split_k
from framework.layers import ColumnParallelLinear, LayerContext, RMSNorm
from framework.layers.linear import UnquantizedLinearMethod

EPS = 1e-5


def make_norm(k, dtype, seed=11, device=DEVICE):
    norm = RMSNorm(k, EPS, LayerContext(dtype=dtype, device=device))
    w = torch.rand(k, generator=torch.Generator().manual_seed(seed)) + 0.5
    norm.weight.data.copy_(w.to(norm.weight.dtype))
    return norm


def unfused(norm, x, residual):
    """RMSNorm's torch code (whatever the device): ``(norm(h), h)`` with ``h = x + residual`` (or x)."""
    h = x if residual is None else x + residual
    return norm._norm(h), h


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "m,n,k,config",
    [
        (1, 40, 96, FMA),  # N and K cross block boundaries
        (1, 33, 200, FMA_SPLIT),  # split-K with a ragged last slice: each slice needs the whole row's rms
        (1, 48, 128, DOT),
        (3, 37, 160, FMA),  # BLOCK_M = 4, one padding row
        (3, 70, 100, DOT_SPLIT),
        (8, 24, 72, FMA_SPLIT),
        (8, 50, 136, DOT),
        (5, 17, 48, None),  # the heuristic config
    ],
)
@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
def test_gemv_rmsnorm(m, n, k, config, dtype, with_residual):
    x = rand(m, k, dtype=dtype, seed=m * 1000 + n, scale=3.0)
    residual = rand(m, k, dtype=dtype, seed=k, scale=3.0) if with_residual else None
    norm = make_norm(k, dtype)
    w = rand(n, k, dtype=dtype, seed=n)
    b = rand(n, dtype=dtype, seed=7) if m % 2 else None  # bias on the odd-M cases
    out, new_residual = triton_gemv.gemv_rmsnorm(
        x, residual, norm.weight, EPS, w, b, out=poisoned(m, n, dtype), config=config, residual_out=poisoned(m, k, dtype)
    )
    normed, h = unfused(norm, x, residual)
    assert torch.equal(new_residual, h)
    if residual is None:
        assert new_residual is x
    check(out, normed, w, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m,config", [(1, FMA_SPLIT), (3, FMA), (8, DOT_SPLIT)])
def test_prologue_rounds_as_rmsnorm(m, config, dtype, monkeypatch):
    """An identity weight returns the kernel's normalised rows: in fp16/bf16 RMSNorm's, but for flips of one
    ulp (the mean square is summed in another order; skipping the cast before the weight product flips about
    a quarter); in fp32 (no rounding between the steps) within a few ulps. The statistics loop takes several
    steps (NORM_STAT_ELEMS small)."""
    monkeypatch.setattr(triton_gemv, "NORM_STAT_ELEMS", 64)
    k = 200
    x = rand(m, k, dtype=dtype, seed=m, scale=3.0)
    residual = rand(m, k, dtype=dtype, seed=m + 1)
    norm = make_norm(k, dtype, seed=m)
    eye = torch.eye(k, dtype=dtype, device=DEVICE)
    out, _ = triton_gemv.gemv_rmsnorm(x, residual, norm.weight, EPS, eye, out=poisoned(m, k, dtype), config=config)
    normed, _ = unfused(norm, x, residual)
    diff = (out.double() - normed.double()).abs()
    if dtype == torch.float32:
        assert (diff <= 4 * ULP[dtype] * normed.double().abs()).all(), "an element is more than 4 ulps off"
        return
    assert (diff <= ULP[dtype] * normed.double().abs()).all(), "an element is more than one ulp off"
    assert (diff > 0).float().mean().item() < 0.01, "more than 1% of the normalised elements differ"


@pytest.mark.parametrize("m,n,k,config", [(1, 33, 200, FMA_SPLIT), (3, 70, 100, DOT_SPLIT)])
def test_split_reduction_in_kernel_equals_second_launch(m, n, k, config, monkeypatch):
    """In-kernel split reduction (last program of a tile) == the second kernel, bit for bit; counters left at 0."""
    x, residual = rand(m, k, dtype=torch.float32, seed=3), rand(m, k, dtype=torch.float32, seed=4)
    norm = make_norm(k, torch.float32)
    w, b = rand(n, k, dtype=torch.float32, seed=5), rand(n, dtype=torch.float32, seed=6)
    outs = []
    for serial in (False, True, True):
        monkeypatch.setattr(triton_gemv, "SERIAL_REDUCE", serial)
        out, _ = triton_gemv.gemv_rmsnorm(x, residual, norm.weight, EPS, w, b, out=poisoned(m, n, torch.float32), config=config)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert int(split_k.counters_on(x.device).abs().sum()) == 0


def test_bad_input_names_the_field():
    x, w = rand(2, 16, dtype=torch.float32, seed=0), rand(8, 16, dtype=torch.float32, seed=1)
    nw = torch.ones(16, device=DEVICE)
    with pytest.raises(ValueError, match="residual must be torch.float32 \\(2, 16\\)"):
        triton_gemv.gemv_rmsnorm(x, rand(2, 15, dtype=torch.float32, seed=2), nw, EPS, w)
    with pytest.raises(ValueError, match="norm_weight must be torch.float32 \\[16\\]"):
        triton_gemv.gemv_rmsnorm(x, None, torch.ones(15, device=DEVICE), EPS, w)
    with pytest.raises(ValueError, match="eps=-1.0 must be >= 0"):
        triton_gemv.gemv_rmsnorm(x, None, nw, -1.0, w)
    with pytest.raises(ValueError, match="x.shape\\[0\\]=9 is over the GEMV limit of 8"):
        triton_gemv.gemv_rmsnorm(rand(9, 16, dtype=torch.float32, seed=0), None, nw, EPS, w)
    with pytest.raises(ValueError, match="residual_out must be contiguous torch.float32 \\(2, 16\\)"):
        triton_gemv.gemv_rmsnorm(x, x, nw, EPS, w, residual_out=torch.empty(16, 2, device=DEVICE).T)


# -- dispatch from RMSNorm.then_linear ------------------------------------------------




def proj(k, n, dtype, bias=True):
    layer = ColumnParallelLinear(k, n, bias, LayerContext(dtype=dtype, device=DEVICE))
    layer.weight.data.copy_(rand(n, k, dtype=dtype, seed=5))
    if bias:
        layer.bias.data.copy_(rand(n, dtype=dtype, seed=6))
    return layer


@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
def test_then_linear_fused(gemv_calls, with_residual):
    k, n, dtype = 72, 40, torch.float32
    norm, linear = make_norm(k, dtype), proj(k, n, dtype)
    x = rand(2, 3, k, dtype=dtype, seed=8)  # 6 tokens with leading dims
    residual = rand(2, 3, k, dtype=dtype, seed=9) if with_residual else None
    out, new_residual = norm.then_linear(x, residual, linear)
    assert gemv_calls == ["gemv_rmsnorm"] and out.shape == (2, 3, n) and new_residual.shape == x.shape
    normed, h = unfused(norm, x, residual)
    assert torch.equal(new_residual, h)
    check(out.reshape(6, n), normed.reshape(6, k), linear.weight, linear.bias, dtype)


def test_then_linear_falls_back(gemv_calls, monkeypatch):
    """Quantized linears, tp > 1, more than 8 rows, the flag off, a None table entry: the norm, then the linear."""
    k, n, dtype = 64, 24, torch.float16
    norm = make_norm(k, dtype)
    x, residual = rand(3, k, dtype=dtype, seed=1), rand(3, k, dtype=dtype, seed=2)
    normed, h = unfused(norm, x, residual)

    def run_unfused(linear, x=x, residual=residual, normed=normed, h=h):
        out, new_residual = norm.then_linear(x, residual, linear)
        assert torch.equal(new_residual, h)
        check(out, normed, linear.weight, linear.bias, dtype)

    class OtherMethod(UnquantizedLinearMethod):  # stands for a quantized method: only the exact type fuses
        pass

    quantized = proj(k, n, dtype)
    quantized.linear_method = OtherMethod()
    run_unfused(quantized)
    sharded = proj(k, n, dtype)
    sharded.tp_size = 2
    run_unfused(sharded)
    assert gemv_calls == ["gemv", "gemv"]  # the norm (torch code on the CPU), then the GEMV through the linear
    linear = proj(k, n, dtype)
    triton_gemv.set_enabled(True, fuse_norm=False)  # FRAMEWORK_TRITON_GEMV_NORM=0
    run_unfused(linear)
    triton_gemv.set_enabled(True, fuse_norm=True)
    monkeypatch.setitem(gemv_configs.NORM_TUNED, (3, n, k), None)  # measured slower than norm + GEMV there
    run_unfused(linear)
    assert gemv_calls == ["gemv"] * 4
    big = rand(9, k, dtype=dtype, seed=3)
    out, new_residual = norm.then_linear(big, None, linear)  # over MAX_M: F.linear
    assert gemv_calls == ["gemv"] * 4 and new_residual is big
    check(out, norm._norm(big), linear.weight, linear.bias, dtype)
    triton_gemv.set_enabled(True)
    monkeypatch.setitem(gemv_configs.NORM_TUNED, (3, n, k), FMA)
    run_unfused(linear)
    assert gemv_calls[-1] == "gemv_rmsnorm"


def test_then_linear_on_cpu_is_the_torch_code():
    """CPU tensors: RMSNorm then the linear, exactly (no Triton)."""
    k, n, dtype = 32, 16, torch.float32
    norm = make_norm(k, dtype, device="cpu")
    linear = ColumnParallelLinear(k, n, True, LayerContext(dtype=dtype))
    linear.weight.data.normal_(generator=torch.Generator().manual_seed(0))
    linear.bias.data.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(2))
    residual = torch.randn(2, k, generator=torch.Generator().manual_seed(3))
    out, new_residual = norm.then_linear(x, residual, linear)
    normed, h = norm.cpu()(x, residual)
    assert torch.equal(new_residual, h) and torch.equal(out, F.linear(normed, linear.weight, linear.bias))
    out, new_residual = norm.then_linear(x, None, linear)
    assert new_residual is x and torch.equal(out, F.linear(norm(x), linear.weight, linear.bias))


# -- the Llama decoder layer ----------------------------------------------------------


def test_llama_decode_step_fuses_both_norms(gemv_calls):
    """A decode step of 3 one-token sequences through a 2-layer Llama: both norms of each layer fold into
    their projections (the first layer with no residual yet), the final norm stays alone; the logits match
    the torch path's."""
    import transformers

    from framework.forward_context import set_forward_context
    from framework.model_config import HFConfig
    from plugins.models.llama import LlamaForCausalLM
    from tests.models.test_llama_forward import TINY, CausalPerSequence, randomize

    config = transformers.LlamaConfig(**{**TINY, "attention_bias": True}).to_dict()
    model = LlamaForCausalLM(
        HFConfig(config, architectures=["LlamaForCausalLM"]),
        LayerContext(device=DEVICE, attention_backend=CausalPerSequence),
    )
    randomize(model)
    ids = torch.tensor([3, 70, 200], device=DEVICE)
    meta = SimpleNamespace(query_start_loc_np=np.arange(4, dtype=np.int32))

    def logits():
        with torch.no_grad(), set_forward_context(meta):
            return model.compute_logits(model(ids, torch.tensor([0, 0, 0], device=DEVICE)))

    fused = logits()
    assert gemv_calls.count("gemv_rmsnorm") == 2 * TINY["num_hidden_layers"]
    ops.set_enabled(False)  # every layer's torch code
    try:
        reference = logits()
    finally:
        ops.set_enabled(True)
    assert reference.std() > 1.0
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
