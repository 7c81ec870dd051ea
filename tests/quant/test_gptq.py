"""GPTQ checkpoints (written by an independent packer) load and match the dequantized fp32 reference."""

import numpy as np
import pytest
import quant_harness as harness  # tests/quant/conftest.py puts this directory on sys.path
import reference_formats as ref
import torch
import torch.nn.functional as F

from framework.layers import (
    LayerContext,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from framework.testing import make_tiny_model
from plugins.quant.gptq import GPTQConfig

# -- one layer: every bits / group size / sym / act-order combination -------------------------------


def _load(layer, tensors, shard_id=None):
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, tensor, *(() if shard_id is None else (shard_id,)))


def _finish(layer):
    layer.linear_method.process_weights_after_loading(layer)


def _gptq_parts(ws, bits, group_size, sym, desc_act, fmt="gptq", seed=0):
    """Quantize each weight of a fused layer; fused parts share one act-order g_idx (one input)."""
    k = ws[0].shape[1]
    gs = k if group_size == -1 else group_size
    g_idx = ref.act_order_g_idx(k, gs, seed) if desc_act else None
    return [ref.gptq_tensors(w, bits, group_size, sym, g_idx, fmt) for w in ws]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
def test_qkv_layer_matches_dequantized_weight(bits, group_size, sym, desc_act):
    gen = torch.Generator().manual_seed(bits * 1000 + group_size)
    hidden, head_dim, heads, kv_heads = 128, 16, 8, 2
    wq, wk, wv = (torch.randn(n * head_dim, hidden, generator=gen) for n in (heads, kv_heads, kv_heads))
    config = GPTQConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym)
    layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads, True, LayerContext(quant_config=config), "qkv_proj")
    parts = _gptq_parts([wq, wk, wv], bits, group_size, sym, desc_act)
    for sid, (tensors, _) in zip("qkv", parts):
        _load(layer, tensors, sid)
    bias = torch.randn(layer.output_size, generator=gen)
    layer.bias.weight_loader(layer.bias, bias)
    _finish(layer)
    assert layer.qweight.dtype == torch.int32 and layer.qweight.shape == (hidden * bits // 32, layer.output_size)
    assert (layer.perm is not None) == (desc_act and group_size not in (-1, hidden))  # one group: no reorder
    x = torch.randn(3, 5, hidden, generator=gen)
    expected = F.linear(x, torch.cat([deq for _, deq in parts]), bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)
    assert (expected - F.linear(x, torch.cat([wq, wk, wv]), bias)).abs().max() > 1e-3  # quantization is visible


def test_gptq_v2_format_has_no_zero_offset():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen)
    tensors, deq = ref.gptq_tensors(w, 4, 32, False, None, "gptq_v2")
    layer = RowParallelLinear(
        128, 64, False, LayerContext(quant_config=GPTQConfig(4, 32, sym=False, checkpoint_format="gptq_v2"))
    )
    _load(layer, tensors)
    _finish(layer)
    x = torch.randn(4, 128, generator=gen)
    torch.testing.assert_close(layer(x), F.linear(x, deq), rtol=1e-5, atol=1e-4)


# -- tensor parallelism: a rank loads exactly its slice ---------------------------------------------


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("desc_act", [False, True])
def test_tp2_rank_slices(rank, desc_act):
    gen = torch.Generator().manual_seed(rank)
    hidden, inter, bits, gs = 128, 256, 4, 32
    config = GPTQConfig(bits=bits, group_size=gs, desc_act=desc_act, sym=False)
    ctx = LayerContext(quant_config=config, tp_rank=rank, tp_size=2)
    x = torch.randn(5, hidden, generator=gen)

    # gate/up (column parallel, fused): rank r holds [gate_r | up_r]
    wg, wu = torch.randn(inter, hidden, generator=gen), torch.randn(inter, hidden, generator=gen)
    parts = _gptq_parts([wg, wu], bits, gs, False, desc_act, seed=1)
    layer = MergedColumnParallelLinear(hidden, [inter, inter], False, ctx, "mlp.gate_up_proj")
    for sid, (tensors, _) in enumerate(parts):
        _load(layer, tensors, sid)
    _finish(layer)
    half = slice(rank * inter // 2, (rank + 1) * inter // 2)
    w_rank = torch.cat([parts[0][1][half], parts[1][1][half]])
    torch.testing.assert_close(layer(x), F.linear(x, w_rank), rtol=1e-5, atol=1e-4)

    # down (row parallel): rank r holds input columns [r*K/2, (r+1)*K/2); act-order within each rank's half
    wd = torch.randn(hidden, inter, generator=gen)
    g_idx = None
    if desc_act:
        g_idx = np.concatenate([ref.act_order_g_idx(inter // 2, gs, 7) + h * (inter // 2 // gs) for h in (0, 1)])
    tensors, deq = ref.gptq_tensors(wd, bits, gs, False, g_idx)
    layer = RowParallelLinear(inter, hidden, False, ctx, "mlp.down_proj")
    _load(layer, tensors)
    _finish(layer)
    cols = slice(rank * inter // 2, (rank + 1) * inter // 2)
    x_rank = torch.randn(5, inter // 2, generator=gen)
    torch.testing.assert_close(layer(x_rank), F.linear(x_rank, deq[:, cols]), rtol=1e-5, atol=1e-4)


def test_tp2_act_order_groups_straddling_ranks_is_an_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    tensors, _ = ref.gptq_tensors(w, 4, 32, True, ref.act_order_g_idx(256, 32, 3))
    ctx = LayerContext(quant_config=GPTQConfig(4, 32, desc_act=True), tp_rank=0, tp_size=2)
    layer = RowParallelLinear(256, 64, False, ctx, "mlp.down_proj")
    _load(layer, tensors)
    with pytest.raises(ValueError, match=r"mlp.down_proj.g_idx.*group_size=32"):
        _finish(layer)


# -- whole models through the engine -------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("llama"), **harness.TINY)


ENGINE_CASES = {
    "4bit-g128-sym": dict(bits=4, group_size=128, sym=True),
    "4bit-g32-asym-act-order": dict(bits=4, group_size=32, sym=False, desc_act=True),
    "8bit-g64-asym": dict(bits=8, group_size=64, sym=False),
    "8bit-channelwise-act-order": dict(bits=8, group_size=-1, sym=True, desc_act=True),
    "4bit-v2-format": dict(bits=4, group_size=64, sym=False, checkpoint_format="gptq_v2"),
}


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_engine_matches_dequantized_reference(llama_dir, tmp_path, case):
    opts = ENGINE_CASES[case]
    qdir, rdir = ref.quantize_checkpoint(llama_dir, tmp_path / "q", tmp_path / "ref", "gptq", **opts)
    harness.assert_matches_reference(harness.build_engine(qdir), rdir)


def test_quantize_config_json_is_read(llama_dir, tmp_path):
    opts = dict(bits=4, group_size=64, sym=False, desc_act=True)
    qdir, rdir = ref.quantize_checkpoint(llama_dir, tmp_path / "q", tmp_path / "ref", "gptq", side_file=True, **opts)
    llm = harness.build_engine(qdir)  # no quantization_config in config.json: quantize_config.json decides
    harness.assert_matches_reference(llm, rdir, max_tokens=2)


def test_qwen2_with_biases(tmp_path):
    src = make_tiny_model("Qwen2ForCausalLM", tmp_path / "src", seed=3, **harness.TINY)
    opts = dict(bits=4, group_size=32, sym=False, desc_act=True)
    qdir, rdir = ref.quantize_checkpoint(src, tmp_path / "q", tmp_path / "ref", "gptq", **opts)
    harness.assert_matches_reference(harness.build_engine(qdir), rdir, max_tokens=2)


# -- errors and defaults -----------------------------------------------------------------------------


def test_contradicting_quantization_flag(llama_dir, tmp_path):
    qdir, _ = ref.quantize_checkpoint(llama_dir, tmp_path / "q", tmp_path / "ref", "gptq", bits=4, group_size=64)
    with pytest.raises(ValueError, match=r"quantization='awq' contradicts the checkpoint.*'gptq'"):
        harness.build_engine(qdir, quantization="awq")
    harness.build_engine(qdir, quantization="gptq")  # agreeing is fine


def test_malformed_checkpoint_names_the_tensor(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    qdir, _ = ref.quantize_checkpoint(llama_dir, tmp_path / "q", tmp_path / "ref", "gptq", bits=4, group_size=64)
    tensors = load_file(qdir / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.qweight"
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, str(qdir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.qweight.*shape"):
        harness.build_engine(qdir)


@pytest.mark.parametrize(
    "settings, field",
    [({"bits": 3}, "bits"), ({"group_size": 0}, "group_size"), ({"checkpoint_format": "marlin"}, "checkpoint_format")],
)
def test_bad_settings_name_the_field(settings, field):
    with pytest.raises(ValueError, match=rf"gptq {field}=.*must be"):
        GPTQConfig.from_config({"quant_method": "gptq", **settings})


def test_quantizers_are_registered_lazily():
    from framework.registry import load_registries

    quantizers = load_registries().quantizers
    assert {"gptq", "awq", "squeezellm"} <= set(quantizers.names())
    assert quantizers.get("gptq") is GPTQConfig
    assert quantizers.entries["awq"].target == "plugins.quant.awq:AWQConfig"


def test_modules_in_block_to_quantize_leaves_the_rest_dense():
    config = GPTQConfig.from_config(
        {
            "bits": 4,
            "modules_in_block_to_quantize": [
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                ["mlp.down_proj"],
            ],
        }
    )
    assert config.get_linear_method(None, "model.layers.0.self_attn.qkv_proj") is not None
    assert config.get_linear_method(None, "model.layers.0.mlp.down_proj") is not None
    assert config.get_linear_method(None, "model.layers.0.self_attn.o_proj") is None
    assert config.get_linear_method(None, "model.layers.0.mlp.gate_up_proj") is None
    mixed = GPTQConfig.from_config({"modules_in_block_to_quantize": [["self_attn.q_proj"]]})
    with pytest.raises(ValueError, match=r"qkv_proj fuses .*quantized alike"):
        mixed.get_linear_method(None, "model.layers.0.self_attn.qkv_proj")


def test_dummy_weights_with_default_settings(llama_dir):
    """quantization="gptq" on a plain checkpoint + load_format="dummy": bits 4, group 128, symmetric."""
    llm = harness.build_engine(llama_dir, quantization="gptq", load_format="dummy")
    layer = llm.engine.runner.model.model.layers[0].mlp.down_proj
    assert (layer.bits, layer.group_size, layer.perm) == (4, 128, None)
    assert layer.qweight.shape == (256 // 8, 128) and layer.scales.shape == (2, 128)
    assert bool((layer.zeros == 8).all()) and bool((layer.scales > 0).all())
    out = llm.generate("Hello", harness.framework.SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


# -- CUDA: the Triton kernel path (skipped on CPU) ----------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("bits, group_size, desc_act", [(4, 128, False), (4, 32, True), (8, 64, True), (4, -1, False)])
@pytest.mark.parametrize("m", [1, 7, 96])
def test_cuda_layer_fp16_uses_the_kernel(bits, group_size, desc_act, m):
    from plugins.quant import int4_common

    assert int4_common._triton_matmul() is not None, "plugins.quant.triton_int4 failed to import on CUDA"
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(512, 256, generator=gen)
    g_idx = ref.act_order_g_idx(256, group_size, 5) if desc_act else None
    tensors, deq = ref.gptq_tensors(w, bits, group_size, False, g_idx)
    config = GPTQConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=False)
    ctx = LayerContext(dtype=torch.float16, device=torch.device("cuda"), quant_config=config)
    layer = RowParallelLinear(256, 512, True, ctx, "mlp.down_proj")
    _load(layer, tensors)
    bias = torch.randn(512, generator=gen)
    layer.bias.weight_loader(layer.bias, bias)
    _finish(layer)
    x = torch.randn(m, 256, generator=gen)
    got = layer(x.half().cuda()).float().cpu()
    expected = F.linear(x.half().float(), deq, bias)
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=5e-2 * expected.abs().max().item() / 10)


@cuda
@pytest.mark.parametrize(
    "method, opts", [("gptq", dict(bits=4, group_size=32, sym=False, desc_act=True)), ("awq", dict(group_size=64))]
)
def test_cuda_engine_fp16(llama_dir, tmp_path, method, opts):
    qdir, rdir = ref.quantize_checkpoint(llama_dir, tmp_path / "q", tmp_path / "ref", method, **opts)
    llm = harness.build_engine(qdir, device="cuda", dtype="float16")
    harness.assert_matches_reference(llm, rdir, max_tokens=8, tol=1e-1)
