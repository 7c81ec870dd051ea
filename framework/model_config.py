"""What the engine knows about a model directory: config.json + generation_config.json."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
# KV-cache dtypes beyond the model dtypes, named as in vLLM ("fp8" is e4m3).
FP8_KV_CACHE_DTYPES = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
KV_CACHE_DTYPE_NAMES = ("auto", *FP8_KV_CACHE_DTYPES, *_DTYPES)


class HFConfig(dict):
    """config.json as a dict with attribute access (``cfg.hidden_size``).

    Model plugins read it directly; missing keys read as ``AttributeError``
    so that a plugin fails loudly, and ``cfg.get(key, default)`` for optional
    ones.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config.json has no {name!r}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "HFConfig":
        """Read config.json; a quantization side file beside it fills ``quantization_config``.

        Older GPTQ exports keep their settings in quantize_config.json, AutoAWQ
        and SqueezeLLM in quant_config.json; a ``quantization_config`` in
        config.json wins over both.
        """
        with open(path) as f:
            cfg = cls(json.load(f))
        if not cfg.get("quantization_config"):
            side = _side_quant_config(Path(path).parent)
            if side:
                cfg["quantization_config"] = side
        return cfg

    def rope_settings(self) -> dict[str, Any]:
        """Rotary settings in one shape for old and new checkpoints.

        transformers < 5 wrote ``rope_theta`` and ``rope_scaling``; 5.x writes
        ``rope_parameters`` holding both. Returns a dict with ``rope_type``
        ("default", "linear", "dynamic", "llama3", ...), ``rope_theta`` and the
        type's own keys.
        """
        params = dict(self.get("rope_parameters") or {})
        scaling = self.get("rope_scaling") or {}
        params.update(scaling)
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
        params.setdefault("rope_type", "default")
        params.setdefault("rope_theta", self.get("rope_theta", 10000.0))
        return params

    def attention_window(self) -> int | None:
        """The attention window, or None when attention is plain causal.

        Qwen2 configs carry ``sliding_window`` but slide only with
        ``use_sliding_window`` (then ``layer_types`` names "sliding_attention").
        """
        window = self.get("sliding_window")
        layer_types = self.get("layer_types")
        if self.get("use_sliding_window") is False or (layer_types and "sliding_attention" not in layer_types):
            return None
        return int(window) if window else None


def _side_quant_config(model_dir: Path) -> dict[str, Any] | None:
    """quantize_config.json (GPTQ) or quant_config.json (AWQ: ``w_bit``; SqueezeLLM: ``wbits``), if present."""
    for name, guess in (("quantize_config.json", "gptq"), ("quant_config.json", None)):
        file = model_dir / name
        if not file.is_file():
            continue
        with open(file) as f:
            side = json.load(f)
        if "quant_method" not in side:
            guess = guess or ("squeezellm" if "wbits" in side else "awq" if "w_bit" in side else None)
            if guess:
                side["quant_method"] = guess
        return side
    return None


@dataclass
class ModelConfig:
    """The resolved model settings the engine, runner and backends share."""

    path: Path
    hf_config: HFConfig
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    block_size: int
    kv_cache_dtype: str
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.hf_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.hf_config.get("num_key_value_heads") or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hf_config.get("head_dim") or self.hf_config.hidden_size // self.num_heads

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        """The cache's element dtype: the model's ("auto"), float8_e4m3fn / float8_e5m2 ("fp8*"), or a float."""
        if self.kv_cache_dtype == "auto":
            return self.dtype
        if self.kv_cache_dtype in FP8_KV_CACHE_DTYPES:
            return FP8_KV_CACHE_DTYPES[self.kv_cache_dtype]
        if self.kv_cache_dtype not in _DTYPES:
            raise ValueError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported; choose one of {', '.join(KV_CACHE_DTYPE_NAMES)}"
            )
        return _DTYPES[self.kv_cache_dtype]


def resolve_dtype(name: str, checkpoint_dtype: torch.dtype | None = None) -> torch.dtype:
    if name == "auto":
        return checkpoint_dtype or torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, float32, float16, bfloat16")
    return _DTYPES[name]


def checkpoint_dtype(hf_config: HFConfig) -> torch.dtype:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    return _DTYPES.get(str(name).replace("torch.", ""), torch.float32)


def load_generation_eos(path: Path, hf_config: HFConfig) -> list[int]:
    """EOS ids: generation_config.json first (it may list several), then config.json."""
    eos = None
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        with open(gen_path) as f:
            eos = json.load(f).get("eos_token_id")
    if eos is None:
        eos = hf_config.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def derive_max_model_len(hf_config: HFConfig, requested: int | None) -> int:
    """The model's context length, or ``requested`` if it does not exceed it."""
    limit = None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if hf_config.get(key):
            limit = int(hf_config[key])
            break
    rope = hf_config.rope_settings()
    if limit is not None and rope["rope_type"] not in ("default", "llama3") and rope.get("factor"):
        limit = int(limit * rope["factor"])  # linear, dynamic and yarn stretch the trained window
    window = hf_config.attention_window()
    if requested is None:
        if limit is None:
            raise ValueError("config.json gives no max_position_embeddings; set max_model_len")
        if window is not None and window < limit:
            # No backend implements sliding-window attention yet; within the
            # window it is plain causal attention, so cap the length there.
            logger.warning("max_model_len capped to the sliding window (%d tokens)", window)
            return window
        return limit
    if limit is not None and requested > limit:
        raise ValueError(
            f"max_model_len={requested} exceeds the model's maximum length {limit} "
            f"(max_position_embeddings in config.json); lower max_model_len"
        )
    return requested
