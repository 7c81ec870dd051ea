"""Write a model directory of a known shape with no weights, for ``load_format="dummy"``.

    python benchmarks/dummy_model.py llama3-8b /tmp/llama3-8b
    framework generate /tmp/llama3-8b --load-format dummy --dtype bfloat16 --prompt Hi

The directory holds config.json, generation_config.json and a byte-level
BPE tokenizer whose vocabulary has exactly the model's ``vocab_size`` ids
(the 256 byte symbols, then byte pairs and triples, with no merges; the last
two ids are the BOS and EOS tokens). Benchmarks feed token ids directly; the
tokenizer is there so that every id the random weights produce decodes, as
with a real checkpoint: incremental detokenisation then costs what it costs
with a real tokenizer (about 1 us per token) instead of the cost of ids a
small tokenizer cannot place (its decode stream then grows without end).
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


BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def full_vocab_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with exactly ``vocab_size`` ids (see the module docstring)."""
    import itertools

    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for length in (1, 2, 3):
        for parts in itertools.product(symbols, repeat=length):
            if len(vocab) == vocab_size - 2:
                break
            vocab["".join(parts)] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, clean_up_tokenization_spaces=False
    )


def write_dummy_model(shape: str, path: str | Path) -> Path:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = full_vocab_tokenizer(SHAPES[shape]["vocab_size"])
    tokenizer.save_pretrained(path)
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
