"""``LayerContext``: what every layer needs to know besides its own sizes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from framework.interfaces import LinearMethod, QuantConfig


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class LayerContext:
    """Shared construction context handed to model plugins and their layers.

    Attributes:
        dtype: parameter and activation dtype.
        device: where parameters are created.
        attention_backend: the selected ``AttentionBackend`` class.
        quant_config: the checkpoint's quantization method, or None.
        tp_rank / tp_size: tensor-parallel position; layers create and load
            only their shard (``tp_size == 1`` until the distributed runner lands).
        all_reduce: sums a row-parallel partial result across ranks
            (identity on one rank).
    """

    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    attention_backend: type | None = None
    quant_config: QuantConfig | None = None
    tp_rank: int = 0
    tp_size: int = 1
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity

    def linear_method(self, layer: torch.nn.Module, prefix: str) -> LinearMethod | None:
        """The quant method for one linear layer (None: unquantized)."""
        if self.quant_config is None:
            return None
        return self.quant_config.get_linear_method(layer, prefix)
