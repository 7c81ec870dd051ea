"""The tensor-core int4 layout (plugins/quant/int4_mma.py).

On the CPU: the layout against an independent reading of its documented bit
positions, the scale/zero packing, the torch reference against the
dequantization of the engine's other int4 layout, and the kernel's inline PTX
run on an emulated warp (``ptx_emu``) with the operands the Triton loop gives
each lane. The Triton interpreter cannot run inline asm, so the kernel as
compiled is checked by the CUDA tests here and ``benchmarks/check_int4_mma.py``
on a GPU (and by ``int4_mma.usable`` at load time).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plugins.quant import int4_mma
from plugins.quant import int4_mma_layout as layout
from plugins.quant.int4_mma_tuned import CHECKED
from plugins.quant.int4_common import apply_int_weight, dequantize, pack_rows, set_int_layout

CUDA = torch.cuda.is_available()


def _layer(n: int, k: int, group: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // group, n, generator=gen) * 0.05 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, (k // group, n), generator=gen).to(dtype)
    return q.to(device), scales.to(device), zeros.to(device)


def _code_at(words: torch.Tensor, k: int, n: int) -> int:
    """The code of (input k, output n), read from the module docstring's description of the layout."""
    r, h, g = n // 16, (n % 16) // 8, n % 8
    sb, t, j, e = k // 64, (k % 64) // 16, (k % 16) // 4, k % 4
    lane = 4 * g + t
    # bits (0-3, 16-19): row g at the lane's inputs 0, 1; (4-7, 20-23): row g+8 at 0, 1;
    # (8-11, 24-27): row g at 2, 3; (12-15, 28-31): row g+8 at 2, 3
    bit = {0: 0, 1: 16, 2: 8, 3: 24}[e] + 4 * h
    return (int(words[r, sb, lane, j]) >> bit) & 15


def test_repack_puts_each_code_where_the_layout_says():
    k, n = 192, 48
    q, _, _ = _layer(n, k, 64, torch.bfloat16)
    words = layout.repack(q)
    assert words.shape == (n // 16, k // 64, 32, 4) and words.dtype == torch.int32
    gen = torch.Generator().manual_seed(1)
    for kk, nn_ in zip(torch.randint(0, k, (300,), generator=gen).tolist(), torch.randint(0, n, (300,), generator=gen).tolist()):
        assert _code_at(words, kk, nn_) == int(q[kk, nn_]), (kk, nn_)
    assert torch.equal(layout.unpack(words), q)


def test_repack_top_code_fills_the_sign_bit():
    q = torch.full((64, 16), 15, dtype=torch.int32)
    words = layout.repack(q)
    assert (words == -1).all()  # 0xFFFFFFFF
    assert torch.equal(layout.unpack(words), q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pack_scales_round_trip(dtype):
    _, scales, zeros = _layer(32, 256, 64, dtype)
    szp = layout.pack_scales(scales, zeros)
    assert szp.shape == (2, 4, 8, 2)
    s, z = layout.unpack_scales(szp, dtype)
    assert torch.equal(s, scales) and torch.equal(z, zeros)
    # word (r, gi, g, 0): -(magic + zero) of rows 16r+g (low half) and 16r+g+8 (high half)
    low = torch.tensor([int(szp[1, 2, 3, 0]) & 0xFFFF], dtype=torch.int32).to(torch.int16).view(dtype)
    assert float(low) == -(layout.MAGIC_VALUE[dtype] + float(zeros[2, 16 + 3]))
    high = torch.tensor([(int(szp[1, 2, 3, 1]) >> 16) & 0xFFFF], dtype=torch.int32).to(torch.int16).view(dtype)
    assert float(high) == float(scales[2, 16 + 8 + 3])


def test_pack_scales_rejects_what_it_cannot_hold():
    _, scales, zeros = _layer(16, 64, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="zero points"):
        layout.pack_scales(scales, zeros + 0.5)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        layout.pack_scales(scales.float(), zeros.float())


@pytest.mark.parametrize("group", [64, 128, 256])
def test_reference_matches_the_other_layout(group):
    k, n = 256, 64
    q, scales, zeros = _layer(n, k, group, torch.bfloat16, seed=group)
    x = torch.randn(3, k).to(torch.bfloat16)
    ref = layout.reference_matmul(x, layout.repack(q), layout.pack_scales(scales, zeros), group)
    w = dequantize(pack_rows(q, 4), scales, zeros, 4, group)  # [N, K] in bf16
    expect = (x.float() @ w.float().t()).to(torch.bfloat16)
    torch.testing.assert_close(ref, expect, rtol=0, atol=0)


def test_supported_shapes():
    assert layout.supported(4096, 4096, 128, 4)
    assert layout.supported(48, 320, 320, 4)
    assert not layout.supported(4096, 4096, 128, 8)
    assert not layout.supported(40, 4096, 128, 4)  # rows not a multiple of 16
    assert not layout.supported(4096, 4096, 32, 4)  # a superblock would span two groups
    assert layout.supported(64, 4160, 4160, 4)  # 65 superblocks, one group
    assert not layout.supported(64, 4128, 4128, 4)  # K not a multiple of 64


def test_aligned():
    x = torch.zeros(4, 128, dtype=torch.bfloat16)
    assert int4_mma.aligned(x)
    assert not int4_mma.aligned(x[:, 1:])
    assert not int4_mma.aligned(x.t())


def test_cpu_layers_keep_one_copy():
    layer = nn.Module()
    q, scales, zeros = _layer(32, 128, 64, torch.bfloat16)
    set_int_layout(layer, pack_rows(q, 4), scales, zeros, None, 4, 64)
    assert layer.mma_qweight is None and layer.mma_szp is None
    x = torch.randn(2, 128).to(torch.bfloat16)
    expect = layout.reference_matmul(x, layout.repack(q), layout.pack_scales(scales, zeros), 64)
    torch.testing.assert_close(apply_int_weight(layer, x), expect, rtol=2e-2, atol=2e-2)


# -- the kernel's Triton part, in the interpreter ----------------------------------------------------
# (the asm's arithmetic replaced by plain Triton: int4_mma._emulated_step; the asm itself runs on the emulated
# warp below): program shapes, slices of K, splits and their workspace, the direct epilogue, masks.


def _interpreted(n, k, group, dtype, m, configs, seed=0):
    q, scales, zeros = _layer(n, k, group, dtype, seed=seed)
    qw, szp = layout.repack(q), layout.pack_scales(scales, zeros)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + m)).to(dtype)
    ref = layout.reference_matmul(x, qw, szp, group).float()
    for kw in configs:
        out = int4_mma.mma_matmul(x, qw, szp, group, **kw)
        assert out.shape == (m, n) and out.dtype == dtype
        yield kw, ((out.float() - ref).abs().max() / ref.abs().max()).item()


def test_program_shapes_the_kernel_cannot_run_are_refused():
    q, scales, zeros = _layer(48, 256, 128, torch.float16)
    qw, szp = layout.repack(q), layout.pack_scales(scales, zeros)
    x = torch.randn(1, 256).to(torch.float16)
    with pytest.raises(ValueError, match="powers of two"):
        int4_mma.mma_matmul(x, qw, szp, 128, rows=3, kslices=1)
    with pytest.raises(ValueError, match="powers of two"):
        int4_mma.mma_matmul(x, qw, szp, 128, rows=1, kslices=2, unroll=3)
    with pytest.raises(ValueError, match="num_warps"):  # more warps than tile rows: a layout the PTX does not assume
        int4_mma.mma_matmul(x, qw, szp, 128, rows=2, kslices=1, num_warps=4)
    with pytest.raises(ValueError, match="needs ring"):
        int4_mma.mma_matmul(x, qw, szp, 128, rows=2, kslices=1, num_warps=2, early=True)


@pytest.mark.skipif(CUDA, reason="the interpreter runs on CPU-only hosts (the GPU tests below run the kernel)")
def test_interpreted_kernel_every_checked_program():
    """fp16 (the interpreter rounds fp16 as the GPU does: the products match to fp32 summation order): every
    program shape of the correctness checks, on a layer whose K (5 superblocks, one group) leaves slices and
    splits partly empty, and 9 rows of x (two column blocks, the second with one live row)."""
    configs = [kw for kw in CHECKED if not kw.get("pdl")]
    for kw, err in _interpreted(80, 320, 320, torch.float16, 9, configs):
        assert err < 1e-3, (kw, err)


@pytest.mark.skipif(CUDA, reason="the interpreter runs on CPU-only hosts (the GPU tests below run the kernel)")
@pytest.mark.parametrize("m", [1, 9, 20, 33])
def test_interpreted_kernel_tuned_programs(m):
    """The tuned program of each shape for the row band of m (1, 2, 4 and 8 column blocks of B), bf16 (the
    interpreter truncates the output's cast, so within one bf16 step of the reference) and fp16."""
    band = int4_mma._band(m)
    configs = [cfg for key, cfg in int4_mma.TUNED.items() if key[2:] == band] or [int4_mma.DEFAULT]
    configs = [dict(c) for c in {json.dumps(c, sort_keys=True): c for c in configs}.values()]
    if m > 32:
        configs = configs[:1]  # eight column blocks are slow to interpret
    for dtype, bound in ((torch.float16, 1e-3), (torch.bfloat16, 1e-2)):
        for kw, err in _interpreted(48, 256, 64, dtype, m, configs, seed=m):
            assert err < bound, (dtype, kw, err)


def _gate_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """SiluAndMul's torch arithmetic on a projection output rounded to its dtype."""
    d = gate_up.shape[-1] // 2
    return (F.silu(gate_up[:, :d].float()).to(gate_up.dtype).float() * gate_up[:, d:].float()).to(gate_up.dtype)


@pytest.mark.parametrize(
    "kw",
    [
        {"rows": 2, "kslices": 2, "unroll": 2, "num_warps": 4, "split": 1},  # direct epilogue
        {"rows": 2, "unroll": 1, "split": 3, "num_warps": 2},  # through the workspace
        {"rows": 1, "kslices": 4, "unroll": 1, "num_warps": 4, "split": 1},  # one row block: gated takes two
        {"rows": 4, "unroll": 2, "split": 0},  # DEFAULT: a tile past the last pair
    ],
)
def test_paired_layout(kw):
    """W's two halves interleaved by row block (3 pairs): the plain output comes back in the checkpoint's
    order, and the gated one is silu(first half) * second half (fp16: as SiluAndMul rounds). Interpreted on
    CPU-only hosts, compiled on GPUs."""
    n, k, group = 96, 256, 128
    dev = "cuda" if CUDA else "cpu"
    q, scales, zeros = _layer(n, k, group, torch.float16, seed=5, device=dev)
    qw, szp = layout.repack(q), layout.pack_scales(scales, zeros)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(5)).to(torch.float16).to(dev)
    ref = layout.reference_matmul(x, qw, szp, group)
    pq, ps = layout.pair_halves(qw, szp)
    assert not torch.equal(pq, qw)
    plain = int4_mma.mma_matmul(x, pq, ps, group, paired=True, **kw)
    torch.testing.assert_close(plain.float(), ref.float(), rtol=1e-3, atol=1e-3 * ref.abs().max().item())
    gated = int4_mma.mma_matmul(x, pq, ps, group, paired=True, gated=True, **kw)
    expect = _gate_reference(ref)
    assert gated.shape == (3, n // 2)
    torch.testing.assert_close(gated.float(), expect.float(), rtol=2e-3, atol=2e-3 * expect.abs().max().item())
    with pytest.raises(ValueError, match="paired"):
        int4_mma.mma_matmul(x, qw, szp, group, gated=True)


# -- CUDA --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,group", [(48, 256, 64), (160, 512, 128), (80, 320, 320), (4096, 4096, 128)])
def test_kernel_matches_reference(dtype, n, k, group):
    q, scales, zeros = _layer(n, k, group, dtype, device="cuda")
    qw, szp = layout.repack(q), layout.pack_scales(scales, zeros)
    for m in (1, 2, 5, 8, 9, 16, 33, 64):
        x = torch.randn(m, k, device="cuda").to(dtype)
        ref = layout.reference_matmul(x, qw, szp, group).float()
        band = int4_mma._band(m)  # the tuned programs for the rows they serve; the checked ones for all
        for kw in CHECKED + [cfg for key, cfg in int4_mma.TUNED.items() if key[2:] == band]:
            if kw.get("pdl") and torch.cuda.get_device_capability()[0] < 9:
                continue
            out = int4_mma.mma_matmul(x, qw, szp, group, **kw).float()
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-2, (m, kw, err)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_layers_take_the_kernel_for_few_rows():
    layer = nn.Module()
    q, scales, zeros = _layer(64, 256, 128, torch.bfloat16, device="cuda")
    set_int_layout(layer, pack_rows(q, 4), scales, zeros, None, 4, 128)
    assert int4_mma.usable(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16)
    assert layer.mma_qweight is not None
    for m in (1, 8, 9):  # 9 rows: the other kernels
        x = torch.randn(m, 256, device="cuda").to(torch.bfloat16)
        ref = layout.reference_matmul(x, layer.mma_qweight, layer.mma_szp, 128).float()
        out = apply_int_weight(layer, x).float()
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-2


# -- the PTX, emulated on the CPU --------------------------------------------------------------------


def _emulate(x: torch.Tensor, qw: torch.Tensor, szp: torch.Tensor, group: int) -> torch.Tensor:
    """The kernel's per-lane work for one warp a 16-row block over all of K (no split), through ptx_emu:
    the operands are built as ``_mma_kernel`` builds them (lane L = 4 g + t holds words 4L..4L+3; column
    block cb of B is rows 8 cb + g of x)."""
    from tests.quant.ptx_emu import Memory, Warp, bits_to_f32

    m_rows, k = x.shape
    nb, sbs = qw.shape[:2]
    g_count = szp.shape[1]
    mb = -(-m_rows // 8)
    mem = Memory()
    x_base, z_base = mem.place(x), mem.place(szp)
    warp = Warp(mem)
    mb = 1 << (mb - 1).bit_length()  # the launcher's 1, 2, 4 or 8 column blocks
    asm, constraints = int4_mma._asm(x.dtype == torch.bfloat16, mb)
    lanes = range(32)
    zero = [[0] * 32]
    out = torch.zeros(m_rows, nb * 16, dtype=torch.float64)
    for r in range(nb):
        accs = [[0] * 32 for _ in range(4 * mb)]  # fp32 bits of D[i], four a column block
        for sb in range(sbs):
            z_addr = [z_base + (((r * g_count + sb * 64 // group) * 8 + L // 4) * 2) * 4 for L in lanes]
            zv = warp.run(int4_mma._LOAD_Z_ASM, int4_mma._LOAD_Z_CONSTRAINTS, zero * 4 + [z_addr] * 4)[0:4]
            frags = []
            for cb in range(mb):
                x_addr = [x_base + ((L // 4 + 8 * cb) * k + (L % 4) * 16) * 2 + sb * 128 for L in lanes]
                dead = [(L // 4 + 8 * cb) - m_rows for L in lanes]
                frags += warp.run(int4_mma._LOAD_X_ASM, int4_mma._LOAD_X_CONSTRAINTS, zero * 4 + [x_addr] * 4 + [dead] * 4)[0:4]
            words = [[int(qw[r, sb, L, j]) & 0xFFFFFFFF for L in lanes] for j in range(4)]
            accs = warp.run(asm, constraints, zero * (4 * mb) + words + accs + frags + zv)[0 : 4 * mb]
        for L in lanes:
            g, t = L // 4, L % 4
            for cb in range(mb):
                for i in range(4):
                    m = 8 * cb + 2 * t + i % 2
                    if m < m_rows:
                        out[m, 16 * r + g + 8 * (i // 2)] = bits_to_f32(accs[4 * cb + i][L])
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,group", [(1, 64), (3, 128), (8, 128), (13, 64), (33, 128)])
def test_ptx_matches_reference(dtype, m, group):
    """The asm strings themselves (dequantize, scale, fragments, loads) on an emulated warp."""
    k, n = 128, 32
    q, scales, zeros = _layer(n, k, group, dtype, seed=7 + m)
    qw, szp = layout.repack(q), layout.pack_scales(scales, zeros)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    out = _emulate(x, qw, szp, group)
    # the reference: weights dequantized to x's dtype (the kernel's one rounding), products summed exactly
    s, z = layout.unpack_scales(szp, dtype)
    g = torch.arange(k) // group
    w = ((q.double() - z.double()[g]) * s.double()[g]).to(dtype).double()
    ref = x.double() @ w
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("group", [64, 128])
def test_dequantize_from_the_layout(group):
    """The Triton dequantization of the layout (interpreted on a CPU-only host) against the torch one of the codes."""
    k, n = 320, 48
    q, scales, zeros = _layer(n, k, group if k % group == 0 else k, torch.bfloat16, seed=11)
    group = group if k % group == 0 else k
    dev = "cuda" if CUDA else "cpu"  # Triton runs interpreted only on hosts without a GPU
    w = layout.dequantize(layout.repack(q).to(dev), scales.to(dev), zeros.to(dev), group).cpu()
    g = torch.arange(k) // group
    exact = (q.float() - zeros.float()[g]) * scales.float()[g]
    assert w.shape == (k, n) and w.dtype == torch.bfloat16
    # within one bf16 ulp of the exact product (the interpreter may truncate a cast the GPU rounds)
    torch.testing.assert_close(w.float(), exact, rtol=2**-7, atol=0)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_single_copy_layers_serve_every_row_count(monkeypatch):
    from plugins.quant import int4_common

    monkeypatch.setattr(int4_common, "SINGLE_COPY", True)
    layer = nn.Module()
    q, scales, zeros = _layer(64, 256, 128, torch.bfloat16, device="cuda")
    set_int_layout(layer, pack_rows(q, 4), scales, zeros, None, 4, 128)
    assert layer.qweight is None and layer.mma_qweight is not None
    assert apply_int_weight(layer, torch.empty(0, 256, device="cuda", dtype=torch.bfloat16)).shape == (0, 64)
    for m in (1, 9, 64, 65, 300):
        x = torch.randn(m, 256, device="cuda").to(torch.bfloat16)
        ref = layout.reference_matmul(x, layer.mma_qweight, layer.mma_szp, 128).float()
        out = apply_int_weight(layer, x).float()
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-2, m


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("program", [
    {},  # DEFAULT: split-K through the workspace
    {"rows": 1, "kslices": 8, "unroll": 2, "num_warps": 4, "ring": True, "split": 1},  # o's at up to 8 rows
    {"rows": 2, "kslices": 2, "unroll": 2, "num_warps": 4, "xjit": True, "interleave": True, "ring": True, "split": 1},
], ids=["default", "ring", "ring-xjit-interleave"])  # fmt: skip
def test_graph_replay_matches_eager(pdl, program):
    """Captured in a CUDA graph (as decode steps run it, PDL edges included), the kernel gives the eager bits;
    the second linear reads what the first wrote (under PDL: only after its wait)."""
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    layers = []
    for n, k in ((256, 1024), (128, 256)):  # two chained linears: the second reads what the first wrote
        q, scales, zeros = _layer(n, k, 128, torch.bfloat16, seed=n, device="cuda")
        layers.append((layout.repack(q), layout.pack_scales(scales, zeros)))
    (qw1, sz1), (qw2, sz2) = layers
    x = torch.randn(4, 1024, device="cuda").to(torch.bfloat16)
    eager = int4_mma.mma_matmul(x, qw1, sz1, 128, pdl=pdl, **program)
    assert torch.equal(eager, int4_mma.mma_matmul(x, qw1, sz1, 128, pdl=pdl, **program))  # deterministic order
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        first = int4_mma.mma_matmul(x, qw1, sz1, 128, pdl=pdl, **program)
        second = int4_mma.mma_matmul(first, qw2, sz2, 128, pdl=pdl, **program)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    expect = int4_mma.mma_matmul(x, qw1, sz1, 128, **program)
    assert torch.equal(first, expect)
    assert torch.equal(second, int4_mma.mma_matmul(expect, qw2, sz2, 128, **program))


# -- the fused gate/up kernel in a model (interpreter) ----------------------------------------------


def test_model_runs_the_gated_gate_up_kernel(tmp_path, monkeypatch):
    """A 4-bit GPTQ tiny Llama in fp16 with the tensor-core layout (its kernel interpreted on CPU-only hosts,
    compiled and in CUDA graphs on GPUs): the gate/up projections are paired and write silu(gate) * up
    themselves, and the model still matches transformers on the dequantized weights."""
    import quant_harness as harness  # tests/quant/conftest.py puts this directory on sys.path
    import reference_formats as ref

    from framework.testing import make_tiny_model
    from plugins.quant import int4_common

    if not CUDA:
        monkeypatch.setattr(int4_common, "_mma_usable", lambda device, dtype: True)
    monkeypatch.setattr(int4_common, "FUSED_SILU", True)  # FRAMEWORK_INT4_FUSED_SILU=1
    gated_calls = []
    matmul = int4_mma.matmul
    monkeypatch.setattr(int4_mma, "matmul", lambda *a, **kw: gated_calls.append(kw.get("gated", False)) or matmul(*a, **kw))
    src = make_tiny_model("LlamaForCausalLM", tmp_path / "m", **{**harness.TINY, "num_hidden_layers": 1})
    qdir, rdir = ref.quantize_checkpoint(src, tmp_path / "q", tmp_path / "ref", "gptq", bits=4, group_size=64)
    llm = harness.build_engine(qdir, dtype="float16", device="cuda" if CUDA else "cpu")
    mlp = llm.engine.runner.model.model.layers[0].mlp
    assert mlp.gate_up_proj.mma_paired and not mlp.down_proj.mma_paired
    # fp16 tolerance as the other half-precision engine tests (test_gptq.test_cuda_engine_fp16)
    harness.assert_matches_reference(llm, rdir, max_tokens=2 if not CUDA else 8, tol=3e-2 if not CUDA else 1e-1)
    assert True in gated_calls and False in gated_calls  # the fused gate/up, and the other projections
