"""FP8 KV cache: dtypes, per-tensor scales and how checkpoints name them.

``kv_cache_dtype="fp8"`` (= ``"fp8_e4m3"``, ``torch.float8_e4m3fn``) or
``"fp8_e5m2"`` (``torch.float8_e5m2``) halves the cache of a 16-bit model,
so the pool holds twice the blocks. Each attention layer keeps two float32
scalars, ``k_scale`` and ``v_scale`` (buffers of ``framework.layers.Attention``):

    stored = saturate(x / scale)  cast to fp8 (round to nearest even)
    read   = float(stored) * scale

Scales come, in this order, from

1. the checkpoint (llm-compressor / compressed-tensors, ModelOpt and older
   AutoFP8 names, see ``kv_scale_targets``);
2. the first prefill, when ``EngineConfig.calculate_kv_scales`` is set
   (``amax / fp8_max`` per layer, see ``compute_scale``);
3. otherwise 1.0 (as vLLM): fine for models whose K/V stay well inside the
   fp8 range (e4m3: |x| <= 448; e5m2: <= 57344).

The selection of this cache is a KV-cache dtype, not a quantizer: Hugging
Face's ``quant_method="fp8"`` names FP8 *weights*, so nothing is registered
under ``register_quantizers`` here.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from framework.model_config import FP8_KV_CACHE_DTYPES

logger = logging.getLogger(__name__)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

# Checkpoint name suffix -> which scales it sets, and how many name parts
# (after the attention module's own path) the suffix has.
#   llm-compressor / compressed-tensors (current): self_attn.k_scale, self_attn.v_scale
#   compressed-tensors (older exports):           self_attn.k_proj.output_scale, v_proj.output_scale
#   ModelOpt:                                      self_attn.k_proj.k_scale, self_attn.v_proj.v_scale
#   AutoFP8 (deprecated, one scale for both):      self_attn.kv_scale
#   our own module names:                          self_attn.attn.k_scale, self_attn.attn.v_scale
_SCALE_SUFFIXES = {
    ".k_proj.output_scale": ("k",),
    ".v_proj.output_scale": ("v",),
    ".k_proj.k_scale": ("k",),
    ".v_proj.v_scale": ("v",),
    ".attn.k_scale": ("k",),
    ".attn.v_scale": ("v",),
    ".k_scale": ("k",),
    ".v_scale": ("v",),
    ".kv_scale": ("k", "v"),
}
# Attention-quantization scales some exports carry; an fp8 KV cache does not use them.
_UNUSED_SCALES = (".q_scale", ".prob_scale", ".attn.q_scale", ".attn.prob_scale")


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def fp8_dtype(name: str) -> torch.dtype:
    """``"fp8"`` / ``"fp8_e4m3"`` / ``"fp8_e5m2"`` -> the torch dtype (``ValueError`` otherwise)."""
    if name not in FP8_KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r} is not an fp8 dtype; choose one of {', '.join(FP8_KV_CACHE_DTYPES)}")
    return FP8_KV_CACHE_DTYPES[name]


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value: 448 (e4m3fn), 57344 (e5m2)."""
    return float(torch.finfo(dtype).max)


def quantize(x: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """``x / scale`` in float32, saturated to the fp8 range, rounded to ``dtype`` (nearest even)."""
    limit = fp8_max(dtype)
    return (x.float() / scale).clamp(-limit, limit).to(dtype)


def dequantize(stored: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``float32(stored) * scale``, returned in ``dtype``."""
    return (stored.float() * scale).to(dtype)


def compute_scale(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-tensor scale mapping ``max |x|`` onto the fp8 maximum (float32 scalar; 1.0 for all-zero ``x``)."""
    amax = x.detach().abs().amax().float()
    return torch.where(amax > 0, amax / fp8_max(dtype), torch.ones_like(amax))


def kv_scale_targets(ckpt_name: str) -> tuple[str, tuple[str, ...]] | None:
    """Where a checkpoint's KV-cache scale goes: ``(attention block path, ("k", "v") subset)``.

    ``"model.layers.3.self_attn.k_scale"`` -> ``("model.layers.3.self_attn", ("k",))``. None when the
    name is not a KV scale.
    """
    for suffix, which in _SCALE_SUFFIXES.items():
        if ckpt_name.endswith(suffix):
            path = ckpt_name[: -len(suffix)]
            return path.removesuffix(".attn"), which
    return None


def _attention_of(model: nn.Module, path: str) -> nn.Module | None:
    from framework.layers.attention import Attention

    for candidate in (f"{path}.attn", path):
        try:
            module = model.get_submodule(candidate)
        except AttributeError:
            continue
        if isinstance(module, Attention):
            return module
    return None


def load_kv_scale(model: nn.Module, ckpt_name: str, tensor: torch.Tensor) -> bool:
    """Load ``tensor`` into the ``k_scale`` / ``v_scale`` of the attention layer it names.

    For a model's ``load_weights``: call it first for each checkpoint tensor
    and skip the tensor when it returns True (a KV scale, loaded; or a query /
    probability scale, which an fp8 KV cache does not use).

    Raises:
        ValueError: a KV scale with more than one element (per-head scales are
            not supported), a non-positive or non-finite one, or one whose
            attention layer does not exist (naming the checkpoint tensor).
    """
    if ckpt_name.endswith(_UNUSED_SCALES):
        logger.debug("ignoring %s: attention (query/probability) scales are not used", ckpt_name)
        return True
    target = kv_scale_targets(ckpt_name)
    if target is None:
        return False
    path, which = target
    attn = _attention_of(model, path)
    if attn is None:
        raise ValueError(f"checkpoint tensor {ckpt_name!r}: no attention layer at {path!r} for this KV-cache scale")
    if tensor.numel() != 1:
        raise ValueError(
            f"checkpoint tensor {ckpt_name!r}: KV-cache scale must be one value per layer "
            f"(per-tensor); got shape {tuple(tensor.shape)}"
        )
    value = tensor.detach().float().reshape(())
    if not torch.isfinite(value) or value <= 0:
        raise ValueError(f"checkpoint tensor {ckpt_name!r}: KV-cache scale must be finite and > 0, got {value.item()}")
    for kind in which:
        attn.set_kv_scale(kind, value)
    return True
