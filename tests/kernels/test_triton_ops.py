"""The fused Triton ops of framework.ops against the layers' torch code.

On the CPU the kernels run under ``TRITON_INTERPRET=1`` (conftest.py) with
float32 and float16; on a GPU bfloat16 is added. The torch code of each layer
is the reference: the sums and products that torch rounds to the dtype are
rounded at the same points, so the residual sum and the rotary output are
compared exactly, the others within a unit or two in the last place.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from framework import ops  # noqa: E402
from framework.layers import LayerContext, RMSNorm, SiluAndMul, get_rope  # noqa: E402
from framework.ops import triton_activation, triton_rmsnorm, triton_rotary  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# tolerance of the ops that round a transcendental result (rsqrt, exp) once more than torch may
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


@pytest.fixture
def torch_code():
    """Run a block with the layers on their torch code (the reference)."""
    ops.set_enabled(False)
    yield
    ops.set_enabled(True)


def rmsnorm_layer(hidden, dtype, seed=0):
    norm = RMSNorm(hidden, 1e-5, LayerContext(dtype=dtype, device=DEVICE))
    norm.weight.data.copy_(torch.rand(hidden, generator=torch.Generator().manual_seed(seed)) + 0.5)
    return norm


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("hidden,rows", [(64, 5), (96, 3), (4096, 2)])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(hidden, rows, dtype, with_residual):
    norm = rmsnorm_layer(hidden, dtype)
    wide = (torch.randn(rows, hidden + 8) * 3).to(DEVICE, dtype)
    x = wide[:, :hidden]  # strided rows, as a slice of a larger activation
    residual = torch.randn(rows, hidden).to(DEVICE, dtype) if with_residual else None
    out = triton_rmsnorm.rms_norm(x, norm.weight, norm.eps, residual)
    ops.set_enabled(False)
    try:
        ref = norm(x, residual)
    finally:
        ops.set_enabled(True)
    if with_residual:
        out, summed = out
        ref, ref_summed = ref
        assert torch.equal(summed, ref_summed)  # x + residual, rounded once, as torch does
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,partial", [(4, 2, 64, 1.0), (6, 1, 128, 1.0), (4, 4, 64, 0.5)]
)
def test_rotary(num_heads, num_kv_heads, head_dim, partial, dtype):
    rope = get_rope(
        head_dim, 256, {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial},
        dtype=dtype, device=DEVICE,
    )  # fmt: skip
    positions = torch.tensor([0, 1, 5, 17, 255, 2, 100], device=DEVICE)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(len(positions), q_size + 2 * kv_size).to(DEVICE, dtype)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)  # strided views, as the model passes them
    before = qkv.clone()
    q_out, k_out = triton_rotary.rotary_embedding(positions, q, k, rope.cos_sin_cache, head_dim, rope.rotary_dim)
    assert torch.equal(qkv, before)  # the inputs are left alone
    ops.set_enabled(False)
    try:
        q_ref, k_ref = rope(positions, q, k)
    finally:
        ops.set_enabled(True)
    # Products and sums are rounded where torch rounds them: equal up to
    # float32 contraction of a*b - c into one fma on the GPU.
    tol = 0 if dtype != torch.float32 or DEVICE == "cpu" else 1e-6
    torch.testing.assert_close(q_out, q_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(k_out, k_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(3, 200), (2, 5, 128), (1, 2 * 1500)])
def test_silu_and_mul(shape, dtype):
    x = (torch.randn(shape) * 4).to(DEVICE, dtype)
    out = triton_activation.silu_and_mul(x)
    d = shape[-1] // 2
    ref = F.silu(x[..., :d]) * x[..., d:]
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=TOL[dtype], atol=TOL[dtype])


def test_layers_dispatch_to_the_fused_ops(monkeypatch):
    """With ``use_triton`` true the layers call the kernels (run here by the interpreter on CPU)."""
    calls = []
    fused_ops = [(triton_rmsnorm, "rms_norm"), (triton_rotary, "rotary_embedding"), (triton_activation, "silu_and_mul")]
    for module, name in fused_ops:
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    dtype = torch.float32
    norm = rmsnorm_layer(64, dtype)
    rope = get_rope(16, 64, {"rope_type": "default", "rope_theta": 10000.0}, dtype=dtype, device=DEVICE)
    x, r = torch.randn(3, 64, device=DEVICE), torch.randn(3, 64, device=DEVICE)
    positions = torch.tensor([0, 7, 63], device=DEVICE)

    def run():
        return norm(x), norm(x, r), rope(positions, x[:, :32], x[:, 32:]), SiluAndMul()(x)

    monkeypatch.setattr(ops, "use_triton", lambda t: True)
    fused = run()
    assert calls == ["rms_norm", "rms_norm", "rotary_embedding", "silu_and_mul"]
    monkeypatch.setattr(ops, "use_triton", lambda t: False)
    reference = run()
    assert len(calls) == 4
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


def test_use_triton_only_on_cuda_and_when_enabled(torch_code):
    assert not ops.use_triton(torch.zeros(1))  # disabled (fixture)
    ops.set_enabled(True)
    assert not ops.use_triton(torch.zeros(1))  # a CPU tensor: the torch code
    assert ops.triton_available()
