"""The Triton small-M GEMV (framework.ops.triton_gemv) against F.linear in float64.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set here, before
triton is imported: ``triton.jit`` reads it at definition time) in float32
and float16; with one, bfloat16 is added. The reference is ``F.linear`` in
float64 on the same dtype-rounded inputs. Bounds: the relative Frobenius
error (float32 arithmetic: 1e-5; float16 output rounding: 1e-3; bfloat16:
8e-3), and per element a bound of a few units in the last place of
``|x| @ |W|^T`` (so one unwritten or misplaced tile fails). Outputs are
poisoned with NaN before each run, so an element left unwritten fails.
"""

from __future__ import annotations

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
    check,
    dtype_id,
    poisoned,
    rand,
    triton_gemv,
)

from framework.ops import gemv_configs, split_k
from framework.layers import LayerContext, RowParallelLinear, SiluAndMul


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "m,n,k,config",
    [
        (1, 40, 96, FMA),  # N and K cross block boundaries (K not a multiple of BLOCK_K)
        (1, 33, 200, FMA_SPLIT),  # split-K with a ragged last slice
        (1, 48, 128, DOT),  # M padded to 16 in the tensor-core loop; K even
        (3, 37, 160, FMA),  # M not a power of two: BLOCK_M = 4, one row masked
        (3, 70, 100, DOT_SPLIT),
        (8, 24, 72, FMA_SPLIT),
        (8, 50, 136, DOT),
        (5, 17, 48, None),  # the heuristic config
    ],
)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_gemv(m, n, k, config, dtype, with_bias):
    x = rand(m, k, dtype=dtype, seed=m * 1000 + n)
    w = rand(n, k, dtype=dtype, seed=k)
    b = rand(n, dtype=dtype, seed=7) if with_bias else None
    out = triton_gemv.gemv(x, w, b, out=poisoned(m, n, dtype), config=config)
    check(out, x, w, b, dtype)


@pytest.mark.parametrize("silu", [False, True], ids=["gemv", "silu"])
@pytest.mark.parametrize("m,n,k,config", [(1, 33, 200, FMA_SPLIT), (3, 70, 100, DOT_SPLIT)])
def test_split_reduction_in_kernel_equals_second_launch(m, n, k, config, silu, monkeypatch):
    """The last program of a tile adds the partials in split order: bitwise what the second kernel gives;
    the arrival counters are left at zero, so the next launch (or a CUDA-graph replay) starts clean."""
    x = rand(m, 2 * k if silu else k, dtype=torch.float32, seed=3)
    w = rand(n, k, dtype=torch.float32, seed=4)
    b = rand(n, dtype=torch.float32, seed=5)
    run = triton_gemv.gemv_silu_mul if silu else triton_gemv.gemv
    outs = []
    for serial in (False, True, True):
        monkeypatch.setattr(triton_gemv, "SERIAL_REDUCE", serial)
        outs.append(run(x, w, b, out=poisoned(m, n, torch.float32), config=config))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    counters = split_k.counters_on(x.device)
    assert int(counters.abs().sum()) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gemv_strided(dtype):
    """Rows of x and of the output taken from wider tensors (their row strides are passed to the kernel)."""
    m, n, k = 3, 40, 96
    x = rand(m, k + 24, dtype=dtype, seed=1)[:, 8 : 8 + k]
    w = rand(n, k, dtype=dtype, seed=2)
    out_wide = torch.full((m, n + 16), 7.0, dtype=dtype, device=DEVICE)
    out_wide[:, :n] = float("nan")
    triton_gemv.gemv(x, w, out=out_wide[:, :n], config=FMA_SPLIT)
    check(out_wide[:, :n], x, w, None, dtype)
    assert (out_wide[:, n:] == 7).all(), "wrote past the output's columns"


def silu_mul_torch(gate_up):
    """``SiluAndMul``'s torch code: silu rounded to the dtype, then the product rounded."""
    d = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :d]) * gate_up[..., d:]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m,config", [(1, FMA), (2, FMA_SPLIT), (4, DOT), (8, DOT_SPLIT)])
def test_gemv_silu_mul(m, config, dtype):
    n, inter = 36, 80
    gate_up = rand(m, 2 * inter, dtype=dtype, seed=m) * 2
    w = rand(n, inter, dtype=dtype, seed=3)
    b = rand(n, dtype=dtype, seed=4)
    out = triton_gemv.gemv_silu_mul(gate_up, w, b, out=poisoned(m, n, dtype), config=config)
    # the kernel's silu uses its own exp: a product may round one ulp apart from torch's, far inside the bounds
    check(out, silu_mul_torch(gate_up), w, b, dtype)


def test_bad_input_names_the_field():
    x = rand(2, 16, dtype=torch.float32, seed=0)
    w = rand(8, 16, dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match="x.shape\\[0\\]=9 is over the GEMV limit of 8"):
        triton_gemv.gemv(rand(9, 16, dtype=torch.float32, seed=0), w)
    with pytest.raises(ValueError, match="weight must be"):
        triton_gemv.gemv(x, rand(8, 15, dtype=torch.float32, seed=1))
    with pytest.raises(ValueError, match="bias must be"):
        triton_gemv.gemv(x, w, rand(7, dtype=torch.float32, seed=2))
    with pytest.raises(ValueError, match="x.dtype=torch.int32 is not supported"):
        triton_gemv.gemv(x.to(torch.int32), w.to(torch.int32))
    with pytest.raises(ValueError, match="gate_up must be 2-D \\[M, 2I\\] with an even last dim"):
        triton_gemv.gemv_silu_mul(rand(2, 15, dtype=torch.float32, seed=0), w)


def test_split_count():
    """Split-K only when the N tiles would not fill about two waves of the SMs."""
    assert gemv_configs.auto_split(28672, 4096, 8, 512, sms=132) == 1
    assert gemv_configs.auto_split(4096, 4096, 64, 128, sms=132) == 5  # 64 tiles -> 320 programs
    assert gemv_configs.auto_split(64, 256, 64, 128, sms=132) == 2  # never more slices than K blocks


# -- dispatch from the layers ---------------------------------------------------------




def down_layer(inter, hidden, dtype, bias=True):
    layer = RowParallelLinear(inter, hidden, bias, LayerContext(dtype=dtype, device=DEVICE))
    layer.weight.data.copy_(rand(hidden, inter, dtype=dtype, seed=5))
    layer.bias.data.copy_(rand(hidden, dtype=dtype, seed=6))
    return layer


def test_linear_dispatch(gemv_calls):
    layer = down_layer(72, 40, torch.float32)
    x = rand(2, 3, 72, dtype=torch.float32, seed=8)  # 6 tokens with leading dims
    out = layer(x)
    assert gemv_calls == ["gemv"] and out.shape == (2, 3, 40)
    check(out.reshape(6, 40), x.reshape(6, 72), layer.weight, layer.bias, torch.float32)
    layer(rand(9, 72, dtype=torch.float32, seed=9))  # over MAX_M: F.linear
    gemv_configs.TUNED[(6, 40, 72)] = None  # measured slower than F.linear at this key: F.linear
    try:
        layer(x)
    finally:
        del gemv_configs.TUNED[(6, 40, 72)]
    triton_gemv.set_enabled(False)  # FRAMEWORK_TRITON_GEMV=0: F.linear
    layer(x)
    assert gemv_calls == ["gemv"]


def test_silu_mul_linear_dispatch(gemv_calls):
    inter, hidden = 64, 40
    down = down_layer(inter, hidden, torch.float16)
    act = SiluAndMul()
    gate_up = rand(3, 2 * inter, dtype=torch.float16, seed=10)
    out = act.then_linear(gate_up, down)
    assert gemv_calls == ["gemv_silu_mul"]
    check(out, silu_mul_torch(gate_up), down.weight, down.bias, torch.float16)
    triton_gemv.set_enabled(True, fuse_silu_mul=False)  # FRAMEWORK_TRITON_GEMV_SILU=0: SiluAndMul, then the GEMV
    act.then_linear(gate_up, down)
    assert gemv_calls == ["gemv_silu_mul", "gemv"]


def test_cuda_tensors_take_it_only_while_graphs_are_built(monkeypatch):
    """On CUDA the GEMV is for graph replays: an eager step of a few rows is launch-bound, and cuBLAS
    launches cost the host less. CPU tensors (the interpreter) take it whenever it applies."""
    from types import SimpleNamespace

    weight = torch.zeros(4096, 4096, dtype=torch.bfloat16)
    cpu = torch.zeros(1, 4096, dtype=torch.bfloat16)
    cuda = SimpleNamespace(shape=cpu.shape, dtype=cpu.dtype, is_cuda=True)  # only what applies() reads
    monkeypatch.setattr(triton_gemv, "_in_eager_steps", False)
    assert triton_gemv.applies(cpu, weight)
    assert not triton_gemv.applies(cuda, weight)
    with triton_gemv.building_graphs():
        assert triton_gemv.applies(cuda, weight)
        with triton_gemv.building_graphs():
            assert triton_gemv.applies(cuda, weight)
        assert triton_gemv.applies(cuda, weight)
    assert not triton_gemv.applies(cuda, weight)
    monkeypatch.setattr(triton_gemv, "_in_eager_steps", True)  # FRAMEWORK_TRITON_GEMV_EAGER=1
    assert triton_gemv.applies(cuda, weight)
