"""Tiny models and helpers for the multi-process tests (CPU, gloo)."""

import pytest

from framework.testing import make_tiny_model


@pytest.fixture(scope="session")
def parallel_models(tmp_path_factory):
    """Checkpoints by name: Llama (2 KV heads), Qwen2 with 1 KV head (fewer than the 2 ranks),
    and a 3-layer Qwen2 with tied embeddings (uneven stages; the last stage loads the embedding as head)."""
    root = tmp_path_factory.mktemp("parallel")
    return {
        "llama": make_tiny_model("LlamaForCausalLM", root / "llama", seed=1),
        "qwen2_kv1": make_tiny_model("Qwen2ForCausalLM", root / "qwen2_kv1", seed=2, num_key_value_heads=1),
        "qwen2_tied": make_tiny_model(
            "Qwen2ForCausalLM",
            root / "qwen2_tied",
            seed=3,
            num_hidden_layers=3,
            tie_word_embeddings=True,
        ),
    }


def engine_settings(path, **parallel):
    """Same settings for the reference and the parallel engine: float32, small steps (chunked prefill)."""
    return {
        "model": str(path),
        "dtype": "float32",
        "max_model_len": 256,
        "max_num_batched_tokens": 32,
        "kv_cache_memory": 1 << 22,
        **parallel,
    }
