"""Resolving a checkpoint's quantization method against the registered quantizers."""

from __future__ import annotations

from framework.interfaces import QuantConfig
from framework.model_config import HFConfig
from framework.registry import Registries


def resolve_quant_config(registries: Registries, requested: str | None, hf_config: HFConfig) -> QuantConfig | None:
    """The quantizer for this model, or None for an unquantized one.

    The checkpoint's ``quantization_config.quant_method`` decides; the config's
    ``quantization`` may name it too, but naming another method is an error.
    """
    quant_cfg = hf_config.get("quantization_config") or {}
    found = quant_cfg.get("quant_method")
    if requested is not None and found is not None and requested != found:
        raise ValueError(
            f"quantization={requested!r} contradicts the checkpoint, which is quantized with {found!r}"
        )
    method = requested or found
    if method is None:
        return None
    if method not in registries.quantizers:
        known = ", ".join(registries.quantizers.names()) or "none"
        raise ValueError(f"quantization method {method!r} is not installed; installed quantizers: {known}")
    return registries.quantizers.get(method).from_config(quant_cfg)
