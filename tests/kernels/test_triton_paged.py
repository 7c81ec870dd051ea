"""The Triton paged-attention backend against the torch reference backend in float64.

Each case runs two engine steps through ``TritonPagedAttention``: a mixed
step (decodes first, then fresh prompts, chunks with a cached prefix and a
one-token chunk) and a decode-only step, on a cache whose unwritten slots are
NaN. The reference is ``TorchPagedAttention`` on a float64 copy of the same
cache. Errors are ``||out - ref|| / ||ref||`` per sequence (float32 far under
1e-4; 16-bit operands within a few 1e-3).

On the CPU the kernels run under ``TRITON_INTERPRET=1`` (see conftest.py) on
a small grid; on a GPU the grid adds bfloat16, long contexts and more shapes
(``benchmarks/check_triton_kernels.py`` runs it there).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from framework.attention import BatchInputs  # noqa: E402
from plugins.kernels import triton_decode, triton_prefill  # noqa: E402
from plugins.kernels.torch_paged import TorchPagedAttention  # noqa: E402
from plugins.kernels.triton_paged import TritonPagedAttention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
fp32, fp16, bf16 = torch.float32, torch.float16, torch.bfloat16
# relative error bounds (||out - ref|| / ||ref||) by activation dtype
BOUND = {fp32: 1e-5, fp16: 2e-3, bf16: 1.5e-2}

# Steps of (cached context, new tokens) per sequence, decodes first. Lengths
# cross page (16/32), key-tile (32/64) and query-tile (64) boundaries; a
# 0-context decode has seq_len 1; the one-token chunk after the prefills is a
# prefill, not a decode.
SHORT = {
    "decodes": [(0, 1), (15, 1), (32, 1), (100, 1), (290, 1)],
    "prefills": [(0, 37), (40, 25), (64, 70), (47, 1), (0, 130)],
}
LONG = {  # GPU only: long contexts and many sequences
    "decodes": [(c, 1) for c in (1, 63, 64, 511, 2047, 4100, 9000)] + [(int(c), 1) for c in np.arange(3, 3000, 97)],
    "prefills": [(0, 1000), (3000, 517), (128, 64), (4095, 1), (0, 2049), (777, 333)],
}

# dtype, cache dtype, Hq, Hk, head_dim, block_size, decode splits (None: the heuristic)
CPU_CASES = [
    (fp32, fp32, 4, 4, 64, 16, 8),
    (fp16, fp16, 8, 2, 64, 32, 3),
    (fp16, fp16, 4, 1, 128, 16, 1),
    (fp32, fp32, 6, 2, 128, 32, None),
    (fp16, fp16, 4, 2, 256, 16, 8),
    (fp32, fp16, 4, 2, 96, 32, 3),
]
GPU_SHAPES = [case[:6] for case in CPU_CASES] + [
    (bf16, bf16, 8, 2, 64, 16),
    (bf16, bf16, 32, 8, 128, 16),
    (bf16, bf16, 8, 1, 256, 32),
    (fp16, fp16, 16, 16, 128, 32),
    (bf16, bf16, 12, 4, 80, 16),
    (fp16, fp32, 8, 2, 128, 16),
    (fp32, bf16, 4, 2, 64, 32),
    (bf16, bf16, 4, 4, 16, 16),
]
GPU_CASES = [shape + (splits,) for shape in GPU_SHAPES for splits in (None, 1, 3, 8)]


def case_id(case):
    dtype, cache_dtype, hq, hk, d, bs, splits = case
    name = {fp32: "fp32", fp16: "fp16", bf16: "bf16"}
    return f"{name[dtype]}-cache{name[cache_dtype]}-h{hq}k{hk}-d{d}-bs{bs}-splits{splits or 'auto'}"


class PagedBatch:
    """Sequences with random Q/K/V, block tables over a shuffled pool, and a NaN-poisoned cache (on ``device``)."""

    def __init__(self, steps, *, num_heads, num_kv_heads, head_dim, block_size, dtype, cache_dtype, device, seed=0):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.steps, self.block_size, self.device = steps, block_size, device
        self.lengths = [max(c + n for c, n in seqs) for seqs in zip(*steps)]
        self.first_query = [c for c, _ in steps[0]]  # queries are drawn from here on
        needed = [math.ceil(n / block_size) for n in self.lengths]
        num_blocks = 2 * sum(needed) + 3
        pool = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        pool.remove(0)
        pool.append(0)  # block 0 goes first, to the first sequence: slot 0 is written
        self.blocks = [[pool.pop() for _ in range(n)] for n in needed]
        self.width = max(needed) + 2

        def draw(n, heads):
            return torch.randn(n, heads, head_dim, generator=gen, device=device).to(dtype)

        self.q = [draw(n - c, num_heads) for n, c in zip(self.lengths, self.first_query)]
        self.k = [draw(n, num_kv_heads) for n in self.lengths]
        self.v = [draw(n, num_kv_heads) for n in self.lengths]
        shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
        self.cache = torch.full(shape, float("nan"), dtype=cache_dtype, device=device)
        for i, context in enumerate(self.first_query):  # contexts of the first step, as if written earlier
            slots = self.slots(i, range(context))
            self.cache[0].flatten(0, 1)[slots] = self.k[i][:context].to(cache_dtype)
            self.cache[1].flatten(0, 1)[slots] = self.v[i][:context].to(cache_dtype)

    def slots(self, i, positions):
        bs = self.block_size
        blocks = torch.tensor(self.blocks[i], dtype=torch.int64)
        p = torch.arange(positions.start, positions.stop, dtype=torch.int64)
        return (blocks[p // bs] * bs + p % bs).to(self.device)

    def step(self, index):
        """(q, k, v, BatchInputs) of step ``index``."""
        device = self.device
        seqs = self.steps[index]
        new = [n for _, n in seqs]
        nd = 0
        while nd < len(seqs) and new[nd] == 1:
            nd += 1
        qsl = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
        seq_lens = np.array([c + n for c, n in seqs], dtype=np.int32)
        tables = np.zeros((len(seqs), self.width), dtype=np.int32)
        for i, blocks in enumerate(self.blocks):
            tables[i, : len(blocks)] = blocks
        positions = [range(c, c + n) for c, n in seqs]
        slots = torch.cat([self.slots(i, p) for i, p in enumerate(positions)])
        first = self.first_query
        q = torch.cat([self.q[i][p.start - first[i] : p.stop - first[i]] for i, p in enumerate(positions)])
        k, v = (torch.cat([t[i][p.start : p.stop] for i, p in enumerate(positions)]) for t in (self.k, self.v))
        batch = BatchInputs(
            query_start_loc_np=qsl,
            seq_lens_np=seq_lens,
            num_decodes=nd,
            max_query_len=int(max(new)),
            max_seq_len=int(seq_lens.max()),
            block_size=self.block_size,
            query_start_loc=torch.from_numpy(qsl).to(device),
            seq_lens=torch.from_numpy(seq_lens).to(device),
            block_tables=torch.from_numpy(tables).to(device),
            slot_mapping=slots,
            positions=torch.cat([torch.arange(p.start, p.stop) for p in positions]).to(device),
        )
        return q, k, v, batch


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def run_steps(batch: PagedBatch, num_heads, num_kv_heads, head_dim):
    """Run every step through both backends; return [(step, seq, relative error)].

    The reference runs on the same device, in float64 (its decodes in float32).
    """
    scale = head_dim**-0.5
    triton_backend = TritonPagedAttention(num_heads, head_dim, scale, num_kv_heads)
    torch_backend = TorchPagedAttention(num_heads, head_dim, scale, num_kv_heads)
    cache = batch.cache
    ref_cache = batch.cache.double()
    errors = []
    for index in range(len(batch.steps)):
        q, k, v, inputs = batch.step(index)
        out = triton_backend.forward(q, k, v, cache, TritonPagedAttention.build_metadata(inputs))
        assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
        # the new K/V are in the cache, exactly, in the cache dtype
        flat = cache.view(2, -1, num_kv_heads, head_dim)
        assert torch.equal(flat[0, inputs.slot_mapping], k.to(cache.dtype))
        assert torch.equal(flat[1, inputs.slot_mapping], v.to(cache.dtype))

        ref = torch_backend.forward(
            q.double(), k.to(cache.dtype).double(), v.to(cache.dtype).double(),
            ref_cache, TorchPagedAttention.build_metadata(inputs),
        )  # fmt: skip
        assert not out.isnan().any(), f"step {index}: NaN in the output"
        qsl = inputs.query_start_loc_np
        for i in range(len(qsl) - 1):
            rows = slice(int(qsl[i]), int(qsl[i + 1]))
            errors.append((index, i, relative_error(out[rows], ref[rows])))
    # nothing else in the cache changed: unwritten slots are still NaN, the rest equal
    written = ~ref_cache.isnan()
    assert torch.equal(cache.isnan(), ref_cache.isnan())
    assert torch.equal(cache[written].double(), ref_cache[written])
    return errors


def assert_within(errors, dtype):
    worst = max(errors, key=lambda e: e[2])
    assert worst[2] < BOUND[dtype], f"step {worst[0]}, sequence {worst[1]}: relative error {worst[2]:.2e}"


def next_step(seqs):
    """Every sequence decodes one more token after ``seqs``."""
    return [(c + n, 1) for c, n in seqs]


@pytest.mark.parametrize("case", GPU_CASES if ON_GPU else CPU_CASES, ids=case_id)
def test_matches_reference(case, monkeypatch):
    dtype, cache_dtype, num_heads, num_kv_heads, head_dim, block_size, num_splits = case
    if num_splits is not None:
        monkeypatch.setattr(triton_decode, "choose_num_splits", lambda *args: num_splits)
    scenarios = [SHORT] + ([LONG] if ON_GPU and num_splits in (None, 3) else [])
    for seed, scenario in enumerate(scenarios):
        first = scenario["decodes"] + scenario["prefills"]
        batch = PagedBatch(
            [first, next_step(first)], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            block_size=block_size, dtype=dtype, cache_dtype=cache_dtype, device=DEVICE, seed=seed,
        )  # fmt: skip
        errors = run_steps(batch, num_heads, num_kv_heads, head_dim)
        assert_within(errors, dtype)


def test_every_row_written_and_padding():
    """Poisoned outputs: every real row is written; seq_len 0 decode rows give zeros; slot -1 is skipped."""
    from plugins.kernels.triton_cache_write import write_kv_cache

    first = [(20, 1), (0, 1), (33, 1)] + [(5, 40)]
    batch = PagedBatch(
        [first], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=fp32, cache_dtype=fp32, device=DEVICE
    )
    q, k, v, inputs = batch.step(0)
    cache = batch.cache
    keys, values = cache[0].flatten(0, 1), cache[1].flatten(0, 1)
    write_kv_cache(k, v, keys, values, inputs.slot_mapping)
    before = cache.clone()
    write_kv_cache(k, v, keys, values, torch.full_like(inputs.slot_mapping, -1))
    assert torch.equal(cache.isnan(), before.isnan()) and torch.equal(cache.nan_to_num(), before.nan_to_num())

    seq_lens = inputs.seq_lens.clone()
    seq_lens[1] = 0  # a padded decode row
    for splits in (1, 4):
        out = torch.full_like(q, float("nan"))
        triton_decode.decode_attention(
            q[:3], keys, values, inputs.block_tables[:3], seq_lens[:3], out[:3], 0.125, 16, splits, block_n=16
        )
        triton_prefill.prefill_attention(
            q, keys, values, inputs.block_tables, inputs.seq_lens, inputs.query_start_loc, out, 0.125, 16,
            first_seq=3, num_prefills=1, num_prefill_tokens=40, config={"BLOCK_M": 16, "BLOCK_N": 16},
        )  # fmt: skip
        assert not out.isnan().any()
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert out[[0, 2]].abs().sum() > 0


@pytest.mark.parametrize(
    "num_seqs,kv_heads,bucket,sms,expected",
    [(1, 8, 32768, 132, 32), (1, 8, 1024, 132, 4), (256, 8, 32768, 132, 1), (4, 8, 4096, 132, 8), (8, 8, 16, 132, 1)],
)
def test_num_splits_heuristic(num_seqs, kv_heads, bucket, sms, expected):
    assert triton_decode.choose_num_splits(num_seqs, kv_heads, bucket, sms) == expected


def test_metadata_is_slices_of_the_batch():
    first = SHORT["decodes"] + SHORT["prefills"]
    batch = PagedBatch(
        [first], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=fp32, cache_dtype=fp32, device="cpu"
    )
    inputs = batch.step(0)[3]
    md = TritonPagedAttention.build_metadata(inputs)
    assert (md.num_decodes, md.num_prefills) == (5, 5)
    assert md.num_tokens == 5 + 37 + 25 + 70 + 1 + 130 and md.num_prefill_tokens == md.num_tokens - 5
    assert md.decode_seq_len_bucket == 512  # longest decode 291
    assert md.block_tables is inputs.block_tables and md.seq_lens is inputs.seq_lens


# fp8 KV cache: dtype, cache dtype, Hq, Hk, head_dim, block_size, decode splits, (k_scale, v_scale).
# Under TRITON_INTERPRET=1 (triton 3.9) fp8 loads convert exactly, but the float32 -> fp8 store rounds
# wrongly whenever rounding carries into the exponent (1.9868 -> 1.0 instead of 2.0, both e4m3 and
# e5m2). So on the CPU the K/V are snapped to the fp8 grid and the scales are powers of two: the write
# kernel's division, saturation and cast are then exact and still checked byte for byte; rounding is
# checked on the GPU (FP8_GPU_CASES, benchmarks/check_fp8_kv.py), with arbitrary values and scales.
e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_CPU_CASES = [
    (fp32, e4m3, 4, 2, 64, 16, 3, (2**-6, 2**-4)),
    (fp16, e5m2, 8, 2, 64, 32, 1, (1.0, 1.0)),
    (fp16, e4m3, 4, 1, 128, 16, None, (0.5, 2**-7)),
]
FP8_GPU_CASES = [(d, c, hq, hk, hd, bs, sp, (0.02, 0.05)) for d, c, hq, hk, hd, bs, sp, _ in FP8_CPU_CASES] + [
    (bf16, cache, 32, 8, 128, bs, splits, scales)
    for cache in (e4m3, e5m2)
    for bs in (16, 32)
    for splits, scales in ((None, (0.01, 0.02)), (3, (1.0, 1.0)), (8, (0.1, 0.005)))
]


def fp8_case_id(case):
    name = {fp32: "fp32", fp16: "fp16", bf16: "bf16", e4m3: "e4m3", e5m2: "e5m2"}
    dtype, cache_dtype, hq, hk, d, bs, splits, scales = case
    return f"{name[dtype]}-cache{name[cache_dtype]}-h{hq}k{hk}-d{d}-bs{bs}-splits{splits or 'auto'}-s{scales}"


@pytest.mark.parametrize("case", FP8_GPU_CASES if ON_GPU else FP8_CPU_CASES, ids=fp8_case_id)
def test_fp8_cache_matches_reference(case, monkeypatch):
    """An fp8 cache: the stored bytes are quantize(x, scale) exactly, and attention over them matches
    the torch reference on the dequantized values (float64) within the activation dtype's bound."""
    num_splits = case[6]
    if num_splits is not None:
        monkeypatch.setattr(triton_decode, "choose_num_splits", lambda *args: num_splits)
    scenarios = [SHORT] + ([LONG] if ON_GPU and num_splits in (None, 3) else [])
    for seed, scenario in enumerate(scenarios):
        assert_within(fp8_errors(case, scenario, seed), case[0])


def fp8_errors(case, scenario, seed=0):
    """Two steps (mixed, then decode-only) through the Triton backend on an fp8 cache: asserts the
    stored bytes, returns [(step, seq, relative error vs the float64 torch reference)]."""
    from plugins.quant.fp8_kv import dequantize, quantize

    dtype, cache_dtype, num_heads, num_kv_heads, head_dim, block_size, _, scales = case
    k_scale, v_scale = (torch.tensor(s, dtype=torch.float32, device=DEVICE) for s in scales)
    first = scenario["decodes"] + scenario["prefills"]
    batch = PagedBatch(
        [first, next_step(first)], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype, cache_dtype=torch.float32, device=DEVICE, seed=seed,
    )  # fmt: skip
    limit = torch.finfo(cache_dtype).max
    for tensors, s in ((batch.k, k_scale), (batch.v, v_scale)):  # stored values ~ N(0, 3^2)
        for t in tensors:
            t.mul_(3.0 * s)
            if not ON_GPU:  # see FP8_CPU_CASES
                t.copy_(dequantize(quantize(t, s, cache_dtype), s, dtype))
            if limit * 1.5 * s.item() < torch.finfo(dtype).max:
                t[0, 0, :2] = torch.tensor([1.5, -1.5], device=DEVICE) * limit * s  # saturated on store
    ref_cache = torch.full_like(batch.cache, float("nan"), dtype=torch.float64)
    # fp8 tensors are filled, indexed and scattered through byte views (not every torch build has fp8 kernels)
    cache = torch.full(batch.cache.shape, float("nan"), device=DEVICE).to(cache_dtype)
    flat = cache.view(torch.uint8).view(2, -1, num_kv_heads, head_dim)
    for i, context in enumerate(batch.first_query):  # the first step's cached contexts
        slots = batch.slots(i, range(context))
        for j, (x, s) in enumerate(((batch.k[i][:context], k_scale), (batch.v[i][:context], v_scale))):
            stored = quantize(x, s, cache_dtype)
            flat[j, slots] = stored.view(torch.uint8)
            ref_cache[j].flatten(0, 1)[slots] = dequantize(stored, s, torch.float64)

    scale = head_dim**-0.5
    triton_backend = TritonPagedAttention(num_heads, head_dim, scale, num_kv_heads)
    torch_backend = TorchPagedAttention(num_heads, head_dim, scale, num_kv_heads)
    errors = []
    for index in range(2):
        q, k, v, inputs = batch.step(index)
        md = TritonPagedAttention.build_metadata(inputs)
        out = triton_backend.forward(q, k, v, cache, md, k_scale=k_scale, v_scale=v_scale)
        qk, qv = quantize(k, k_scale, cache_dtype), quantize(v, v_scale, cache_dtype)
        assert torch.equal(flat[0, inputs.slot_mapping], qk.view(torch.uint8))
        assert torch.equal(flat[1, inputs.slot_mapping], qv.view(torch.uint8))
        ref = torch_backend.forward(
            q.double(), dequantize(qk, k_scale, torch.float64), dequantize(qv, v_scale, torch.float64),
            ref_cache, TorchPagedAttention.build_metadata(inputs),
        )  # fmt: skip
        assert not out.isnan().any(), f"step {index}: NaN in the output"
        qsl = inputs.query_start_loc_np
        for i in range(len(qsl) - 1):
            rows = slice(int(qsl[i]), int(qsl[i + 1]))
            errors.append((index, i, relative_error(out[rows], ref[rows])))
    return errors
