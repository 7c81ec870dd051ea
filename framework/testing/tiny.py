"""Tiny random-weight checkpoints in the exact Hugging Face format.

`make_tiny_model("LlamaForCausalLM", path)` writes what a hub checkpoint
holds (config.json, safetensors weights, optionally sharded with
model.safetensors.index.json, generation_config.json, and the tokenizer),
all produced by transformers itself, so a loader tested on these files
loads real checkpoints. Nothing is downloaded.

Weights are not transformers' default init (std 0.02, norms at 1, biases
at 0), which makes a poor test model: attention is nearly uniform, so
position bugs go unseen; all logits sit within a few hundredths of each
other, so greedy tokens flip on float noise; and a loader that forgot the
norm weights or the biases would still pass. Instead (see `_init_weights`):

- every matrix is N(0, initializer_range**2) with initializer_range 0.2,
  so q.k scores have a spread of a few units and attention is peaked;
- every bias is N(0, initializer_range**2) and every norm weight is
  U(0.5, 1.5), so dropping either changes the output;
- lm_head is N(0, (logit_scale / sqrt(hidden_size))**2). The final
  RMSNorm leaves each hidden element with an RMS of about 1, so the
  logits have a standard deviation of about `logit_scale` (default 8).
  Measured over 2,880 greedy steps (Llama and Qwen2, seeds 0-5, 5 prompts,
  32 tokens each): |logit| <= 40, median top1-top2 gap 1.7, 0.5% of gaps
  below 1e-2, 0.1% below 1e-3, smallest 5e-4. fp32 noise between two
  correct implementations is about 1e-5, so their greedy tokens match.
  bf16/fp16 noise is near 0.1 (3.5% of gaps are smaller): there, compare
  logprobs within a tolerance, or raise `logit_scale`, rather than long
  greedy runs.
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

import torch

from framework.testing.tokenizer import make_tokenizer

# architecture (config.json "architectures" entry) -> transformers config
# class. The model class is the transformers class of the same name. To add
# an architecture, add a line here (and extra tiny defaults in _EXTRA_DEFAULTS).
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "LlamaConfig",
    "MistralForCausalLM": "MistralConfig",
    "Qwen2ForCausalLM": "Qwen2Config",
}

TINY_DEFAULTS: dict = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "initializer_range": 0.2,
}

# Per-architecture additions to TINY_DEFAULTS.
_EXTRA_DEFAULTS: dict[str, dict] = {}

DEFAULT_LOGIT_SCALE = 8.0
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_tiny_model(
    architecture: str,
    path: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: str = "float32",
    shard_size: str | int | None = None,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    **config_overrides,
) -> Path:
    """Write a tiny random-weight checkpoint of `architecture` to `path`.

    Args:
        architecture: a key of `ARCHITECTURES`, e.g. "LlamaForCausalLM".
        path: output directory (created if missing).
        seed: the weights are a function of the seed alone, so the same
            seed gives the same weights at any dtype or shard size.
        dtype: "float32", "float16" or "bfloat16"; weights are drawn in
            fp32 and cast, and config.json records the dtype.
        shard_size: `max_shard_size` for `save_pretrained`, e.g. "50KB";
            small values give several model-*.safetensors files and a
            model.safetensors.index.json. None writes one file.
        logit_scale: approximate standard deviation of the logits (see the
            module docstring for why 8 is the default).
        **config_overrides: config fields that win over `TINY_DEFAULTS`,
            e.g. num_key_value_heads=1, tie_word_embeddings=True,
            rope_scaling={"rope_type": "linear", "factor": 2.0}.

    Returns:
        `path`, as a `Path`, holding config.json, the safetensors weights,
        generation_config.json and the tokenizer files.
    """
    import transformers

    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"Unsupported architecture {architecture!r}; supported: {sorted(ARCHITECTURES)}"
        )
    if dtype not in _DTYPES:
        raise ValueError(f"Unsupported dtype {dtype!r}; supported: {sorted(_DTYPES)}")
    path = Path(path)
    tokenizer = make_tokenizer()
    config_cls = getattr(transformers, ARCHITECTURES[architecture])
    model_cls = getattr(transformers, architecture)
    fields = {
        **TINY_DEFAULTS,
        **_EXTRA_DEFAULTS.get(architecture, {}),
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **config_overrides,
    }
    config = config_cls(**fields)
    config.architectures = [architecture]

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        torch.manual_seed(seed)  # transformers' own init, overwritten below
        model = model_cls(config)
    _init_weights(model, seed, config.initializer_range, logit_scale)
    model.to(_DTYPES[dtype]).eval()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path, **_save_kwargs(model, shard_size))
    # Some versions skip generation_config.json when it holds no sampling
    # fields; engines read eos from it, so write it unconditionally.
    model.generation_config.save_pretrained(path)
    make_tokenizer(path)
    return path


@torch.no_grad()
def _init_weights(model, seed: int, std: float, logit_scale: float) -> None:
    """Draw every parameter from a generator seeded with `seed` (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    output = model.get_output_embeddings().weight
    for name, param in sorted(model.named_parameters()):
        if param is output:
            continue  # drawn last, below (also covers tied embeddings)
        if "norm" in name and param.dim() == 1:
            param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
        else:
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    hidden_size = output.shape[1]
    output.copy_(torch.randn(output.shape, generator=gen) * (logit_scale / math.sqrt(hidden_size)))


def _save_kwargs(model, shard_size) -> dict:
    """save_pretrained keywords; transformers 5 dropped `safe_serialization`."""
    kwargs: dict = {}
    if shard_size is not None:
        kwargs["max_shard_size"] = shard_size
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    return kwargs
