"""Helpers every parameter's ``weight_loader`` shares: naming, shape checks, copying.

Convention: each ``nn.Parameter`` a layer creates carries
``weight_loader(param, loaded_weight, shard_id=None)``; the model's
``load_weights`` looks the parameter up by name and calls it with the full
checkpoint tensor. The loader keeps only this rank's shard. ``param_name``
(set by ``tag_parameters``) lets error messages name the parameter.
"""

from __future__ import annotations

import torch
from torch import nn


def tag_parameters(module: nn.Module, prefix: str) -> None:
    """Record each direct parameter's full name (``prefix.name``) on it, for error messages."""
    for name, param in module.named_parameters(recurse=False):
        if not hasattr(param, "param_name"):
            param.param_name = f"{prefix}.{name}" if prefix else name


def describe(param: torch.Tensor, shard_id: object = None) -> str:
    name = getattr(param, "param_name", "parameter")
    return name if shard_id is None else f"{name} (shard {shard_id!r})"


def check_shape(param: torch.Tensor, loaded: torch.Tensor, expected: tuple[int, ...], shard_id: object = None) -> None:
    """Raise ``ValueError`` unless the checkpoint tensor has the full (unsharded) ``expected`` shape."""
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(
            f"{describe(param, shard_id)}: checkpoint tensor has shape {tuple(loaded.shape)}, "
            f"expected {tuple(expected)} (parameter shape on this rank: {tuple(param.shape)})"
        )


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy (casting dtype, moving device) without autograd tracking."""
    with torch.no_grad():
        dst.copy_(src)


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
    """Loader of replicated (unsharded) parameters: shape check, then copy.

    Args:
        param: the destination parameter.
        loaded_weight: the checkpoint tensor; must have ``param``'s shape.
        shard_id: must be None (a replicated parameter has no shards).
    Raises:
        ValueError: on a shape mismatch (naming the parameter and both shapes).
    """
    if shard_id is not None:
        raise ValueError(f"{describe(param)} is not a fused parameter; got shard {shard_id!r}")
    check_shape(param, loaded_weight, tuple(param.shape))
    copy_into(param.data, loaded_weight)
