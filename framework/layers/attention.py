"""The attention layer model plugins use: reshapes and calls the selected backend.

The layer owns no kernel. ``ctx.attention_backend`` (chosen per device at
engine construction) provides one instance per layer; the model runner binds
this layer's slice of the paged KV cache to ``kv_cache`` once the pool is
allocated (it stays None while memory is profiled), and sets the step's
metadata through ``framework.forward_context.set_forward_context``.

FP8 KV cache: the layer holds ``k_scale`` and ``v_scale``, float32 scalar
buffers on the model's device (1.0 unless the checkpoint or the first prefill
sets them; stored = x / scale, read = stored * scale). When the bound cache
is an fp8 tensor, ``forward`` hands them to the backend as the keyword
arguments ``k_scale`` / ``v_scale`` (device tensors: a captured CUDA graph
reads their current values). With ``calculate_kv_scales`` set, the first
forward with a bound cache that is not a CUDA-graph capture sets them to
``amax / fp8_max`` of that step's K and V.
"""

from __future__ import annotations

import torch
from torch import nn

from framework.forward_context import get_forward_context
from framework.layers.context import LayerContext


_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class Attention(nn.Module):
    """Causal self-attention over each sequence's paged KV cache.

    Args:
        num_heads: query heads on this rank.
        head_dim: size of one head.
        scale: softmax scale (usually ``head_dim ** -0.5``).
        num_kv_heads: key/value heads on this rank (GQA when fewer than ``num_heads``).
        ctx: the layer context; ``ctx.attention_backend`` must be set.
        prefix: the layer's name in the model (e.g. ``model.layers.0.self_attn.attn``).
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int | None = None,
        ctx: LayerContext | None = None,
        prefix: str = "",
    ):
        super().__init__()
        ctx = ctx or LayerContext()
        if ctx.attention_backend is None:
            raise ValueError(f"{prefix or 'Attention'}: LayerContext.attention_backend is not set")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.num_kv_heads = num_kv_heads or num_heads
        self.scale = scale
        self.layer_name = prefix
        self.impl = ctx.attention_backend(num_heads, head_dim, scale, self.num_kv_heads)
        self.kv_cache: torch.Tensor | None = None  # bound by the model runner
        # Per-tensor fp8 KV-cache scales (float32 scalars); not parameters, so
        # a checkpoint without them loads as before.
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32, device=ctx.device))
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32, device=ctx.device))
        self.calculate_kv_scales = False  # set by the runner from EngineConfig.calculate_kv_scales

    def set_kv_scale(self, kind: str, value: torch.Tensor | float) -> None:
        """Set ``k_scale`` (``kind="k"``) or ``v_scale`` (``"v"``) in place (keeps the buffer's address)."""
        if kind not in ("k", "v"):
            raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")
        buffer = self.k_scale if kind == "k" else self.v_scale
        with torch.no_grad():
            buffer.copy_(torch.as_tensor(value, dtype=torch.float32).reshape(()))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor | None = None,
        rotary: nn.Module | None = None,
    ) -> torch.Tensor:
        """``q [T, Hq*D]``, ``k, v [T, Hk*D]`` -> ``[T, Hq*D]``.

        With ``rotary`` (a ``RotaryEmbedding``) and ``positions [T]``, q and k
        come un-rotated: a backend with ``fuses_rotary`` rotates them in its
        own kernels, otherwise the layer applies ``rotary(positions, q, k)``
        first (the same values either way).
        """
        cache = self.kv_cache
        fp8 = cache is not None and cache.dtype in _FP8_DTYPES
        kwargs = {}
        if rotary is not None:
            if positions is None:
                raise ValueError(f"{self.layer_name or 'Attention'}: rotary needs positions")
            # The first-step kv-scale calibration measures rotated keys, so it rotates here.
            if getattr(self.impl, "fuses_rotary", False) and not (fp8 and self.calculate_kv_scales and not _capturing()):
                kwargs = {"rotary": rotary, "positions": positions}
            else:
                q, k = rotary(positions, q, k)
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if fp8:
            # Only fp8-capable backends see the keywords (supports() accepted the dtype).
            if self.calculate_kv_scales and not _capturing():
                self._calculate_scales(k, v, cache.dtype)
            kwargs.update(k_scale=self.k_scale, v_scale=self.v_scale)
        out = self.impl.forward(q, k, v, cache, get_forward_context().attn_metadata, **kwargs)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def _calculate_scales(self, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> None:
        """Once: scales that map this step's ``max |k|`` / ``max |v|`` onto the fp8 maximum (no host sync)."""
        limit = torch.finfo(dtype).max
        for kind, x in (("k", k), ("v", v)):
            amax = x.detach().abs().amax().float()
            self.set_kv_scale(kind, torch.where(amax > 0, amax / limit, torch.ones_like(amax)))
        self.calculate_kv_scales = False

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"backend={type(self.impl).__name__}"
            + (f", kv_cache_dtype={self.kv_cache.dtype}" if self.kv_cache is not None else "")
        )
