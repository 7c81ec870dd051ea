"""The Triton int4/int8 weight-only GEMM against a float64 dequantize-and-multiply.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set here, before
the kernel module is imported: ``triton.jit`` reads it at definition time),
in float32 and float16; with one, bfloat16 is added. The reference packs
random integer codes itself (not through the module's unpacking) and
computes ``x @ ((q - z) * s)`` in float64 from the same dtype-rounded x,
scales and zeros. Bounds are relative Frobenius errors (float32 arithmetic:
1e-5; float16 weights and outputs: 1e-3; bfloat16: 8e-3), plus an
elementwise bound so that a single unwritten or misplaced tile fails.
"""

from __future__ import annotations

import dataclasses
import importlib
import os

import pytest
import torch

if (
    not torch.cuda.is_available()
):  # before triton is imported: triton.language's own helpers are jit functions
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip(
    "triton", reason="triton is not installed: the Triton kernels cannot be tested"
)

from framework.ops import split_k
from plugins.quant import int4_configs, triton_int4

if (
    not torch.cuda.is_available()
    and "Interpreted" not in type(triton_int4._gemv_kernel).__name__
):
    triton_int4 = importlib.reload(
        triton_int4
    )  # imported before the interpreter was asked for

Config = int4_configs.Config
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
REL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def make_layer(n, k, group_size, bits, dtype, seed=0):
    """Random codes q [K, N], packed by hand; scales/zeros [G, N] in dtype; the float64 W^T [K, N]."""
    gen = torch.Generator().manual_seed(seed)
    pack = 32 // bits
    q = torch.randint(0, 2**bits, (k, n), generator=gen, dtype=torch.int64)
    words = torch.zeros(k // pack, n, dtype=torch.int64)
    for j in range(pack):  # slice j of word r holds row r * pack + j
        words |= q[j::pack] << (bits * j)
    qweight = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    groups = k // group_size
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.002).to(dtype)
    zeros = (
        torch.randint(0, 2**bits, (groups, n), generator=gen) + 0.5 * (bits == 8)
    ).to(dtype)
    rows = torch.arange(k) // group_size
    w_t = (q.double() - zeros.double()[rows]) * scales.double()[rows]
    return qweight, scales, zeros, w_t


def check(out, x, w_t, dtype):
    ref = x.double().cpu() @ w_t
    out = out.double().cpu()
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < REL[dtype], f"relative error {rel:.2e} over {REL[dtype]:.0e}"
    # every element near its reference: a stale or wrong tile is off by O(|ref|)
    bound = 20 * REL[dtype] * ref.abs().max().item()
    worst = (out - ref).abs().max().item()
    assert worst < bound, f"max abs error {worst:.3g} over {bound:.3g}"


def run_case(m, n, k, group_size, bits, dtype, config=None, seed=0):
    qweight, scales, zeros, w_t = make_layer(n, k, group_size, bits, dtype, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    args = [t.to(DEVICE) for t in (x, qweight, scales, zeros)]
    out = triton_int4.int4_matmul(*args, group_size, bits, config=config)
    assert out.dtype == dtype and out.device.type == DEVICE
    check(out, x, w_t, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("group", [32, 128, "K"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_matches_reference(m, bits, group, dtype):
    # N = 200: not a power of two, crosses 32/64/128-wide column blocks; K spans several K steps
    k = 384 if group == "K" else 256
    run_case(m, 200, k, k if group == "K" else group, bits, dtype, seed=m * 7 + bits)


# explicit configs: every path, uneven split-K (8 K steps over 3 programs), tiles wider than M and N
PATHS = [
    (1, Config("gemv", 1, 32, 32, split_k=3)),
    (1, Config("gemv", 1, 256, 64, split_k=1)),
    (5, Config("gemm", 16, 32, 32, split_k=3)),
    (33, Config("gemm", 64, 64, 32, split_k=2)),
    (33, Config("gemm", 16, 256, 32, split_k=1)),
    (40, Config("dequant")),
]


@pytest.mark.parametrize(
    "bits,dtype", [(4, DTYPES[-1]), (8, torch.float32)], ids=["int4-16bit", "int8-fp32"]
)
@pytest.mark.parametrize(
    "m,config",
    PATHS,
    ids=[f"{c.kind}-m{m}-s{c.split_k}-n{c.block_n}" for m, c in PATHS],
)
def test_paths(m, config, bits, dtype):
    run_case(m, 72, 256, 32, bits, dtype, config=config, seed=3)


@pytest.mark.parametrize(
    "serial", [True, False], ids=["in-kernel-reduce", "two-kernel-reduce"]
)
@pytest.mark.parametrize(
    "m,config",
    [
        # 4 groups of 32 per K step (scales per packed row); 2 groups a step, one step a program;
        # uneven: 8 steps over 4 programs of 2; a gemm tile
        (1, Config("gemv", 1, 32, 128, split_k=2)),
        (1, Config("gemv", 1, 64, 64, split_k=4)),
        (1, Config("gemv", 1, 16, 32, split_k=5)),
        (7, Config("gemm", 16, 32, 32, split_k=4)),
    ],
    ids=["gemv-multigroup-s2", "gemv-multigroup-s4", "gemv-s5", "gemm-s4"],
)
def test_split_reduction(m, config, serial, monkeypatch):
    """Split-K partial sums added in the kernel (arrival counters) or by the second kernel; the counters
    are left at zero, and a second call (reusing them) gives the identical result."""
    monkeypatch.setattr(triton_int4, "SERIAL_REDUCE", {"gemv": serial, "gemm": serial})
    qweight, scales, zeros, w_t = make_layer(72, 256, 32, 4, torch.float32, seed=11)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(12))
    args = [t.to(DEVICE) for t in (x, qweight, scales, zeros)]
    out = triton_int4.int4_matmul(*args, 32, 4, config=config)
    check(out, x, w_t, torch.float32)
    again = triton_int4.int4_matmul(*args, 32, 4, config=config)
    assert torch.equal(out, again)
    counters = split_k.counters_on(torch.device(DEVICE))
    if serial:
        assert counters is not None and int(counters.abs().sum()) == 0


def test_tuned_table_configs_run():
    """Every measured config in TUNED fits its key and runs correctly (on a small shape: same kernels, same
    constexprs, with split-K and group crossing as the table has them)."""
    seen = set()
    for (m, n, k, group, bits), cfg in int4_configs.TUNED.items():
        assert m == int4_configs.m_bucket(m) and k % group == 0 and n > 0
        assert (cfg.kind == "gemv") == (m == 1) and cfg.split_k >= 1
        if cfg.kind == "gemm":
            assert cfg.block_m >= min(m, 64) or m > 64
        if cfg.kind != "dequant" and (cfg, bits) not in seen:
            seen.add((cfg, bits))
            small = dataclasses.replace(
                cfg, block_m=min(cfg.block_m, 16), block_n=min(cfg.block_n, 32)
            )
            run_case(
                min(m, 3),
                40,
                1024,
                128,
                bits,
                torch.float32,
                config=small,
                seed=m + bits,
            )


def test_block_k_steps():
    assert int4_configs._block_k(128, 64) == 64
    assert int4_configs._block_k(128, 256) == 128  # gemm: never more than a group
    assert int4_configs._block_k(128, 512, 4096) == 512  # gemv: several whole groups
    assert int4_configs._block_k(128, 512, 14336) == 512
    assert int4_configs._block_k(128, 512, 128 * 6) == 256  # must divide K
    # a group that is not a power of two: a power-of-two divisor of it
    assert int4_configs._block_k(96, 512, 96 * 8) == 32


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 64)])
def test_dequantize_triton(bits, group, dtype):
    qweight, scales, zeros, w_t = make_layer(72, 256, group, bits, dtype, seed=5)
    w = triton_int4.dequantize_triton(
        qweight.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), group, bits
    )
    assert w.dtype == dtype and w.shape == (256, 72)
    torch.testing.assert_close(
        w.cpu(), w_t.to(dtype), rtol=0, atol=0
    )  # (q - z) * s in fp32, one rounding
    torch.testing.assert_close(
        triton_int4.dequantize_torch(qweight, scales, zeros, group, bits), w_t.to(dtype)
    )


def test_candidate_configs_are_valid():
    """Every config tuning may pick runs the op correctly (small shape, as the interpreter allows)."""
    for m in (1, 6, 100):
        for cfg in int4_configs.candidate_configs(m, 72, 128, 128, torch.device(DEVICE)):
            if cfg.block_n <= 128 and cfg.block_m <= 64:  # keep the interpreter quick
                run_case(m, 72, 128, 128, 4, torch.float32, config=cfg, seed=m)
            assert cfg.kind in ("gemv", "gemm", "dequant") and (
                cfg.kind != "gemv" or m == 1
            )
            assert cfg.split_k >= 1


def test_empty_batch_and_cpu_fallback(monkeypatch):
    qweight, scales, zeros, w_t = make_layer(40, 64, 32, 4, torch.float32)
    out = triton_int4.int4_matmul(torch.empty(0, 64), qweight, scales, zeros, 32)
    assert out.shape == (0, 40)
    monkeypatch.setenv(
        "TRITON_INTERPRET", "0"
    )  # CPU tensors without the interpreter: torch code
    x = torch.randn(3, 64)
    check(triton_int4.int4_matmul(x, qweight, scales, zeros, 32), x, w_t, torch.float32)


def test_bad_input_names_the_field():
    qweight, scales, zeros, _ = make_layer(40, 64, 32, 4, torch.float32)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="bits"):
        triton_int4.int4_matmul(x, qweight, scales, zeros, 32, bits=3)
    with pytest.raises(ValueError, match="group_size"):
        triton_int4.int4_matmul(x, qweight, scales, zeros, 48)
    with pytest.raises(ValueError, match="scales"):
        triton_int4.int4_matmul(x, qweight, scales[:1], zeros, 32)
    with pytest.raises(ValueError, match="zeros"):
        triton_int4.int4_matmul(x, qweight, scales, zeros.half(), 32)
    with pytest.raises(ValueError, match="qweight"):
        triton_int4.int4_matmul(x, qweight[:4], scales, zeros, 32)
    with pytest.raises(ValueError, match="gemv"):
        triton_int4.int4_matmul(
            x, qweight, scales, zeros, 32, config=Config("gemv", 1, 32, 32)
        )


def test_m_bucket_and_capture_free_choice():
    assert [int4_configs.m_bucket(m) for m in (1, 2, 3, 16, 17, 256)] == [
        1,
        2,
        4,
        16,
        32,
        256,
    ]
    cfg = int4_configs.heuristic_config(1, 4096, 4096, 128, torch.device(DEVICE))
    assert cfg.kind == "gemv" and cfg.split_k >= 1
