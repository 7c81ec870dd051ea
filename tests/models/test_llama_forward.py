"""Llama / Mistral / Qwen2 plugin against Hugging Face transformers on the same weights.

Tiny random models are written by transformers itself (save_pretrained) and
read back with safetensors; our model runs the three prompts as one
flattened batch, transformers runs them one at a time.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from framework.attention import AttentionBackend
from framework.forward_context import set_forward_context
from framework.layers import LayerContext
from framework.model_config import HFConfig
from plugins.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=256,
    max_position_embeddings=256,
)
PROMPT_LENS = (5, 11, 1)


class CausalPerSequence(AttentionBackend):
    """Test-only backend: ignores the KV cache, attends causally within each sequence."""

    def forward(self, q, k, v, kv_cache, metadata):
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = torch.empty_like(q)
        loc = metadata.query_start_loc_np
        for start, end in zip(loc[:-1], loc[1:]):
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, S, D]
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale)
            out[start:end] = o.transpose(0, 1)
        return out


def randomize(model):
    """Weights far from transformers' init, so a missed bias, norm or rotary shows in the logits."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def build(tmp_path, config_cls, **overrides):
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**TINY, **overrides})
    hf_model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomize(hf_model)
    hf_model.save_pretrained(tmp_path)
    hf_config = HFConfig.from_file(tmp_path / "config.json")
    ctx = LayerContext(dtype=torch.float32, attention_backend=CausalPerSequence)
    ours = LlamaForCausalLM(hf_config, ctx)
    loaded = ours.load_weights(load_file(tmp_path / "model.safetensors").items())
    assert loaded == {name for name, _ in ours.named_parameters()}
    return hf_model, ours


def our_logits(model, prompts):
    input_ids = torch.cat(prompts)
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    lens = np.array([len(p) for p in prompts], dtype=np.int32)
    meta = SimpleNamespace(query_start_loc_np=np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    with torch.no_grad(), set_forward_context(meta):
        hidden = model(input_ids, positions)
        assert hidden.shape == (len(input_ids), model.hf_config.hidden_size)
        return model.compute_logits(hidden).split(lens.tolist())


CASES = {
    "llama": ("LlamaConfig", {}),
    "llama-biases": ("LlamaConfig", {"attention_bias": True, "mlp_bias": True}),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama3-rope": (
        "LlamaConfig",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    ),
    "mistral": ("MistralConfig", {"sliding_window": 4096}),  # window >= max_model_len: ignored
    "qwen2": ("Qwen2Config", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    config_cls, overrides = CASES[case]
    hf_model, ours = build(tmp_path, config_cls, **overrides)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, TINY["vocab_size"], (n,), generator=gen) for n in PROMPT_LENS]
    for prompt, logits in zip(prompts, our_logits(ours, prompts)):
        with torch.no_grad():
            expected = hf_model(prompt[None]).logits[0].float()
        assert logits.dtype == torch.float32
        assert expected.std() > 1.0  # the comparison is not between near-zero numbers
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_architecture_decides_biases(tmp_path):
    _, qwen = build(tmp_path / "q", "Qwen2Config")
    attn = qwen.model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None
    _, llama = build(tmp_path / "l", "LlamaConfig")
    assert llama.model.layers[0].self_attn.qkv_proj.bias is None
    assert MistralForCausalLM is not None and issubclass(Qwen2ForCausalLM, LlamaForCausalLM)


def test_tied_head_shares_embedding(tmp_path):
    _, ours = build(tmp_path, "LlamaConfig", tie_word_embeddings=True)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_rotary_table_is_shared_and_sized_by_max_model_len(tmp_path):
    config = transformers.LlamaConfig(**TINY)
    hf_config = HFConfig(config.to_dict(), architectures=["LlamaForCausalLM"], max_model_len=40)
    model = LlamaForCausalLM(hf_config, LayerContext(attention_backend=CausalPerSequence))
    ropes = {id(layer.self_attn.rotary_emb) for layer in model.model.layers}
    assert len(ropes) == 1 and model.model.layers[0].self_attn.rotary_emb.cos_sin_cache.shape[0] == 40


def test_sliding_window_shorter_than_max_model_len_is_refused():
    config = HFConfig(transformers.MistralConfig(**TINY, sliding_window=64).to_dict())
    config["architectures"] = ["MistralForCausalLM"]
    ctx = LayerContext(attention_backend=CausalPerSequence)
    with pytest.raises(ValueError, match=r"sliding_window=64.*max_model_len=256"):
        LlamaForCausalLM(config, ctx)
    config["max_model_len"] = 64
    LlamaForCausalLM(config, ctx)  # every sequence fits in the window: plain causal attention


def test_load_weights_rejects_unknown_and_misshapen_tensors(tmp_path):
    _, ours = build(tmp_path, "LlamaConfig")
    with pytest.raises(ValueError, match="model.layers.0.self_attn.rope_scale"):
        ours.load_weights([("model.layers.0.self_attn.rope_scale", torch.zeros(1))])
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*qkv_proj.*\(8, 64\)"):
        ours.load_weights([("model.layers.1.self_attn.k_proj.weight", torch.zeros(8, 64))])
    assert ours.load_weights([("model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(8))]) == set()
