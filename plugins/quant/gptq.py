"""GPTQ weight-only checkpoints (AutoGPTQ / GPTQModel / transformers layout), 4 and 8 bits.

Per quantized linear (K input, N output features, ``pack = 32 // bits``,
G = K / group_size, or 1 for ``group_size = -1``)::

    qweight  int32 [K // pack, N]   packed along K: bits slice j of row r is input r*pack + j
    qzeros   int32 [G, N // pack]   packed along N: slot j of column c is output c*pack + j
    scales   fp16  [G, N]
    g_idx    int32 [K]              group of each input feature (act-order: not k // group_size)

    W[n, k] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]

with ``z = qzeros + 1`` in the original ("gptq", v1) checkpoint format --
the quantizer stores ``zero - 1`` -- and ``z = qzeros`` in GPTQModel's
``checkpoint_format = "gptq_v2"``. Symmetric checkpoints store
``2**(bits-1) - 1`` (so z = 2**(bits-1)).

Settings come from ``quantization_config`` in config.json or from
``quantize_config.json`` (``HFConfig.from_file`` merges that file):
``bits`` (4 or 8), ``group_size`` (-1 or > 0), ``desc_act``, ``sym``,
``checkpoint_format`` and, optionally, ``modules_in_block_to_quantize``.
With no settings at all (``quantization="gptq"`` on a plain config, e.g.
``load_format="dummy"`` benchmarks), the defaults are bits=4,
group_size=128, desc_act=False, sym=True, as in vLLM.

At load time the layer is converted to ``plugins.quant.int4_common``'s
layout: act-order inputs are sorted by ``g_idx`` (the weight rows with them,
``perm`` records the order for the activations), and only the groups this
rank's input features use are kept. Row-parallel layers load the full
``scales`` / ``qzeros`` (their groups follow ``g_idx``, not the rank's
slice) and keep their own groups, which must each have exactly
``group_size`` members on the rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from framework.interfaces import LinearMethod, QuantConfig
from framework.layers.weight_loading import check_shape, copy_into, describe
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
    unpack_rows,
)

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


class GPTQConfig(QuantConfig):
    """GPTQ settings (see the module docstring for the fields and defaults)."""

    name = "gptq"

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        desc_act: bool = False,
        sym: bool = True,
        checkpoint_format: str = "gptq",
        modules_in_block_to_quantize: list[str] | None = None,
    ):
        check_choice("gptq", "bits", bits, (4, 8))
        check_group_size("gptq", group_size)
        check_choice("gptq", "checkpoint_format", checkpoint_format, CHECKPOINT_FORMATS)
        self.bits, self.group_size = bits, group_size
        self.desc_act, self.sym = bool(desc_act), bool(sym)
        self.checkpoint_format = checkpoint_format
        self.modules_in_block_to_quantize = modules_in_block_to_quantize

    @classmethod
    def quantize_checkpoint(cls, model_dir, out_dir, **options):
        """``framework quantize MODEL OUT --method gptq``: see ``plugins.quant.quantize_gptq``."""
        from plugins.quant.quantize_gptq import quantize_checkpoint

        return quantize_checkpoint(model_dir, out_dir, **options)

    @classmethod
    def from_config(cls, quantization_config: dict[str, Any]) -> "GPTQConfig":
        cfg = quantization_config or {}
        only = cfg.get("modules_in_block_to_quantize")
        if only is not None:  # transformers writes a list of lists (one per sequential step)
            only = [name for item in only for name in (item if isinstance(item, list) else [item])]
        return cls(
            bits=cfg.get("bits", 4),
            group_size=cfg.get("group_size", 128),
            desc_act=cfg.get("desc_act", False),
            sym=cfg.get("sym", True),
            checkpoint_format=cfg.get("checkpoint_format") or "gptq",
            modules_in_block_to_quantize=only,
        )

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        if not is_quantized_layer(prefix, only=self.modules_in_block_to_quantize):
            return None
        return GPTQLinearMethod(self)

    def __repr__(self) -> str:
        return (
            f"GPTQConfig(bits={self.bits}, group_size={self.group_size}, desc_act={self.desc_act}, "
            f"sym={self.sym}, checkpoint_format={self.checkpoint_format!r})"
        )


class GPTQLinearMethod(LinearMethod):
    def __init__(self, config: GPTQConfig):
        self.config = config

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, params_dtype):
        cfg, name = self.config, layer.prefix or "linear"
        pack = 32 // cfg.bits
        k, n = input_size_per_partition, sum(output_partition_sizes)
        if k % pack:
            raise ValueError(f"{name}: {k} input features per rank are not a multiple of {pack} (gptq bits={cfg.bits})")
        if cfg.group_size != -1 and k % cfg.group_size:
            raise ValueError(
                f"{name}: {k} input features per rank are not a multiple of gptq group_size={cfg.group_size}"
            )
        checked_parts(name, output_partition_sizes, pack, f"qzeros pack {pack} values per int32")
        num_groups = 1 if cfg.group_size == -1 else layer.input_size // cfg.group_size  # all ranks' groups
        int32 = torch.int32
        make_param(
            layer,
            "qweight",
            torch.empty(k // pack, n, dtype=int32),
            input_dim=0,
            output_dim=1,
            packed_dim=0,
            pack_factor=pack,
        )
        make_param(
            layer,
            "qzeros",
            torch.empty(num_groups, n // pack, dtype=int32),
            output_dim=1,
            packed_dim=1,
            pack_factor=pack,
        )
        make_param(layer, "scales", torch.empty(num_groups, n, dtype=params_dtype), output_dim=1)
        g_idx = make_param(layer, "g_idx", torch.empty(k, dtype=int32), input_dim=0)
        g_idx.weight_loader = self._g_idx_loader(layer)

    @staticmethod
    def _g_idx_loader(layer: nn.Module):
        """g_idx: the rank's input slice; fused q/k/v (gate/up) parts must agree (they share one input)."""

        def load(param, loaded_weight, shard_id=None):
            k = param.shape[0]
            sharded = layer.input_size_per_partition != layer.input_size
            check_shape(param, loaded_weight, (layer.input_size,), shard_id)
            part = loaded_weight.narrow(0, layer.tp_rank * k, k) if sharded else loaded_weight
            first = getattr(param, "loaded_from", None)
            if shard_id is not None and first is not None and first != shard_id:
                if not torch.equal(param.data.cpu(), part.to(param.dtype).cpu()):
                    raise ValueError(
                        f"{describe(param, shard_id)} differs from shard {first!r}: the parts of a fused "
                        f"layer must share one act-order g_idx"
                    )
                return
            copy_into(param.data, part)
            param.loaded_from = shard_id

        return load

    def process_weights_after_loading(self, layer):
        if "zeros" in layer._parameters:
            return  # already converted
        cfg = self.config
        k = layer.qweight.shape[0] * (32 // cfg.bits)
        group_size = k if cfg.group_size == -1 else cfg.group_size
        g_idx = layer.g_idx.data.to(torch.int64)
        num_groups = layer.scales.shape[0]
        name = describe(layer.g_idx)
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups):
            raise ValueError(
                f"{name}: group indices must lie in [0, {num_groups}); got {int(g_idx.min())}..{int(g_idx.max())}"
            )
        order = torch.argsort(g_idx, stable=True)
        groups, counts = torch.unique_consecutive(g_idx[order], return_counts=True)
        if bool((counts != group_size).any()):
            raise ValueError(
                f"{name}: every group must hold exactly group_size={group_size} of this layer's "
                f"{k} input features (per rank); got group sizes {sorted(set(counts.tolist()))}. "
                f"Act-order checkpoints whose groups straddle tensor-parallel ranks are not supported."
            )
        qweight, perm = layer.qweight.data, None
        if not torch.equal(order, torch.arange(k, device=order.device)):
            qweight, perm = pack_rows(unpack_rows(qweight, cfg.bits)[order], cfg.bits), order
        zeros = unpack_cols(layer.qzeros.data, cfg.bits)[groups]
        if cfg.checkpoint_format == "gptq":
            zeros = zeros + 1  # v1 stores zero - 1
        scales = layer.scales.data[groups]
        set_int_layout(layer, qweight, scales, zeros.to(scales.dtype), perm, cfg.bits, group_size)

    def init_dummy_weights(self, layer, generator: torch.Generator) -> None:
        """Benchmark weights: in-order groups, symmetric zero points, small positive scales (W ~ 1e-3)."""
        cfg = self.config
        k = layer.g_idx.shape[0]
        start = layer.tp_rank * k if layer.input_size_per_partition != layer.input_size else 0
        group_size = layer.input_size if cfg.group_size == -1 else cfg.group_size
        with torch.no_grad():
            layer.g_idx.copy_(torch.arange(start, start + k, device=layer.g_idx.device) // group_size)
            stored = (1 << (cfg.bits - 1)) - (1 if cfg.checkpoint_format == "gptq" else 0)
            words = pack_rows(torch.full((32 // cfg.bits, 1), stored, device=layer.qzeros.device), cfg.bits)
            layer.qzeros.fill_(int(words.item()))
            scale = 2e-3 / (1 << cfg.bits)
            layer.scales.uniform_(0.5 * scale, scale, generator=generator)

    def apply(self, layer, x, bias=None):
        return apply_int_weight(layer, x, bias)

    def apply_silu_and_mul(self, layer, x, bias=None):
        return apply_int_silu(layer, x, bias)

    def fuses_silu_and_mul(self, layer, rows):
        return fuses_int_silu(layer, rows)
