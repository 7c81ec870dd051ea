"""RMSNorm (against transformers' LlamaRMSNorm) and SiluAndMul."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from framework.layers import LayerContext, RMSNorm, SiluAndMul


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers(dtype):
    torch.manual_seed(0)
    w = torch.rand(16) + 0.5
    ours = RMSNorm(16, 1e-5, LayerContext(dtype=dtype))
    ours.weight.weight_loader(ours.weight, w)
    ref = LlamaRMSNorm(16, eps=1e-5).to(dtype)
    ref.weight.data.copy_(w)
    x = (torch.randn(5, 16) * 3).to(dtype)
    assert torch.equal(ours(x), ref(x))


def test_rmsnorm_fused_residual_add():
    torch.manual_seed(0)
    norm = RMSNorm(16, 1e-6)
    norm.weight.data.uniform_(0.5, 1.5)
    x, r = torch.randn(3, 16), torch.randn(3, 16)
    out, residual = norm(x, r)
    torch.testing.assert_close(residual, x + r)
    torch.testing.assert_close(out, norm(x + r))
    assert not torch.allclose(out, norm(x))


def test_silu_and_mul():
    x = torch.randn(3, 10)
    torch.testing.assert_close(SiluAndMul()(x), F.silu(x[:, :5]) * x[:, 5:])
