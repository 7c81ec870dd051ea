"""Checkpoint loading: sharded files, and clear errors for missing or mismatched tensors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import framework
from framework.testing import make_tiny_model

PARAMS = framework.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return make_tiny_model("Qwen2ForCausalLM", tmp_path_factory.mktemp("single"))


def generate(path):
    llm = framework.build({"model": str(path), "max_model_len": 128})
    return llm.generate(["sharded or not"], PARAMS, use_tqdm=False)[0].outputs[0].token_ids


def test_sharded_checkpoint_loads_the_same_model(single, tmp_path):
    sharded = make_tiny_model("Qwen2ForCausalLM", tmp_path / "sharded", shard_size="50KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert generate(sharded) == generate(single)


def rewrite(src, dst, edit):
    dst.mkdir()
    for item in src.iterdir():
        (dst / item.name).write_bytes(item.read_bytes())
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_is_named(single, tmp_path):
    path = rewrite(single, tmp_path / "m", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks tensors for 1 parameters: model\.layers\.1\.self_attn\.qkv_proj\.weight"):
        framework.build({"model": str(path)})


def test_mismatched_shape_names_tensor_and_shapes(single, tmp_path):
    def shrink(t):
        t["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 100)

    path = rewrite(single, tmp_path / "m", shrink)
    with pytest.raises(ValueError, match=r"down_proj\.weight.*has shape \(64, 100\), expected \(64, 128\)"):
        framework.build({"model": str(path)})


def test_unexpected_tensor_is_named(single, tmp_path):
    def add(t):
        t["model.layers.0.mystery.weight"] = torch.zeros(2)

    path = rewrite(single, tmp_path / "m", add)
    with pytest.raises(ValueError, match="model.layers.0.mystery.weight"):
        framework.build({"model": str(path)})


def test_index_naming_a_missing_shard_is_an_error(tmp_path):
    path = make_tiny_model("LlamaForCausalLM", tmp_path / "m", shard_size="50KB")
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ValueError, match=f"missing: {shard.name}"):
        framework.build({"model": str(path)})
