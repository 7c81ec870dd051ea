"""Rotary embedding against transformers' rope init functions and LlamaRotaryEmbedding."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from framework.layers import get_rope
from framework.model_config import HFConfig

HEADS, HEAD_DIM, MAX_POS = 4, 16, 64

CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}


def hf_config(rope_parameters):
    return LlamaConfig(
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        max_position_embeddings=MAX_POS,
        rope_parameters=dict(rope_parameters),
    )


def ours(config, max_model_len=None):
    params = HFConfig(config.to_dict()).rope_settings()  # the path the model plugin takes
    return get_rope(HEAD_DIM, MAX_POS, params, max_model_len=max_model_len)


def hf_inv_freq(config, rope_type, **kwargs):
    if rope_type == "default":
        return LlamaRotaryEmbedding(config).inv_freq
    return ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)[0]


@pytest.mark.parametrize("rope_type", list(CASES))
def test_inv_freq_cos_sin_and_rotation_match_transformers(rope_type):
    config = hf_config(CASES[rope_type])
    rope = ours(config)
    torch.testing.assert_close(rope.inv_freq, hf_inv_freq(config, rope_type), rtol=1e-6, atol=0)

    positions = torch.tensor([0, 1, 5, 17, 63, 2])
    hf_rope = LlamaRotaryEmbedding(config)
    x = torch.randn(1, len(positions), HEADS * HEAD_DIM)
    cos, sin = hf_rope(x, positions[None])  # [1, T, D]: each half repeated
    table = rope.cos_sin_cache[positions]
    torch.testing.assert_close(table[:, : HEAD_DIM // 2], cos[0, :, : HEAD_DIM // 2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(table[:, HEAD_DIM // 2 :], sin[0, :, : HEAD_DIM // 2], rtol=1e-6, atol=1e-6)

    q, k = torch.randn(len(positions), HEADS * HEAD_DIM), torch.randn(len(positions), 2 * HEAD_DIM)
    q_out, k_out = rope(positions, q, k)
    as_hf = lambda t: t.view(1, len(positions), -1, HEAD_DIM).transpose(1, 2)  # noqa: E731
    q_ref, k_ref = apply_rotary_pos_emb(as_hf(q), as_hf(k), cos, sin)
    torch.testing.assert_close(q_out, q_ref.transpose(1, 2).reshape(q.shape), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_out, k_ref.transpose(1, 2).reshape(k.shape), rtol=1e-5, atol=1e-5)


def test_rope_types_differ():
    tables = {t: ours(hf_config(p)).cos_sin_cache for t, p in CASES.items() if t != "dynamic"}
    assert not torch.allclose(tables["default"], tables["linear"])
    assert not torch.allclose(tables["default"][:, :8], ours(hf_config(CASES["llama3"])).cos_sin_cache[:, :8])


def test_dynamic_ntk_beyond_trained_length_uses_scaled_base():
    config = hf_config(CASES["dynamic"])
    rope = ours(config, max_model_len=4 * MAX_POS)
    assert rope.cos_sin_cache.shape == (4 * MAX_POS, HEAD_DIM)
    expected = hf_inv_freq(config, "dynamic", seq_len=4 * MAX_POS)
    torch.testing.assert_close(rope.inv_freq, expected, rtol=1e-6, atol=0)
    assert not torch.allclose(rope.inv_freq, ours(config).inv_freq)


def test_partial_rotary_factor_rotates_leading_features_only():
    params = dict(CASES["linear"], partial_rotary_factor=0.5)
    config = hf_config(params)
    rope = get_rope(HEAD_DIM, MAX_POS, params)
    assert rope.rotary_dim == HEAD_DIM // 2
    torch.testing.assert_close(rope.inv_freq, hf_inv_freq(config, "linear"), rtol=1e-6, atol=0)

    positions = torch.tensor([3, 9])
    q = torch.randn(2, HEAD_DIM)
    q_out, _ = rope(positions, q, q.clone())
    full = get_rope(HEAD_DIM // 2, MAX_POS, CASES["linear"])  # a rope over the rotated part alone
    q_rot, _ = full(positions, q[:, : HEAD_DIM // 2].contiguous(), q[:, : HEAD_DIM // 2].contiguous())
    torch.testing.assert_close(q_out[:, : HEAD_DIM // 2], q_rot)
    assert torch.equal(q_out[:, HEAD_DIM // 2 :], q[:, HEAD_DIM // 2 :])


def test_cache_dtype_and_length_follow_arguments():
    rope = get_rope(HEAD_DIM, MAX_POS, CASES["default"], dtype=torch.bfloat16, max_model_len=100)
    assert rope.cos_sin_cache.dtype == torch.bfloat16 and rope.cos_sin_cache.shape == (100, HEAD_DIM)


def test_unknown_rope_type_names_it_and_the_supported_ones():
    with pytest.raises(ValueError, match=r"'yarn'.*default, linear, dynamic, llama3"):
        get_rope(HEAD_DIM, MAX_POS, {"rope_type": "yarn", "factor": 4.0})
