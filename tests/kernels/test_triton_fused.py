"""Fusions of the Triton attention path against their unfused counterparts.

* rotary embedding fused into the KV-cache write
  (``triton_cache_write.rotary_write_kv_cache``): the rotated queries and the
  stored keys/values equal, bit for bit, ``RotaryEmbedding`` (torch code)
  followed by ``write_kv_cache``; the backend gives the same output either
  way;
* split-K decode with the reduction in the same launch (atomic counters):
  matches the two-launch reduction and leaves the counters at zero.

On the CPU the kernels run under ``TRITON_INTERPRET=1`` (conftest.py) with
float32 and float16; on a GPU bfloat16 is added.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from framework import ops
from framework.ops import split_k  # noqa: E402
from framework.layers import get_rope  # noqa: E402
from plugins.kernels import triton_cache_write, triton_decode  # noqa: E402
from plugins.kernels.triton_paged import TritonPagedAttention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
fp32, fp16, bf16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [fp32, fp16] + ([bf16] if DEVICE == "cuda" else [])
e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2


def torch_rotary(rope, positions, q, k):
    """The layer's torch code (the reference every rotary kernel rounds like)."""
    ops.set_enabled(False)
    try:
        return rope(positions, q, k)
    finally:
        ops.set_enabled(True)


def make_case(dtype, num_heads, num_kv_heads, head_dim, partial, rope_type="llama3", seed=0):
    params = {"rope_type": rope_type, "rope_theta": 500000.0, "partial_rotary_factor": partial}
    if rope_type == "llama3":
        params.update(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    rope = get_rope(head_dim, 512, params, dtype=dtype, device=DEVICE)
    gen = torch.Generator().manual_seed(seed)
    positions = torch.tensor([0, 1, 7, 300, 511, 2, 100], device=DEVICE)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = (torch.randn(len(positions), q_size + 2 * kv_size, generator=gen) * 2).to(DEVICE, dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)  # strided views, as the model passes them
    num_slots = 64
    slots = torch.randperm(num_slots, generator=gen)[: len(positions)].to(DEVICE)
    slots[3] = -1  # padding: nothing written
    return rope, positions, qkv, (q, k, v), slots, num_slots


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,partial,rope_type",
    [(4, 2, 64, 1.0, "llama3"), (6, 1, 128, 1.0, "default"), (4, 4, 64, 0.5, "linear"), (3, 3, 96, 0.25, "default")],
)
@pytest.mark.parametrize("cache_dtype", ["same", fp32], ids=["cache-same", "cache-fp32"])
def test_rotary_write_equals_rotate_then_write(dtype, num_heads, num_kv_heads, head_dim, partial, rope_type, cache_dtype):
    cache_dtype = dtype if cache_dtype == "same" else cache_dtype
    if rope_type == "linear":
        rope_type = "default"  # linear needs a factor; the table is all the kernel sees anyway
    rope, positions, qkv, (q, k, v), slots, num_slots = make_case(dtype, num_heads, num_kv_heads, head_dim, partial, rope_type)
    shape = (num_slots, num_kv_heads, head_dim)
    fused_cache = torch.full((2,) + shape, float("nan"), dtype=cache_dtype, device=DEVICE)
    ref_cache = fused_cache.clone()
    before = qkv.clone()

    T = len(positions)
    q_out = triton_cache_write.rotary_write_kv_cache(
        positions, q.view(T, num_heads, head_dim), k.view(T, num_kv_heads, head_dim), v.view(T, num_kv_heads, head_dim),
        fused_cache[0], fused_cache[1], slots, rope.cos_sin_cache, rope.rotary_dim,
    )  # fmt: skip
    assert torch.equal(qkv, before)  # the inputs are left alone

    q_ref, k_ref = torch_rotary(rope, positions, q, k)
    triton_cache_write.write_kv_cache(
        k_ref.view(T, num_kv_heads, head_dim), v.view(T, num_kv_heads, head_dim), ref_cache[0], ref_cache[1], slots
    )
    # Rounded where torch rounds: equal, up to float32 fma contraction on the GPU (none: enable_fp_fusion=False).
    assert q_out.shape == (T, num_heads, head_dim) and q_out.is_contiguous()
    assert torch.equal(q_out.flatten(1), q_ref)
    assert torch.equal(fused_cache.isnan(), ref_cache.isnan())  # slot -1 and unused slots untouched
    assert torch.equal(fused_cache.nan_to_num(), ref_cache.nan_to_num())
    assert not torch.equal(k_ref, k)  # the stored keys are the rotated ones


@pytest.mark.parametrize("cache_dtype", [e4m3, e5m2], ids=["e4m3", "e5m2"])
def test_rotary_write_fp8_equals_rotate_then_write(cache_dtype):
    """An fp8 cache: the stored bytes of the fused kernel equal the unfused kernel's (quantised rotated keys)."""
    dtype = fp16
    rope, positions, qkv, (q, k, v), slots, num_slots = make_case(dtype, 4, 2, 64, 1.0)
    T = len(positions)
    k3, v3 = k.view(T, 2, 64), v.view(T, 2, 64)
    # Both kernels convert the same float32 values (under the interpreter, with its fp8 rounding
    # quirk alike; see test_triton_paged.FP8_CPU_CASES), so the bytes agree exactly.
    k_scale = torch.tensor(0.0371, device=DEVICE)
    v_scale = torch.tensor(0.5, device=DEVICE)
    q_ref, k_ref = torch_rotary(rope, positions, q, k)
    caches = [torch.zeros((2, num_slots, 2, 64), dtype=torch.uint8, device=DEVICE).view(cache_dtype) for _ in range(2)]
    q_out = triton_cache_write.rotary_write_kv_cache(
        positions, q.view(T, 4, 64), k3, v3, caches[0][0], caches[0][1], slots, rope.cos_sin_cache, 64,
        k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
    triton_cache_write.write_kv_cache(
        k_ref.view(T, 2, 64), v3, caches[1][0], caches[1][1], slots, k_scale=k_scale, v_scale=v_scale
    )
    assert torch.equal(q_out.flatten(1), q_ref)
    fused, ref = (c.view(torch.uint8) for c in caches)
    assert torch.equal(fused, ref)
    assert fused[0].any() and fused[1].any()

def test_rotary_write_bad_rotary_dim():
    rope, positions, _, (q, k, v), slots, num_slots = make_case(fp32, 2, 2, 64, 1.0)
    cache = torch.zeros(2, num_slots, 2, 64, device=DEVICE)
    T = len(positions)
    for table, rotary_dim in ((rope.cos_sin_cache[:, :62], 64), (rope.cos_sin_cache, 63)):
        with pytest.raises(ValueError, match=f"rotary_dim={rotary_dim} must be even"):
            triton_cache_write.rotary_write_kv_cache(
                positions, q.view(T, 2, 64), k.view(T, 2, 64), v.view(T, 2, 64), cache[0], cache[1], slots,
                table, rotary_dim,
            )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_fused_rotary_equals_prerotated(dtype, monkeypatch):
    """TritonPagedAttention.forward(..., rotary=, positions=) == forward on rotated q/k, exactly."""
    from tests.kernels.test_triton_paged import SHORT, PagedBatch

    monkeypatch.setattr(triton_decode, "choose_num_splits", lambda *args: 3)
    num_heads, num_kv_heads, head_dim = 4, 2, 64
    rope = get_rope(head_dim, 1024, {"rope_type": "default", "rope_theta": 10000.0}, dtype=dtype, device=DEVICE)
    first = SHORT["decodes"][:3] + SHORT["prefills"][:2]
    batch = PagedBatch(
        [first], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=16,
        dtype=dtype, cache_dtype=dtype, device=DEVICE,
    )  # fmt: skip
    q, k, v, inputs = batch.step(0)
    backend = TritonPagedAttention(num_heads, head_dim, head_dim**-0.5, num_kv_heads)
    assert TritonPagedAttention.fuses_rotary
    md = TritonPagedAttention.build_metadata(inputs)
    T = q.shape[0]
    fused_cache = batch.cache.clone()
    out = backend.forward(q, k, v, fused_cache, md, rotary=rope, positions=inputs.positions)
    q_rot, k_rot = torch_rotary(rope, inputs.positions, q.flatten(1), k.flatten(1))
    ref = backend.forward(q_rot.view(q.shape), k_rot.view(k.shape), v, batch.cache, md)
    assert not out.isnan().any()
    assert torch.equal(out, ref)
    assert torch.equal(fused_cache.nan_to_num(), batch.cache.nan_to_num())
    assert torch.equal(fused_cache.isnan(), batch.cache.isnan())
    assert T == md.num_tokens


@pytest.mark.parametrize("dtype", [fp32, fp16], ids=str)
@pytest.mark.parametrize("num_splits", [2, 5])
def test_decode_fused_reduce_matches_two_launches(dtype, num_splits):
    from tests.kernels.test_triton_paged import PagedBatch

    seqs = [(0, 1), (15, 1), (100, 1), (290, 1)]
    batch = PagedBatch(
        [seqs], num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype, cache_dtype=dtype, device=DEVICE
    )
    q, k, v, inputs = batch.step(0)
    cache = batch.cache
    keys, values = cache[0].flatten(0, 1), cache[1].flatten(0, 1)
    triton_cache_write.write_kv_cache(k, v, keys, values, inputs.slot_mapping)
    seq_lens = inputs.seq_lens.clone()
    seq_lens[1] = 0  # a padded row: zeros
    outs = []
    for fuse in (True, False, True):  # twice fused: the counters were left at zero
        out = torch.full_like(q, float("nan"))
        triton_decode.decode_attention(
            q, keys, values, inputs.block_tables, seq_lens, out, 0.125, 16, num_splits, block_n=16, fuse_reduce=fuse
        )
        outs.append(out)
    counters = split_k.counters_on(q.device)
    assert not counters.any()
    assert not outs[0].isnan().any() and torch.equal(outs[0][1], torch.zeros_like(outs[0][1]))
    assert torch.equal(outs[0], outs[2])
    tol = 1e-6 if dtype == fp32 else 1e-3
    torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)
    # and one split (no reduction at all) agrees within the dtype's rounding
    one = torch.empty_like(q)
    triton_decode.decode_attention(q, keys, values, inputs.block_tables, seq_lens, one, 0.125, 16, 1, block_n=16)
    tol = 1e-5 if dtype == fp32 else 2e-3
    torch.testing.assert_close(outs[0], one, rtol=tol, atol=tol)
