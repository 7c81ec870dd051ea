"""AWQ 4-bit checkpoints in AutoAWQ's GEMM layout (``version = "gemm"``).

Per quantized linear (K input, N output features, G = K / group_size)::

    qweight  int32 [K, N // 8]   packed along N, interleaved: slot i (bits 4i..4i+3)
                                 of column c holds output c*8 + AWQ_ORDER[i]
    qzeros   int32 [G, N // 8]   same packing; the zero point itself (no offset)
    scales   fp16  [G, N]

    W[n, k] = (q[k, n] - z[k // group_size, n]) * scales[k // group_size, n]

Settings: ``quantization_config`` (``bits``, ``group_size``, ``zero_point``,
``version``, ``modules_to_not_convert``) or AutoAWQ's quant_config.json
(``w_bit``, ``q_group_size``, ...; ``HFConfig.from_file`` merges it). At load
time each layer is unpacked and repacked along K into
``plugins.quant.int4_common``'s layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from framework.interfaces import LinearMethod, QuantConfig
from plugins.quant.int4_common import (
    apply_int_silu,
    apply_int_weight,
    check_choice,
    check_group_size,
    checked_parts,
    fuses_int_silu,
    is_quantized_layer,
    make_param,
    pack_rows,
    set_int_layout,
    unpack_cols,
)

# slot i of a packed word holds output feature AWQ_ORDER[i] of its 8
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SLOT_OF_FEATURE = tuple(AWQ_ORDER.index(j) for j in range(8))


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, C]`` in AWQ's interleaved column packing -> ``[R, C * 8]`` values in ``[0, 16)``."""
    slots = unpack_cols(packed, 4).view(packed.shape[0], -1, 8)  # [R, C, slot]
    index = torch.tensor(_SLOT_OF_FEATURE, device=packed.device)
    return slots.index_select(2, index).reshape(packed.shape[0], -1)


class AWQConfig(QuantConfig):
    """AWQ settings: bits must be 4; group_size -1 or > 0; version "gemm"."""

    name = "awq"

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        zero_point: bool = True,
        version: str = "gemm",
        modules_to_not_convert: list[str] | None = None,
    ):
        check_choice("awq", "bits", bits, (4,))
        check_group_size("awq", group_size)
        check_choice("awq", "version", version, ("gemm",))
        self.bits, self.group_size, self.zero_point, self.version = bits, group_size, bool(zero_point), version
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    @classmethod
    def quantize_checkpoint(cls, model_dir, out_dir, **options):
        """``framework quantize MODEL OUT --method awq``: see ``plugins.quant.quantize_awq``."""
        from plugins.quant.quantize_awq import quantize_checkpoint

        return quantize_checkpoint(model_dir, out_dir, **options)

    @classmethod
    def from_config(cls, quantization_config: dict[str, Any]) -> "AWQConfig":
        cfg = quantization_config or {}
        return cls(
            bits=cfg.get("bits", cfg.get("w_bit", 4)),
            group_size=cfg.get("group_size", cfg.get("q_group_size", 128)),
            zero_point=cfg.get("zero_point", True),
            version=str(cfg.get("version", "gemm")).lower(),
            modules_to_not_convert=cfg.get("modules_to_not_convert"),
        )

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        if not is_quantized_layer(prefix, not_convert=self.modules_to_not_convert):
            return None
        return AWQLinearMethod(self)

    def __repr__(self) -> str:
        return f"AWQConfig(bits={self.bits}, group_size={self.group_size}, zero_point={self.zero_point})"


class AWQLinearMethod(LinearMethod):
    def __init__(self, config: AWQConfig):
        self.config = config

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, params_dtype):
        cfg, name = self.config, layer.prefix or "linear"
        k, n = input_size_per_partition, sum(output_partition_sizes)
        if k % 8:
            raise ValueError(f"{name}: {k} input features per rank are not a multiple of 8 (awq bits=4)")
        if cfg.group_size != -1 and k % cfg.group_size:
            raise ValueError(
                f"{name}: {k} input features per rank are not a multiple of awq group_size={cfg.group_size}"
            )
        checked_parts(name, output_partition_sizes, 8, "awq packs 8 output features per int32")
        # group_size -1: one group over all ranks' inputs, replicated (no input_dim)
        groups = {} if cfg.group_size == -1 else {"input_dim": 0}
        num_groups = 1 if cfg.group_size == -1 else k // cfg.group_size
        int32 = torch.int32
        make_param(
            layer,
            "qweight",
            torch.empty(k, n // 8, dtype=int32),
            input_dim=0,
            output_dim=1,
            packed_dim=1,
            pack_factor=8,
        )
        make_param(
            layer,
            "qzeros",
            torch.empty(num_groups, n // 8, dtype=int32),
            output_dim=1,
            packed_dim=1,
            pack_factor=8,
            **groups,
        )
        make_param(layer, "scales", torch.empty(num_groups, n, dtype=params_dtype), output_dim=1, **groups)

    def process_weights_after_loading(self, layer):
        if "zeros" in layer._parameters:
            return  # already converted
        k = layer.qweight.shape[0]
        group_size = k if self.config.group_size == -1 else self.config.group_size
        qweight = pack_rows(unpack_awq(layer.qweight.data), 4)
        scales = layer.scales.data
        zeros = unpack_awq(layer.qzeros.data).to(scales.dtype)
        set_int_layout(layer, qweight, scales, zeros, None, 4, group_size)

    def init_dummy_weights(self, layer, generator: torch.Generator) -> None:
        """Benchmark weights: zero point 8, small positive scales (W ~ 1e-3)."""
        with torch.no_grad():
            layer.qzeros.fill_(0x88888888 - 2**32)
            layer.scales.uniform_(0.5 * 2e-3 / 16, 2e-3 / 16, generator=generator)

    def apply(self, layer, x, bias=None):
        return apply_int_weight(layer, x, bias)

    def apply_silu_and_mul(self, layer, x, bias=None):
        return apply_int_silu(layer, x, bias)

    def fuses_silu_and_mul(self, layer, rows):
        return fuses_int_silu(layer, rows)
