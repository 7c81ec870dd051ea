"""The Attention layer: reshapes, passes the bound cache and the forward context's metadata."""

import pytest
import torch

from framework.attention import AttentionBackend
from framework.forward_context import set_forward_context
from framework.layers import Attention, LayerContext


class RecordingBackend(AttentionBackend):
    def forward(self, q, k, v, kv_cache, metadata):
        self.seen = (q.shape, k.shape, v.shape, kv_cache, metadata)
        return q * 2


def test_attention_reshapes_and_forwards_context():
    layer = Attention(4, 8, 0.125, 2, LayerContext(attention_backend=RecordingBackend), prefix="l0.attn")
    assert (layer.impl.num_heads, layer.impl.num_kv_heads, layer.impl.scale) == (4, 2, 0.125)
    layer.kv_cache = cache = torch.zeros(1)
    q, k, v = torch.randn(3, 32), torch.randn(3, 16), torch.randn(3, 16)
    meta = object()
    with set_forward_context(meta):
        out = layer(q, k, v)
    assert layer.impl.seen == ((3, 4, 8), (3, 2, 8), (3, 2, 8), cache, meta)
    torch.testing.assert_close(out, 2 * q)


def test_attention_needs_a_backend():
    with pytest.raises(ValueError, match="attention_backend"):
        Attention(4, 8, 0.125, 2, LayerContext())
