"""Linear layers: each tensor-parallel rank loads exactly its slice of the checkpoint tensor."""

import pytest
import torch
import torch.nn.functional as F

from framework.interfaces import LinearMethod, QuantConfig
from framework.layers import (
    ColumnParallelLinear,
    LayerContext,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)


def ctx(rank=0, size=1):
    return LayerContext(tp_rank=rank, tp_size=size)


def load(layer, name, tensor, shard_id=None):
    param = getattr(layer, name)
    if shard_id is None:
        param.weight_loader(param, tensor)
    else:
        param.weight_loader(param, tensor, shard_id)


@pytest.mark.parametrize("rank", [0, 1])
def test_column_parallel_keeps_output_rows(rank):
    w, b = torch.randn(12, 8), torch.randn(12)
    layer = ColumnParallelLinear(8, 12, True, ctx(rank, 2), prefix="p")
    load(layer, "weight", w)
    load(layer, "bias", b)
    assert torch.equal(layer.weight, w[rank * 6 : (rank + 1) * 6])
    assert torch.equal(layer.bias, b[rank * 6 : (rank + 1) * 6])


def test_column_parallel_outputs_concatenate_to_full():
    w, b, x = torch.randn(12, 8), torch.randn(12), torch.randn(5, 8)
    outs = []
    for rank in range(2):
        layer = ColumnParallelLinear(8, 12, True, ctx(rank, 2))
        load(layer, "weight", w)
        load(layer, "bias", b)
        outs.append(layer(x))
    torch.testing.assert_close(torch.cat(outs, -1), F.linear(x, w, b))


@pytest.mark.parametrize("rank", [0, 1])
def test_row_parallel_keeps_input_columns_and_full_bias(rank):
    w, b = torch.randn(8, 12), torch.randn(8)
    layer = RowParallelLinear(12, 8, True, ctx(rank, 2), prefix="p")
    load(layer, "weight", w)
    load(layer, "bias", b)
    assert torch.equal(layer.weight, w[:, rank * 6 : (rank + 1) * 6])
    assert torch.equal(layer.bias, b)


def test_row_parallel_reduces_then_adds_bias_once():
    w, b, x = torch.randn(8, 12), torch.randn(8), torch.randn(5, 12)
    layers = []
    for rank in range(2):
        layer = RowParallelLinear(12, 8, True, ctx(rank, 2))
        load(layer, "weight", w)
        load(layer, "bias", b)
        layers.append(layer)
    partials = [F.linear(x[:, r * 6 : (r + 1) * 6], layers[r].weight) for r in range(2)]
    total = partials[0] + partials[1]
    for r, layer in enumerate(layers):
        layer.all_reduce = lambda t: total  # stands in for the collective: every rank receives the sum
        torch.testing.assert_close(layer(x[:, r * 6 : (r + 1) * 6]), F.linear(x, w, b))


@pytest.mark.parametrize("rank", [0, 1])
def test_merged_column_loads_gate_and_up_slices(rank):
    gate, up = torch.randn(10, 8), torch.randn(6, 8)
    layer = MergedColumnParallelLinear(8, [10, 6], False, ctx(rank, 2), prefix="mlp.gate_up_proj")
    load(layer, "weight", gate, 0)
    load(layer, "weight", up, 1)
    expected = torch.cat([gate[rank * 5 : (rank + 1) * 5], up[rank * 3 : (rank + 1) * 3]])
    assert torch.equal(layer.weight, expected)


def test_merged_column_splits_a_fused_checkpoint_tensor():
    gate, up = torch.randn(10, 8), torch.randn(6, 8)
    layer = MergedColumnParallelLinear(8, [10, 6], False, ctx(1, 2))
    load(layer, "weight", torch.cat([gate, up]))
    assert torch.equal(layer.weight, torch.cat([gate[5:], up[3:]]))


def _qkv(hidden=8, head_dim=2, heads=4, kv_heads=2):
    q = torch.randn(heads * head_dim, hidden)
    k = torch.randn(kv_heads * head_dim, hidden)
    v = torch.randn(kv_heads * head_dim, hidden)
    return q, k, v


@pytest.mark.parametrize("rank", [0, 1])
def test_qkv_splits_q_and_kv_heads(rank):
    q, k, v = _qkv()
    qb, kb, vb = torch.randn(8), torch.randn(4), torch.randn(4)
    layer = QKVParallelLinear(8, 2, 4, 2, True, ctx(rank, 2), prefix="attn.qkv_proj")
    for sid, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
        load(layer, "weight", w, sid)
        load(layer, "bias", b, sid)
    assert (layer.num_heads, layer.num_kv_heads) == (2, 1)
    rows_q, rows_kv = slice(rank * 4, rank * 4 + 4), slice(rank * 2, rank * 2 + 2)
    assert torch.equal(layer.weight, torch.cat([q[rows_q], k[rows_kv], v[rows_kv]]))
    assert torch.equal(layer.bias, torch.cat([qb[rows_q], kb[rows_kv], vb[rows_kv]]))


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_qkv_replicates_kv_heads_when_tp_exceeds_them(rank):
    q, k, v = _qkv()  # 4 q heads, 2 kv heads, head_dim 2, on 4 ranks
    layer = QKVParallelLinear(8, 2, 4, 2, False, ctx(rank, 4))
    for sid, w in (("q", q), ("k", k), ("v", v)):
        load(layer, "weight", w, sid)
    assert (layer.num_heads, layer.num_kv_heads) == (1, 1)
    kv_head = rank * 2 // 4
    rows_kv = slice(kv_head * 2, kv_head * 2 + 2)
    assert torch.equal(layer.weight, torch.cat([q[rank * 2 : rank * 2 + 2], k[rows_kv], v[rows_kv]]))


def test_qkv_loads_a_fused_checkpoint_tensor():
    q, k, v = _qkv()
    layer = QKVParallelLinear(8, 2, 4, 2, False, ctx(1, 2))
    load(layer, "weight", torch.cat([q, k, v]))
    assert torch.equal(layer.weight, torch.cat([q[4:], k[2:], v[2:]]))


def test_qkv_rejects_uneven_head_split():
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        QKVParallelLinear(8, 2, 6, 2, False, ctx(0, 3))


def test_shape_mismatch_names_parameter_and_shapes():
    layer = ColumnParallelLinear(8, 12, False, ctx(0, 2), prefix="model.layers.0.mlp.up")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up\.weight.*\(10, 8\).*\(12, 8\)"):
        load(layer, "weight", torch.randn(10, 8))
    qkv = QKVParallelLinear(8, 2, 4, 2, False, ctx(), prefix="qkv")
    with pytest.raises(ValueError, match=r"qkv\.weight \(shard 'k'\).*\(6, 8\).*\(4, 8\)"):
        load(qkv, "weight", torch.randn(6, 8), "k")


def test_single_rank_forward_matches_f_linear():
    w, b, x = torch.randn(6, 4), torch.randn(6), torch.randn(3, 4)
    layer = ColumnParallelLinear(4, 6, True, ctx())
    load(layer, "weight", w)
    load(layer, "bias", b)
    assert isinstance(layer.linear_method, UnquantizedLinearMethod)
    torch.testing.assert_close(layer(x), F.linear(x, w, b))


def test_quant_config_supplies_the_linear_method():
    seen = []

    class Doubling(UnquantizedLinearMethod):
        def apply(self, layer, x, bias=None):
            return 2 * super().apply(layer, x, bias)

    class OnlyDown(QuantConfig):
        def get_linear_method(self, layer, prefix):
            seen.append(prefix)
            return Doubling() if prefix.endswith("down") else None

    c = LayerContext(quant_config=OnlyDown())
    down, up = RowParallelLinear(4, 4, False, c, prefix="mlp.down"), ColumnParallelLinear(4, 4, False, c, prefix="mlp.up")
    assert seen == ["mlp.down", "mlp.up"]
    assert isinstance(down.linear_method, Doubling) and type(up.linear_method) is UnquantizedLinearMethod
    w, x = torch.randn(4, 4), torch.randn(2, 4)
    load(down, "weight", w)
    torch.testing.assert_close(down(x), 2 * F.linear(x, w))
    assert down.weight.weight_loader.__self__ is down and isinstance(down.linear_method, LinearMethod)
