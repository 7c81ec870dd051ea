"""SqueezeLLM dense checkpoints (written by an independent packer) load and match the dequantized fp32 reference."""

import pytest
import quant_harness as harness  # tests/quant/conftest.py puts this directory on sys.path
import reference_formats as ref
import torch
import torch.nn.functional as F

from framework.layers import LayerContext, QKVParallelLinear, RowParallelLinear
from framework.testing import make_tiny_model
from plugins.quant.squeezellm import SqueezeLLMConfig


def _load(layer, tensors, shard_id=None):
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, tensor, *(() if shard_id is None else (shard_id,)))


@pytest.mark.parametrize("rank, tp", [(0, 1), (0, 2), (1, 2)])
def test_layers_match_lookup_reference(rank, tp):
    gen = torch.Generator().manual_seed(rank + tp)
    hidden, head_dim, heads, kv_heads = 128, 16, 8, 2
    ctx = LayerContext(quant_config=SqueezeLLMConfig(), tp_rank=rank, tp_size=tp)
    ws = [torch.randn(n * head_dim, hidden, generator=gen) for n in (heads, kv_heads, kv_heads)]
    parts = [ref.squeezellm_tensors(w) for w in ws]
    layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads, False, ctx, "qkv_proj")
    for sid, (tensors, _) in zip("qkv", parts):
        _load(layer, tensors, sid)
    rows = [deq.chunk(tp)[rank] for _, deq in parts]
    x = torch.randn(3, hidden, generator=gen)
    torch.testing.assert_close(layer(x), F.linear(x, torch.cat(rows)), rtol=1e-5, atol=1e-4)
    assert (F.linear(x, torch.cat(rows)) - F.linear(x, torch.cat([w.chunk(tp)[rank] for w in ws]))).abs().max() > 1e-3

    tensors, deq = ref.squeezellm_tensors(torch.randn(hidden, 256, generator=gen))
    layer = RowParallelLinear(256, hidden, False, ctx, "o_proj")
    _load(layer, tensors)
    x = torch.randn(3, 256 // tp, generator=gen)
    torch.testing.assert_close(layer(x), F.linear(x, deq.chunk(tp, dim=1)[rank]), rtol=1e-5, atol=1e-4)


def test_engine_matches_dequantized_reference(tmp_path):
    src = make_tiny_model("LlamaForCausalLM", tmp_path / "src", seed=2, **harness.TINY)
    qdir, rdir = ref.quantize_checkpoint(src, tmp_path / "q", tmp_path / "ref", "squeezellm")
    harness.assert_matches_reference(harness.build_engine(qdir), rdir)
    # SqueezeLLM's quant_config.json ({"wbits": 4}) beside a plain config.json
    qdir, rdir = ref.quantize_checkpoint(src, tmp_path / "q2", tmp_path / "ref2", "squeezellm", side_file=True)
    (qdir / "quant_config.json").write_text('{"wbits": 4}')
    harness.assert_matches_reference(harness.build_engine(qdir), rdir, max_tokens=2)


def test_bad_wbits():
    with pytest.raises(ValueError, match=r"squeezellm wbits=3 .*must be one of \[4\]"):
        SqueezeLLMConfig.from_config({"quant_method": "squeezellm", "wbits": 3})
