"""Admission checks of a request's ``SamplingParams`` that need the engine, and its seeds."""

from __future__ import annotations

import torch

from framework.config import EngineConfig
from framework.interfaces import DecodingStrategy, Sampler
from framework.model_config import ModelConfig
from framework.registry import Registries
from framework.sampling_params import SamplingParams


def check_params(params: SamplingParams, config: EngineConfig, mc: ModelConfig, registries: Registries) -> type:
    """Limits, vocabulary and plugin names (``ValueError`` naming the field); returns the strategy class.

    ``SamplingParams`` checks itself on construction; what is left depends on
    the engine: ``max_logprobs``, token ids within the vocabulary, and the
    sampler and strategy a request names being installed.
    """
    limit = min(config.max_logprobs, mc.vocab_size)
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value > limit:
            raise ValueError(f"SamplingParams.{name} must be in [0, {limit}] (max_logprobs), got {value}")
    for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
        bad = [t for t in ids if t >= mc.vocab_size]
        if bad:
            raise ValueError(
                f"SamplingParams.{name} token id {bad[0]} is out of range: the vocabulary has {mc.vocab_size} tokens"
            )
    _plugin(registries, params.sampler, Sampler, "sampler")
    return _plugin(registries, params.strategy_name, DecodingStrategy, "strategy")


def _plugin(registries: Registries, name: str, base: type, field: str) -> type:
    registry = registries.samplers

    def is_kind(key: str) -> bool:
        target = registry.get(key)
        return isinstance(target, type) and issubclass(target, base)

    if name not in registry or not is_kind(name):
        known = ", ".join(n for n in registry.names() if is_kind(n)) or "none"
        raise ValueError(f"SamplingParams.{field} {name!r} is not an installed {field}; installed: {known}")
    return registry.get(name)


def seed_generators(params: SamplingParams, device: torch.device) -> list[torch.Generator]:
    """Sequence i of a seeded request draws from its own generator, seeded ``seed + i`` (as vLLM).

    Greedy requests (beam search included) draw nothing and get none.
    """
    if params.seed is None or params.greedy:
        return []
    return [torch.Generator(device=device).manual_seed(params.seed + i) for i in range(params.best_of)]
