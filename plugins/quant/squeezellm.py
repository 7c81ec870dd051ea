"""SqueezeLLM dense checkpoints: 4-bit indices into a per-output-channel lookup table.

Per quantized linear (K input, N output features)::

    qweight       int32 [K // 8, N]   packed along K: bits 4j..4j+3 of row r hold the
                                      index of input r*8 + j (lowest bits first)
    lookup_table  fp16  [N, 16]       the 16 values output channel n may take

    W[n, k] = lookup_table[n, index[k, n]]

Settings: ``quantization_config`` with ``quant_method = "squeezellm"`` and
``wbits`` (only 4), or SqueezeLLM's quant_config.json (merged by
``HFConfig.from_file``). The sparse outlier part of SqueezeLLM's
dense-and-sparse format is not supported. The torch path (dequantize, then
``F.linear``) runs everywhere.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from framework.interfaces import LinearMethod, QuantConfig
from plugins.quant.int4_common import check_choice, make_param, unpack_rows

LUT_SIZE = 16


def dequantize_lut(qweight: torch.Tensor, lookup_table: torch.Tensor) -> torch.Tensor:
    """``qweight [K // 8, N]``, ``lookup_table [N, 16]`` -> ``W [N, K]`` in the table's dtype."""
    index = unpack_rows(qweight, 4).t().to(torch.int64)  # [N, K]
    return torch.gather(lookup_table, 1, index)


class SqueezeLLMConfig(QuantConfig):
    """SqueezeLLM settings: ``wbits`` must be 4."""

    name = "squeezellm"

    def __init__(self, bits: int = 4):
        check_choice("squeezellm", "wbits", bits, (4,))
        self.bits = bits

    @classmethod
    def from_config(cls, quantization_config: dict[str, Any]) -> "SqueezeLLMConfig":
        cfg = quantization_config or {}
        return cls(bits=cfg.get("wbits", cfg.get("bits", 4)))

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        return SqueezeLLMLinearMethod()

    def __repr__(self) -> str:
        return f"SqueezeLLMConfig(wbits={self.bits})"


class SqueezeLLMLinearMethod(LinearMethod):
    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, params_dtype):
        k, n = input_size_per_partition, sum(output_partition_sizes)
        if k % 8:
            raise ValueError(
                f"{layer.prefix or 'linear'}: {k} input features per rank are not a multiple of 8 (squeezellm wbits=4)"
            )
        make_param(
            layer,
            "qweight",
            torch.empty(k // 8, n, dtype=torch.int32),
            input_dim=0,
            output_dim=1,
            packed_dim=0,
            pack_factor=8,
        )
        make_param(layer, "lookup_table", torch.empty(n, LUT_SIZE, dtype=params_dtype), output_dim=0)

    def apply(self, layer, x, bias=None):
        weight = dequantize_lut(layer.qweight, layer.lookup_table)
        return F.linear(x, weight.to(x.dtype), bias)
