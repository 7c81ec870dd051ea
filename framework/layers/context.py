"""``LayerContext``: what every layer needs to know besides its own sizes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from framework.interfaces import LinearMethod, QuantConfig


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _no_gather(x: torch.Tensor) -> torch.Tensor:
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
            only their shard.
        all_reduce: sums a row-parallel partial result across the
            tensor-parallel ranks (identity on one rank).
        all_gather: concatenates each tensor-parallel rank's tensor along the
            last dim, in rank order (identity on one rank); the LM head
            gathers its vocabulary shards with it.
        pipeline: this rank's pipeline stage, or None without pipeline
            parallelism. A model plugin that supports ``pipeline_parallel_size
            > 1`` builds only the layers of ``pipeline.layer_range(n)`` (the
            embedding when ``pipeline.is_first``, the final norm and LM head
            when ``pipeline.is_last``), takes its input activations from
            ``pipeline.recv(shape, dtype)`` and hands its output on with
            ``pipeline.send(tensor)`` (see ``framework.distributed.PipelineStage``).
    """

    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    attention_backend: type | None = None
    quant_config: QuantConfig | None = None
    tp_rank: int = 0
    tp_size: int = 1
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity
    all_gather: Callable[[torch.Tensor], torch.Tensor] = _no_gather
    pipeline: Any = None

    def linear_method(self, layer: torch.nn.Module, prefix: str) -> LinearMethod | None:
        """The quant method for one linear layer (None: unquantized)."""
        if self.quant_config is None:
            return None
        return self.quant_config.get_linear_method(layer, prefix)
