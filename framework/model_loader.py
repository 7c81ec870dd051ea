"""Reading Hugging Face checkpoints into model plugins (or dummy weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: those of the index, else every ``*.safetensors``."""
    index = path / INDEX_FILE
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{INDEX_FILE} in {path} names shard files that are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"no *.safetensors weights in {path}; this engine reads safetensors checkpoints only "
            f"(use load_format='dummy' for random weights)"
        )
    return files


def iter_checkpoint(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the checkpoint, one at a time, on the CPU."""
    from safetensors import safe_open

    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, path: Path) -> None:
    """Fill every parameter of ``model`` from the checkpoint at ``path``.

    Shape mismatches and unknown tensors are reported by the parameters'
    weight loaders; parameters left unfilled are reported here.
    """
    loaded = model.load_weights(iter_checkpoint(path))
    expected = {name for name, _ in model.named_parameters()}
    missing = sorted(expected - set(loaded))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint {path} lacks tensors for {len(missing)} parameters: {shown}")
    finish_loading(model)


def init_dummy_weights(model: nn.Module, seed: int = 0, low: float = -1e-3, high: float = 1e-3) -> None:
    """Random weights of the model's shape, for benchmarks (``load_format="dummy"``).

    Norm weights are set to 1 so activations keep a realistic scale. Integer
    (packed quantized) parameters get random integers over their dtype's full
    range. A quantized layer's method may then fix what must be consistent
    (zero points, positive scales, group indices) through an optional
    ``linear_method.init_dummy_weights(layer, generator)``.
    """
    generators: dict[torch.device, torch.Generator] = {}

    def generator(device: torch.device) -> torch.Generator:
        return generators.setdefault(device, torch.Generator(device=device).manual_seed(seed))

    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.is_floating_point():
                if param.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
                    info = torch.iinfo(param.dtype)
                    param.random_(info.min, info.max, generator=generator(param.device))
                continue
            if "norm" in name:
                param.fill_(1.0)
                continue
            param.uniform_(low, high, generator=generator(param.device))
        for module in model.modules():
            hook = getattr(getattr(module, "linear_method", None), "init_dummy_weights", None)
            if hook is not None:
                hook(module, generator(next(module.parameters()).device))
    finish_loading(model)


def finish_loading(model: nn.Module) -> None:
    """Let quantized layers repack their weights once everything is loaded."""
    for module in model.modules():
        method = getattr(module, "linear_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
