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


class FusingBackend(RecordingBackend):
    """Declares ``fuses_rotary``: records the keywords and rotates as a fusing backend must."""

    fuses_rotary = True

    def forward(self, q, k, v, kv_cache, metadata, rotary=None, positions=None):
        self.seen_qk = (q.clone(), k.clone())
        self.got = (rotary, positions)
        if rotary is not None:
            q, k = rotary(positions, q.flatten(1), k.flatten(1))
        return q.reshape(q.shape[0], self.num_heads, self.head_dim) * 2


def _rope_case():
    from framework.layers import get_rope

    rope = get_rope(8, 64, {"rope_type": "default", "rope_theta": 10000.0})
    positions = torch.tensor([0, 5, 63])
    q, k, v = torch.randn(3, 32), torch.randn(3, 16), torch.randn(3, 16)
    return rope, positions, q, k, v


def test_attention_rotates_for_a_backend_that_does_not_fuse():
    rope, positions, q, k, v = _rope_case()
    layer = Attention(4, 8, 0.125, 2, LayerContext(attention_backend=RecordingBackend))
    with set_forward_context(None):
        out = layer(q, k, v, positions=positions, rotary=rope)
    q_rot, _ = rope(positions, q, k)
    torch.testing.assert_close(out, 2 * q_rot, rtol=0, atol=0)
    assert not torch.equal(q_rot, q)


def test_attention_hands_unrotated_qk_to_a_fusing_backend():
    rope, positions, q, k, v = _rope_case()
    layer = Attention(4, 8, 0.125, 2, LayerContext(attention_backend=FusingBackend))
    with set_forward_context(None):
        out = layer(q, k, v, positions=positions, rotary=rope)
    assert layer.impl.got[0] is rope and layer.impl.got[1] is positions
    assert torch.equal(layer.impl.seen_qk[0].flatten(1), q) and torch.equal(layer.impl.seen_qk[1].flatten(1), k)
    torch.testing.assert_close(out, 2 * rope(positions, q, k)[0], rtol=0, atol=0)
    # without rotary nothing is passed on (other models keep calling attn(q, k, v))
    with set_forward_context(None):
        layer(q, k, v)
    assert layer.impl.got == (None, None)


def test_attention_rotary_needs_positions():
    rope, _, q, k, v = _rope_case()
    layer = Attention(4, 8, 0.125, 2, LayerContext(attention_backend=RecordingBackend), prefix="l3.attn")
    with pytest.raises(ValueError, match="l3.attn: rotary needs positions"):
        layer(q, k, v, rotary=rope)
