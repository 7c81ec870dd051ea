"""Choosing the attention backend for a device."""

from __future__ import annotations

import torch

from framework.model_config import ModelConfig
from framework.registry import Registries


def _reason(backend: type, device: torch.device, model_config: ModelConfig) -> str | None:
    return backend.supports(
        device=device,
        dtype=model_config.dtype,
        head_dim=model_config.head_dim,
        kv_cache_dtype=model_config.kv_torch_dtype,
        block_size=model_config.block_size,
    )


def select_attention_backend(
    registries: Registries, device: torch.device, model_config: ModelConfig, requested: str | None
) -> type:
    """The backend class to use.

    ``requested`` (config ``attention_backend``) wins; an unknown name or one
    that cannot run here is a ``ValueError`` naming the reason. Otherwise the
    ``choose_attention_backend`` hook may pick among the backends that
    support the device; the default is the highest priority.
    """
    registry = registries.attention_backends
    if requested is not None:
        if requested not in registry:
            known = ", ".join(registry.names()) or "none"
            raise ValueError(f"attention_backend {requested!r} is not installed; installed: {known}")
        backend = registry.get(requested)
        reason = _reason(backend, device, model_config)
        if reason is not None:
            raise ValueError(f"attention_backend {requested!r} cannot run on {device}: {reason}")
        return backend

    candidates: dict[str, type] = {}
    rejected: list[str] = []
    for name in registry.names():
        backend = registry.get(name)
        reason = _reason(backend, device, model_config)
        if reason is None:
            candidates[name] = backend
        else:
            rejected.append(f"{name}: {reason}")
    if not candidates:
        raise ValueError(f"no attention backend supports {device} with this model ({'; '.join(rejected) or 'none installed'})")
    candidates = dict(sorted(candidates.items(), key=lambda kv: -kv[1].priority))
    choice = registries.hook.choose_attention_backend(device=device, model_config=model_config, candidates=candidates)
    if choice is None:
        return next(iter(candidates.values()))
    if choice not in candidates:
        raise ValueError(f"choose_attention_backend returned {choice!r}, which is not one of {list(candidates)}")
    return candidates[choice]
