"""The RMSNorm between two int4 projections, split across their kernels (``int4_mma.mma_matmul``'s
``add_norm`` / ``norm_scale``, ``RMSNorm.linear_between``): against the norm computed on its own, on the
Triton interpreter (CPU-only hosts) and on the GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from framework.layers.norm import RMSNorm
from plugins.quant import int4_mma
from plugins.quant import int4_mma_layout as layout

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
EPS = 1e-5


def _packed(n: int, k: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // 64, n, generator=gen) * 0.02 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, (k // 64, n), generator=gen).to(dtype)
    return layout.repack(q).to(DEVICE), layout.pack_scales(scales, zeros).to(DEVICE)


PROGRAMS = [
    {},  # DEFAULT: split-K through the workspace, the last program of a tile writes it
    {"rows": 1, "kslices": 2, "unroll": 1, "split": 1, "num_warps": 2},  # one split: the program writes
    {"rows": 2, "kslices": 2, "unroll": 1, "split": 1, "num_warps": 4, "ring": True, "interleave": True},
    {"rows": 2, "unroll": 1, "split": 3, "num_warps": 2},
]
DTYPES = [torch.float16] + ([torch.bfloat16] if CUDA else [])  # the interpreter rounds bf16 otherwise than GPUs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 9])
@pytest.mark.parametrize("program", PROGRAMS)
def test_norm_split_across_two_projections(dtype, m, program):
    """o = x @ A^T; h = o + residual; y = RMSNorm(h) @ B^T, with A's kernel writing h, h * w and the partial
    sums of h^2, and B's kernel scaling its sums: h as the separate add rounds it, y within the one rounding
    of the normalised row that the split leaves out."""
    hidden, inter, n_out = 256, 192, 160  # A: 192 -> 256 (16 row blocks), B: 256 -> 160
    qa, sa = _packed(hidden, inter, dtype, 1)
    qb, sb = _packed(n_out, hidden, dtype, 2)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, inter, generator=gen).to(dtype).to(DEVICE)
    residual = torch.randn(m, hidden, generator=gen).to(dtype).to(DEVICE)
    w = (torch.rand(hidden, generator=gen) + 0.5).to(dtype).to(DEVICE)
    a, h, stats = int4_mma.mma_matmul(x, qa, sa, 64, add_norm=(residual, w), **program)
    y = int4_mma.mma_matmul(a, qb, sb, 64, norm_scale=(stats, EPS), **program)

    o = layout.reference_matmul(x.cpu(), qa.cpu(), sa.cpu(), 64)
    h_ref = (o.float() + residual.cpu().float()).to(dtype)
    norm = RMSNorm(hidden, EPS)
    norm.weight.data = w.cpu()
    y_ref = layout.reference_matmul(norm(h_ref), qb.cpu(), sb.cpu(), 64).float()
    ulp = 2.0 ** (-10 if dtype == torch.float16 else -7)
    # h: o summed in another order than the reference's can round one step apart
    assert ((h.cpu().float() - h_ref.float()).abs() <= ulp * h_ref.float().abs() + 1e-6).all()
    assert torch.equal(a.cpu(), (h.cpu().float() * w.cpu().float()).to(dtype))
    torch.testing.assert_close(stats.cpu().sum(1), h.cpu().float().pow(2).sum(1), rtol=1e-5, atol=0)
    assert ((y.cpu().float() - y_ref).abs().max() / y_ref.abs().max()).item() < 4 * ulp


def test_refusals():
    qa, sa = _packed(64, 128, torch.float16, 0)
    x = torch.randn(2, 128).to(torch.float16).to(DEVICE)
    res = torch.randn(2, 64).to(torch.float16).to(DEVICE)
    w = torch.ones(64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="residual must be a contiguous"):
        int4_mma.mma_matmul(x, qa, sa, 64, add_norm=(res[:, :32], w))
    with pytest.raises(ValueError, match="norm weight must be contiguous"):
        int4_mma.mma_matmul(x, qa, sa, 64, add_norm=(res, w[:32]))
    with pytest.raises(ValueError, match="not paired"):
        int4_mma.mma_matmul(x, qa, sa, 64, add_norm=(res, w), paired=True)
    with pytest.raises(ValueError, match="statistics must be contiguous float32"):
        int4_mma.mma_matmul(x, qa, sa, 64, norm_scale=(torch.zeros(2, 4, dtype=torch.float16), EPS))


# -- RMSNorm.linear_between: which path it takes ------------------------------------------------------------


class _Method:
    """A float32 method with the fused hooks done in torch (h * w, h, sum of h^2), counting their calls."""

    def __init__(self, fuses: bool = True):
        self.fuses, self.calls = fuses, []

    def apply(self, layer, x, bias=None):
        return F.linear(x, layer.weight, bias)

    def fuses_rmsnorm(self, layer, rows):
        return self.fuses

    def apply_add_rmsnorm(self, layer, x, residual, norm_weight):
        self.calls.append("add_rmsnorm")
        h = self.apply(layer, x) + residual
        return h * norm_weight, h, h.pow(2).sum(-1, keepdim=True)

    def apply_rmsnormed(self, layer, x, stats, eps, bias=None):
        self.calls.append("rmsnormed")
        return self.apply(layer, x * torch.rsqrt(stats / x.shape[-1] + eps), bias)


class _Linear(nn.Module):
    def __init__(self, n: int, k: int, method: _Method, bias: bool = False, tp_size: int = 1, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(n, k, generator=gen) / k**0.5
        self.bias = torch.randn(n, generator=gen) if bias else None
        self.linear_method, self.tp_size = method, tp_size

    def forward(self, x):
        return self.linear_method.apply(self, x, self.bias)


@pytest.mark.parametrize("case", ["fused", "producer bias", "sharded", "consumer declines"])
def test_linear_between_takes_the_fused_kernels_only_where_it_may(case):
    pm, cm = _Method(), _Method(fuses=case != "consumer declines")
    producer = _Linear(32, 24, pm, bias=case == "producer bias", tp_size=2 if case == "sharded" else 1)
    consumer = _Linear(16, 32, cm, bias=True, seed=1)
    norm = RMSNorm(32, EPS)
    norm.weight.data = torch.rand(32, generator=torch.Generator().manual_seed(3)) + 0.5
    x, residual = torch.randn(3, 24), torch.randn(3, 32)
    out, summed = norm.linear_between(producer, x, residual, consumer)
    expect_summed = producer(x) + residual
    torch.testing.assert_close(summed, expect_summed)
    torch.testing.assert_close(out, consumer(norm(expect_summed)), rtol=1e-5, atol=1e-5)
    fused = case == "fused"
    assert pm.calls == (["add_rmsnorm"] if fused else []) and cm.calls == (["rmsnormed"] if fused else [])


# -- in a model --------------------------------------------------------------------------------------------


def test_model_runs_the_norm_in_the_projections(tmp_path, monkeypatch):
    """A 4-bit GPTQ tiny Llama in fp16 with the tensor-core layout (interpreted on CPU-only hosts): decode steps
    run each post-attention norm in the o and gate/up kernels, and the model still matches transformers on the
    dequantized weights."""
    import quant_harness as harness  # tests/quant/conftest.py puts this directory on sys.path
    import reference_formats as ref

    from framework.testing import make_tiny_model
    from plugins.quant import int4_common

    if not CUDA:
        monkeypatch.setattr(int4_common, "_mma_usable", lambda device, dtype: True)
    calls = []
    matmul = int4_mma.matmul

    def spy(*args, **kw):
        calls.append("add_norm" if kw.get("add_norm") is not None else "norm_scale" if kw.get("norm_scale") is not None else "")
        return matmul(*args, **kw)

    monkeypatch.setattr(int4_mma, "matmul", spy)
    src = make_tiny_model("LlamaForCausalLM", tmp_path / "m", **{**harness.TINY, "num_hidden_layers": 2})
    qdir, rdir = ref.quantize_checkpoint(src, tmp_path / "q", tmp_path / "ref", "gptq", bits=4, group_size=64)
    llm = harness.build_engine(qdir, dtype="float16", device=DEVICE)
    harness.assert_matches_reference(llm, rdir, max_tokens=2 if not CUDA else 8, tol=3e-2 if not CUDA else 1e-1)
    assert calls.count("add_norm") >= 2 and calls.count("add_norm") == calls.count("norm_scale")
