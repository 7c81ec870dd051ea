"""Small, capability-declaring interfaces that plugins implement.

* model architectures: ``CausalLM`` (a protocol; any ``nn.Module`` with these
  methods works);
* samplers: ``Sampler``;
* quantizers: ``QuantConfig`` and the ``LinearMethod`` it hands to layers;
* attention backends: ``framework.attention.AttentionBackend``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from framework.sampling_metadata import SamplerOutput, SamplingMetadata


@runtime_checkable
class CausalLM(Protocol):
    """What a model plugin's class provides (constructed as ``Class(hf_config, ctx)``)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flattened batch in, hidden states out.

        Args:
            input_ids: ``[num_tokens]`` int64, the new tokens of every sequence.
            positions: ``[num_tokens]`` int64, each token's position.
        Returns:
            ``[num_tokens, hidden_size]`` final hidden states (after the norm).
        """

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, hidden_size]`` -> ``[n, vocab_size]`` float32 logits (only sampled rows)."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load checkpoint tensors; return the names of the parameters filled.

        Maps checkpoint names onto fused parameters (``q/k/v_proj`` ->
        ``qkv_proj``; ``gate/up_proj`` -> ``gate_up_proj``) and keeps only this
        rank's shard through each parameter's ``weight_loader``.
        """


class Sampler:
    """Turns one step's logits into tokens (registered via ``register_samplers``)."""

    name: ClassVar[str] = ""

    def __call__(self, logits: torch.Tensor, metadata: "SamplingMetadata") -> "SamplerOutput":
        """Sample one token per row.

        Args:
            logits: ``[N, vocab]`` float32 raw logits of the rows that sample.
            metadata: per-row parameters as device tensors.
        Returns:
            ``SamplerOutput`` on the device; no host sync inside.
        """
        raise NotImplementedError


class LinearMethod:
    """How a linear layer stores and applies its weight (unquantized, GPTQ, AWQ...)."""

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        params_dtype: torch.dtype,
    ) -> None:
        """Register the layer's parameters; each gets a ``weight_loader`` attribute."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Repack loaded weights for the kernels (optional)."""

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class QuantConfig:
    """A quantization method (registered via ``register_quantizers``)."""

    name: ClassVar[str] = ""

    @classmethod
    def from_config(cls, quantization_config: dict[str, Any]) -> "QuantConfig":
        """Build from a checkpoint's ``quantization_config`` (may be empty)."""
        return cls()

    def get_linear_method(self, layer: torch.nn.Module, prefix: str) -> LinearMethod | None:
        """The method for one linear layer, or None to leave it unquantized."""
        return None
