"""The attention layer model plugins use: reshapes and calls the selected backend.

The layer owns no kernel. ``ctx.attention_backend`` (chosen per device at
engine construction) provides one instance per layer; the model runner binds
this layer's slice of the paged KV cache to ``kv_cache`` once the pool is
allocated (it stays None while memory is profiled), and sets the step's
metadata through ``framework.forward_context.set_forward_context``.
"""

from __future__ import annotations

import torch
from torch import nn

from framework.forward_context import get_forward_context
from framework.layers.context import LayerContext


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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q [T, Hq*D]``, ``k, v [T, Hk*D]`` -> ``[T, Hq*D]``."""
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        out = self.impl.forward(q, k, v, self.kv_cache, get_forward_context().attn_metadata)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"backend={type(self.impl).__name__}"
        )
