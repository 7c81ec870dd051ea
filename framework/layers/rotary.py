"""Rotary position embedding (NeoX / Hugging Face Llama "rotate half" layout).

``get_rope`` turns a model's rope settings (``HFConfig.rope_settings()``)
into inverse frequencies, and ``RotaryEmbedding`` precomputes cos/sin for
every position up to ``max_model_len`` once; a step only gathers rows by
position (no per-token Python, no host sync).

Layout: within each head the first ``rotary_dim`` features rotate, as pairs
``(x[i], x[i + rotary_dim/2])``; the rest (``partial_rotary_factor < 1``)
pass through::

    out[:half]  = x1 * cos - x2 * sin
    out[half:]  = x2 * cos + x1 * sin          (x1, x2 = the two halves)
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from framework import ops


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding from a precomputed ``cos_sin_cache [max_positions, rotary_dim]``.

    Args:
        head_dim: size of one head.
        rotary_dim: leading features of each head that rotate (even, <= head_dim).
        inv_freq: ``[rotary_dim / 2]`` float32 inverse frequencies.
        max_positions: cache length; positions must stay below it.
        dtype / device: of the cache (the activation dtype).
    """

    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        inv_freq: torch.Tensor,
        max_positions: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(f"rotary_dim={rotary_dim} must be even and at most head_dim={head_dim}")
        self.head_dim, self.rotary_dim, self.max_positions = head_dim, rotary_dim, max_positions
        # Same arithmetic as transformers (position.float() * inv_freq in float32, then cos/sin),
        # done on the CPU so the table does not depend on the device's math library.
        freqs = torch.arange(max_positions, dtype=torch.int64, device="cpu").float()[:, None] * inv_freq.float().cpu()[None, :]
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [P, rotary_dim]: cos half | sin half
        self.register_buffer("inv_freq", inv_freq.float().to(device), persistent=False)
        self.register_buffer("cos_sin_cache", cache.to(device=device, dtype=dtype), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q [T, Hq*D]`` and ``k [T, Hk*D]`` by ``positions [T]``; returns new tensors.

        On CUDA (with Triton) one fused kernel rotates both
        (``framework.ops.triton_rotary``), with the same rounding.
        """
        if ops.use_triton(q):
            from framework.ops import triton_rotary

            if triton_rotary.supported(q, k):
                return triton_rotary.rotary_embedding(
                    positions, q, k, self.cos_sin_cache, self.head_dim, self.rotary_dim
                )
        cos, sin = self.cos_sin_cache.index_select(0, positions).to(q.dtype).chunk(2, dim=-1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, rotary_dim / 2]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        x = x.view(num_tokens, -1, self.head_dim)
        x1, x2 = x[..., : self.rotary_dim].chunk(2, dim=-1)
        parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
        if self.rotary_dim < self.head_dim:
            parts.append(x[..., self.rotary_dim :])
        return torch.cat(parts, dim=-1).reshape(num_tokens, -1)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, max_positions={self.max_positions}"


# -- inverse frequencies per rope_type ---------------------------------------
# Each takes (rope_theta, rotary_dim, params, max_position, max_model_len) and
# returns float32 [rotary_dim / 2], computed exactly as transformers does.


def _default(base: float, dim: int, params: dict, max_position: int, max_model_len: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def _linear(base: float, dim: int, params: dict, max_position: int, max_model_len: int) -> torch.Tensor:
    # Position interpolation: angle = (position / factor) * inv_freq, folded into
    # inv_freq as transformers does (same values as dividing the positions).
    return _default(base, dim, params, max_position, max_model_len) / params["factor"]


def _dynamic(base: float, dim: int, params: dict, max_position: int, max_model_len: int) -> torch.Tensor:
    # Dynamic NTK. transformers recomputes the base at run time from the current
    # sequence length; a static cache cannot, so (as vLLM does) we fix the base
    # for the whole table from max_model_len. Up to max_position_embeddings this
    # is exactly the default rope (transformers agrees in that range); beyond
    # it every position uses base' = base * (factor * L / max_pos - (factor - 1)) ** (dim / (dim - 2)).
    if max_model_len > max_position:
        factor = params["factor"]
        base = base * ((factor * max_model_len / max_position) - (factor - 1)) ** (dim / (dim - 2))
    return _default(base, dim, params, max_position, max_model_len)


def _llama3(base: float, dim: int, params: dict, max_position: int, max_model_len: int) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate between.
    inv_freq = _default(base, dim, params, max_position, max_model_len)
    factor = params["factor"]
    low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


_INV_FREQ: dict[str, Callable[..., torch.Tensor]] = {
    "default": _default,
    "linear": _linear,
    "dynamic": _dynamic,
    "llama3": _llama3,
}


def get_rope(
    head_dim: int,
    max_position: int,
    rope_parameters: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    max_model_len: int | None = None,
) -> RotaryEmbedding:
    """Build the rotary embedding a model's config asks for.

    Args:
        head_dim: size of one attention head.
        max_position: the model's ``max_position_embeddings`` (trained context).
        rope_parameters: ``HFConfig.rope_settings()``: ``rope_type``,
            ``rope_theta`` and the type's keys; ``partial_rotary_factor``
            (optional) rotates only that fraction of each head.
        dtype / device: of the cos/sin table.
        max_model_len: positions the table covers (default ``max_position``).
    Returns:
        A ``RotaryEmbedding`` (``forward(positions, q, k) -> (q, k)``).
    Raises:
        ValueError: for a rope_type not in default, linear, dynamic, llama3.
    """
    params = dict(rope_parameters or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _INV_FREQ:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(_INV_FREQ)}")
    base = float(params.get("rope_theta", 10000.0))
    rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    max_model_len = max_model_len or max_position
    inv_freq = _INV_FREQ[rope_type](base, rotary_dim, params, max_position, max_model_len)
    return RotaryEmbedding(head_dim, rotary_dim, inv_freq, max_model_len, dtype, device)
