"""Write a model directory of a known shape with no weights, for ``load_format="dummy"``.

    python benchmarks/dummy_model.py llama3-8b /tmp/llama3-8b
    framework generate /tmp/llama3-8b --load-format dummy --dtype bfloat16 --prompt Hi

The directory holds config.json, generation_config.json and the locally
trained test tokenizer (its ids cover only the first 512 of the vocabulary;
benchmarks feed token ids directly).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SHAPES = {
    "llama3-8b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
    ),
    "llama3-70b": dict(
        hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        intermediate_size=28672, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
    ),
}  # fmt: skip


def write_dummy_model(shape: str, path: str | Path) -> Path:
    from framework.testing import make_tokenizer

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(path)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **SHAPES[shape],
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    (path / "generation_config.json").write_text(json.dumps(generation))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("path")
    args = parser.parse_args()
    print(write_dummy_model(args.shape, args.path))
