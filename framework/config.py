"""``EngineConfig``: the one source of truth for engine settings.

The offline API (``framework.build``), the CLI flags (kebab-case, derived from
these fields) and YAML/JSON config files all go through this model, so a
setting has one name, one default and one validation everywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DType = Literal["auto", "float32", "float16", "bfloat16"]


class PluginSettings(BaseModel):
    """Per-engine plugin switches (entry-point names, see ``framework plugins``)."""

    model_config = ConfigDict(extra="forbid")

    disable: list[str] = Field(default_factory=list, description="plugins to disable for this engine")


class EngineConfig(BaseModel):
    """Settings of one engine. Unknown keys are an error (``extra="forbid"``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)

    model: str | None = Field(None, description="Hugging Face model directory; none: the built-in demo model")
    tokenizer: str | None = Field(None, description="tokenizer directory (default: the model's)")
    dtype: DType = Field("auto", description="weight and activation dtype; auto: the checkpoint's")
    max_model_len: int | None = Field(None, ge=1, description="longest prompt + output in tokens (default: the model's)")
    block_size: int = Field(16, ge=1, le=256, description="tokens per KV-cache block")
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="fraction of GPU memory the engine may use (weights, activations, KV cache)"
    )
    kv_cache_memory: int | None = Field(
        None, ge=1, description="KV-cache size in bytes (CPU; on GPU it overrides gpu_memory_utilization)"
    )
    max_num_seqs: int = Field(256, ge=1, description="most sequences in one step")
    max_num_batched_tokens: int = Field(8192, ge=1, description="most tokens in one step (longer prompts are chunked)")
    attention_backend: str | None = Field(None, description="attention backend name (default: chosen per device)")
    quantization: str | None = Field(None, description="quantization method (default: from the checkpoint)")
    kv_cache_dtype: str = Field(
        "auto",
        description="KV-cache dtype: auto (the model dtype), fp8 (= fp8_e4m3), fp8_e4m3, fp8_e5m2, float16, bfloat16, "
        "float32; fp8 halves the cache per token, with per-layer K/V scales from the checkpoint (else 1.0)",
    )
    calculate_kv_scales: bool = Field(
        False,
        description="fp8 KV cache: set each layer's k/v scales from the first prefill (amax / fp8 max) "
        "instead of the checkpoint's or 1.0",
    )
    enable_prefix_caching: bool = Field(
        True, description="reuse the KV blocks of prompt prefixes already computed (automatic prefix caching)"
    )
    swap_space: float = Field(
        4.0, ge=0, description="GiB of CPU memory for the KV blocks of requests preempted by swapping (0: no swapping)"
    )
    preemption_mode: Literal["recompute", "swap"] | None = Field(
        None,
        description="how a preempted request gives up its KV blocks: swap (to CPU memory, recompute when it is full), "
        "recompute, or none: swap requests with several live sequences (n, beams), recompute the others",
    )
    seed: int = Field(0, description="seed of the random state for requests without their own seed")
    max_logprobs: int = Field(20, ge=0, description="largest logprobs / prompt_logprobs a request may ask for")
    load_format: Literal["safetensors", "dummy"] = Field(
        "safetensors", description="safetensors: the checkpoint; dummy: random weights of the model's shape"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    enforce_eager: bool = Field(
        False, description="never capture CUDA graphs: run every step eagerly (graphs need a backend that supports them)"
    )
    async_scheduling: bool | None = Field(
        None,
        description="schedule and launch the next decode step before the host has processed the current one's "
        "tokens, so the GPU never waits for the host (the tokens of a request that stopped meanwhile are dropped); "
        "none: on for one process on CUDA, off otherwise",
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="tensor-parallel ranks: one process per device (weights and attention heads split)"
    )
    pipeline_parallel_size: int = Field(
        1, ge=1, description="pipeline stages: the decoder layers split into this many consecutive groups"
    )
    distributed_executor_backend: Literal["mp", "torchrun", "ray"] | None = Field(
        None,
        description="how ranks start when tensor/pipeline_parallel_size > 1: mp (the engine spawns them; default), "
        "torchrun (every rank runs the program; rank 0 is the engine), "
        "ray (ranks 1..N-1 are actors of a Ray cluster)",
    )
    distributed_host: str | None = Field(
        None,
        description="address the ranks rendezvous on (mp, ray: the driver's interface to bind; default 127.0.0.1; "
        "ray across hosts needs it)",
    )
    plugins: PluginSettings = Field(default_factory=PluginSettings, description="plugin switches")

    @field_validator("kv_cache_dtype")
    @classmethod
    def _known_kv_cache_dtype(cls, value: str) -> str:
        from framework.model_config import KV_CACHE_DTYPE_NAMES

        if value not in KV_CACHE_DTYPE_NAMES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPE_NAMES)}; got {value!r}")
        return value

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"block_size must be a power of two, got {value}")
        return value


ConfigLike = Union[EngineConfig, dict, str, os.PathLike]


def load_config(source: ConfigLike | None = None, **overrides: Any) -> EngineConfig:
    """Turn an ``EngineConfig``, a dict, or a YAML/JSON file path into an ``EngineConfig``.

    Keyword overrides win over the source. Invalid settings raise ``ValueError``
    naming the field (pydantic's ``ValidationError`` is a ``ValueError``).
    """
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, EngineConfig):
        data = source.model_dump(exclude_unset=True)
    elif isinstance(source, dict):
        data = dict(source)
    elif isinstance(source, (str, os.PathLike)):
        data = _read_config_file(Path(source))
    else:
        raise TypeError(f"config must be an EngineConfig, a dict or a file path, not {type(source).__name__}")
    data.update(overrides)
    return EngineConfig.model_validate(data)


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config file {str(path)!r}: use a .yaml, .yml or .json file")
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of settings")
    return data


__all__ = ["EngineConfig", "PluginSettings", "load_config", "ValidationError"]
