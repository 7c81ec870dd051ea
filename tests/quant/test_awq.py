"""AWQ GEMM checkpoints (written by an independent packer) load and match the dequantized fp32 reference."""

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
from plugins.quant.awq import AWQConfig, unpack_awq


def _load(layer, tensors, shard_id=None):
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, tensor, *(() if shard_id is None else (shard_id,)))


def test_unpack_follows_the_interleaved_order():
    # one word holding 0..7 in slots 0..7: slot i holds feature AWQ_ORDER[i], so feature j = slot index of j
    word = sum(v << (4 * v) for v in range(8))  # 0x76543210
    got = unpack_awq(torch.tensor([[word]], dtype=torch.int32))
    assert got.tolist() == [[0, 4, 1, 5, 2, 6, 3, 7]]


@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
def test_qkv_layer_matches_dequantized_weight(group_size):
    gen = torch.Generator().manual_seed(group_size)
    hidden, head_dim, heads, kv_heads = 128, 16, 8, 2
    ws = [torch.randn(n * head_dim, hidden, generator=gen) for n in (heads, kv_heads, kv_heads)]
    layer = QKVParallelLinear(
        hidden, head_dim, heads, kv_heads, False, LayerContext(quant_config=AWQConfig(4, group_size))
    )
    parts = [ref.awq_tensors(w, group_size) for w in ws]
    for sid, (tensors, _) in zip("qkv", parts):
        _load(layer, tensors, sid)
    layer.linear_method.process_weights_after_loading(layer)
    assert layer.qweight.shape == (hidden // 8, layer.output_size) and layer.perm is None
    x = torch.randn(2, 3, hidden, generator=gen)
    expected = F.linear(x, torch.cat([deq for _, deq in parts]))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)
    assert (expected - F.linear(x, torch.cat(ws))).abs().max() > 1e-3


@pytest.mark.parametrize("rank", [0, 1])
def test_tp2_rank_slices(rank):
    gen = torch.Generator().manual_seed(rank)
    hidden, inter, gs = 128, 256, 32
    ctx = LayerContext(quant_config=AWQConfig(4, gs), tp_rank=rank, tp_size=2)
    wg, wu = torch.randn(inter, hidden, generator=gen), torch.randn(inter, hidden, generator=gen)
    parts = [ref.awq_tensors(w, gs) for w in (wg, wu)]
    layer = MergedColumnParallelLinear(hidden, [inter, inter], False, ctx, "mlp.gate_up_proj")
    for sid, (tensors, _) in enumerate(parts):
        _load(layer, tensors, sid)
    layer.linear_method.process_weights_after_loading(layer)
    half = slice(rank * inter // 2, (rank + 1) * inter // 2)
    x = torch.randn(4, hidden, generator=gen)
    torch.testing.assert_close(
        layer(x), F.linear(x, torch.cat([parts[0][1][half], parts[1][1][half]])), rtol=1e-5, atol=1e-4
    )

    tensors, deq = ref.awq_tensors(torch.randn(hidden, inter, generator=gen), gs)
    layer = RowParallelLinear(inter, hidden, False, ctx, "mlp.down_proj")
    _load(layer, tensors)
    layer.linear_method.process_weights_after_loading(layer)
    x = torch.randn(4, inter // 2, generator=gen)
    torch.testing.assert_close(layer(x), F.linear(x, deq[:, half]), rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("llama"), seed=1, **harness.TINY)


@pytest.mark.parametrize("group_size", [64, 128])
def test_engine_matches_dequantized_reference(llama_dir, tmp_path, group_size):
    qdir, rdir = ref.quantize_checkpoint(llama_dir, tmp_path / "q", tmp_path / "ref", "awq", group_size=group_size)
    harness.assert_matches_reference(harness.build_engine(qdir), rdir)


def test_autoawq_quant_config_json_and_dense_modules(llama_dir, tmp_path):
    """AutoAWQ's quant_config.json names (w_bit, q_group_size); down_proj left dense via modules_to_not_convert."""
    qdir, rdir = ref.quantize_checkpoint(
        llama_dir, tmp_path / "q", tmp_path / "ref", "awq", group_size=32, side_file=True, autoawq_file=True
    )
    harness.assert_matches_reference(harness.build_engine(qdir), rdir, max_tokens=2)
    qdir, rdir = ref.quantize_checkpoint(
        llama_dir, tmp_path / "q2", tmp_path / "ref2", "awq", group_size=32, modules_to_not_convert=["down_proj"]
    )
    llm = harness.build_engine(qdir)
    mlp = llm.engine.runner.model.model.layers[0].mlp
    assert hasattr(mlp.down_proj, "weight") and hasattr(mlp.gate_up_proj, "qweight")
    harness.assert_matches_reference(llm, rdir, max_tokens=2)


def test_qwen2_with_biases(tmp_path):
    src = make_tiny_model("Qwen2ForCausalLM", tmp_path / "src", seed=4, **harness.TINY)
    qdir, rdir = ref.quantize_checkpoint(src, tmp_path / "q", tmp_path / "ref", "awq", group_size=32)
    harness.assert_matches_reference(harness.build_engine(qdir), rdir, max_tokens=2)


def test_errors(llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"awq bits=8 .*must be one of \[4\]"):
        AWQConfig.from_config({"quant_method": "awq", "bits": 8})
    with pytest.raises(ValueError, match=r"awq version='gemv' .*must be one of"):
        AWQConfig.from_config({"quant_method": "awq", "version": "GEMV"})
    qdir, _ = ref.quantize_checkpoint(llama_dir, tmp_path / "q", tmp_path / "ref", "awq", group_size=64)
    with pytest.raises(ValueError, match=r"quantization='gptq' contradicts the checkpoint"):
        harness.build_engine(qdir, quantization="gptq")
    from safetensors.torch import load_file, save_file

    tensors = load_file(qdir / "model.safetensors")
    name = "model.layers.0.self_attn.k_proj.scales"
    tensors[name] = tensors[name][:, :-8].contiguous()
    save_file(tensors, str(qdir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.scales.*shape"):
        harness.build_engine(qdir)


def test_dummy_weights(llama_dir):
    llm = harness.build_engine(llama_dir, quantization="awq", load_format="dummy")
    layer = llm.engine.runner.model.model.layers[1].self_attn.qkv_proj
    assert (layer.bits, layer.group_size) == (4, 128) and bool((layer.zeros == 8).all())
    out = llm.generate("Hello", harness.framework.SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
