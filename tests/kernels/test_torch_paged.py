"""Tests of the reference paged-attention backend against dense fp64 attention.

Each sequence has its full Q/K/V drawn up front; a schedule of engine steps
feeds its tokens to the backend (prefill chunks, then decodes, mixed in one
batch with decodes first). Every output row is compared with naive causal
attention over the sequence's contiguous K/V, computed here in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pluggy
import pytest
import torch

from framework import hookspecs
from framework.attention import BatchInputs
from plugins.kernels.torch_paged import TorchPagedAttention

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (name, cached context, new tokens) per sequence and step; decodes (1 new
# token) first. "a" and "b" start with long contexts written straight into
# the cache, as if by earlier steps.
PREWRITTEN = {"a": 72, "b": 33}
SCHEDULE = [
    [("c", 0, 10), ("d", 0, 24)],  # prefills only: fresh prompts
    [("a", 72, 1), ("b", 33, 1), ("c", 10, 15), ("d", 24, 39), ("e", 0, 50)],  # mixed, chunks with a prefix
    [("a", 73, 1), ("b", 34, 1), ("c", 25, 1), ("d", 63, 1), ("e", 50, 1)],  # decodes only
    [("a", 74, 1), ("d", 64, 1), ("f", 0, 17), ("b", 35, 5)],  # decodes, a fresh prompt, a chunk
]


class PagedSequences:
    """Random sequences, their block tables over a shuffled pool, and one layer's cache."""

    def __init__(self, *, block_size, num_heads, num_kv_heads, head_dim, dtype, cache_dtype, device, seed=0):
        gen = torch.Generator().manual_seed(seed)
        lengths: dict[str, int] = {}
        for step in SCHEDULE:
            for name, context, new in step:
                lengths[name] = max(lengths.get(name, 0), context + new)
        self.block_size, self.device, self.dtype, self.cache_dtype = block_size, device, dtype, cache_dtype
        needed = {name: math.ceil(n / block_size) for name, n in lengths.items()}
        num_blocks = 2 * sum(needed.values()) + 3  # spare blocks leave gaps between sequences
        pool = torch.randperm(num_blocks, generator=gen).tolist()  # non-contiguous block ids
        self.blocks = {name: [pool.pop() for _ in range(n)] for name, n in needed.items()}
        self.max_blocks = max(needed.values()) + 2  # block-table width, padded with zeros

        def draw(n, heads):
            return torch.randn(n, heads, head_dim, generator=gen).to(dtype)

        self.q = {name: draw(n, num_heads) for name, n in lengths.items()}
        self.k = {name: draw(n, num_kv_heads) for name, n in lengths.items()}
        self.v = {name: draw(n, num_kv_heads) for name, n in lengths.items()}
        shape = TorchPagedAttention.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
        # NaN everywhere not yet written: reading an unwritten slot unmasked poisons the output.
        self.kv_cache = torch.full(shape, float("nan"), dtype=cache_dtype, device=device)

    def slots(self, name: str, positions: range) -> list[int]:
        bs = self.block_size
        return [self.blocks[name][p // bs] * bs + p % bs for p in positions]

    def prewrite(self, name: str, n: int) -> None:
        slots = torch.tensor(self.slots(name, range(n)), device=self.device)
        self.kv_cache[0].view(-1, *self.k[name].shape[1:])[slots] = self.k[name][:n].to(self.device, self.cache_dtype)
        self.kv_cache[1].view(-1, *self.v[name].shape[1:])[slots] = self.v[name][:n].to(self.device, self.cache_dtype)

    def step_inputs(self, step):
        """q/k/v of the step's new tokens and the BatchInputs describing them."""
        rows = [(name, range(context, context + new)) for name, context, new in step]
        batch = make_batch(
            [(context, new) for _, context, new in step],
            [self.blocks[name] for name, _, _ in step],
            self.slots,
            [name for name, _, _ in step],
            block_size=self.block_size,
            max_blocks=self.max_blocks,
            device=self.device,
        )
        q, k, v = (
            torch.cat([t[name][r.start : r.stop] for name, r in rows]).to(self.device) for t in (self.q, self.k, self.v)
        )
        return q, k, v, batch

    def reference(self, name: str, positions: range, scale: float) -> torch.Tensor:
        """Dense causal attention in float64 over the sequence's contiguous K/V: [len(positions), Hq, D]."""
        q = self.q[name][positions.start : positions.stop].double()
        # K/V as the backend sees them: rounded to the cache dtype.
        k = self.k[name].to(self.cache_dtype).double()
        v = self.v[name].to(self.cache_dtype).double()
        num_heads, num_kv_heads = q.shape[1], k.shape[1]
        kv_head = torch.arange(num_heads) // (num_heads // num_kv_heads)
        out = torch.empty_like(q)
        for i, pos in enumerate(positions):
            keys, values = k[: pos + 1, kv_head], v[: pos + 1, kv_head]  # [pos+1, Hq, D]
            scores = torch.einsum("hd,shd->hs", q[i], keys) * scale
            out[i] = torch.einsum("hs,shd->hd", torch.softmax(scores, dim=-1), values)
        return out


def make_batch(seqs, block_lists, slots_of, names, *, block_size, max_blocks, device) -> BatchInputs:
    """BatchInputs for sequences given as (cached context, new tokens), decodes first."""
    new_counts = [new for _, new in seqs]
    num_decodes = 0
    while num_decodes < len(seqs) and new_counts[num_decodes] == 1:
        num_decodes += 1
    query_start_loc = np.concatenate([[0], np.cumsum(new_counts)]).astype(np.int32)
    seq_lens = np.array([context + new for context, new in seqs], dtype=np.int32)
    block_tables = np.zeros((len(seqs), max_blocks), dtype=np.int32)
    for i, blocks in enumerate(block_lists):
        block_tables[i, : len(blocks)] = blocks
    positions, slots = [], []
    for name, (context, new) in zip(names, seqs):
        positions += list(range(context, context + new))
        slots += slots_of(name, range(context, context + new))
    return BatchInputs(
        query_start_loc_np=query_start_loc,
        seq_lens_np=seq_lens,
        num_decodes=num_decodes,
        max_query_len=int(max(new_counts)),
        max_seq_len=int(seq_lens.max()),
        block_size=block_size,
        query_start_loc=torch.from_numpy(query_start_loc).to(device),
        seq_lens=torch.from_numpy(seq_lens).to(device),
        block_tables=torch.from_numpy(block_tables).to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
    )


TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,cache_dtype",
    [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.bfloat16)],
    ids=["fp32", "fp16", "fp32-bf16cache"],
)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_matches_dense_attention(block_size, head_dim, num_heads, num_kv_heads, dtype, cache_dtype, device):
    seqs = PagedSequences(
        block_size=block_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        cache_dtype=cache_dtype,
        device=device,
    )
    for name, n in PREWRITTEN.items():
        seqs.prewrite(name, n)
    scale = head_dim**-0.5
    backend = TorchPagedAttention(num_heads, head_dim, scale, num_kv_heads)
    tol = TOLERANCE[dtype]

    for step_index, step in enumerate(SCHEDULE):
        q, k, v, batch = seqs.step_inputs(step)
        metadata = TorchPagedAttention.build_metadata(batch)
        out = backend.forward(q, k, v, seqs.kv_cache, metadata)
        assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device

        # The new K/V are in the cache, at slot_mapping, in the cache dtype.
        flat = seqs.kv_cache.view(2, -1, num_kv_heads, head_dim)
        assert torch.equal(flat[0, batch.slot_mapping], k.to(cache_dtype))
        assert torch.equal(flat[1, batch.slot_mapping], v.to(cache_dtype))

        for i, (name, context, new) in enumerate(step):
            start, end = int(batch.query_start_loc_np[i]), int(batch.query_start_loc_np[i + 1])
            expected = seqs.reference(name, range(context, context + new), scale)
            torch.testing.assert_close(
                out[start:end].cpu().double(),
                expected,
                atol=tol,
                rtol=tol,
                msg=lambda m: f"step {step_index}, sequence {name} (context {context}, new {new}): {m}",
            )


def test_decode_ignores_garbage_past_seq_len():
    """Slots past seq_len in a decode's last block may hold anything, even NaN/inf."""
    seqs = PagedSequences(
        block_size=16, num_heads=4, num_kv_heads=2, head_dim=64,
        dtype=torch.float32, cache_dtype=torch.float32, device="cpu",
    )  # fmt: skip
    seqs.kv_cache.fill_(float("inf"))
    seqs.prewrite("a", 72)
    step = [("a", 72, 1)]
    q, k, v, batch = seqs.step_inputs(step)
    metadata = TorchPagedAttention.build_metadata(batch)
    out = TorchPagedAttention(4, 64, 0.125, 2).forward(q, k, v, seqs.kv_cache, metadata)
    torch.testing.assert_close(out.double(), seqs.reference("a", range(72, 73), 0.125), atol=1e-5, rtol=1e-5)


def test_profiling_run_without_cache():
    backend = TorchPagedAttention(num_heads=8, head_dim=64, scale=0.125, num_kv_heads=2)
    q, kv = torch.randn(5, 8, 64, dtype=torch.float16), torch.randn(5, 2, 64, dtype=torch.float16)
    out = backend.forward(q, kv, kv, None, None)
    assert out.shape == q.shape and out.dtype == q.dtype


def test_capabilities():
    cpu = torch.device("cpu")
    for cache_dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        assert TorchPagedAttention.supports(
            device=cpu, dtype=torch.bfloat16, head_dim=128, kv_cache_dtype=cache_dtype, block_size=16
        ) is None
    reason = TorchPagedAttention.supports(
        device=cpu, dtype=torch.bfloat16, head_dim=128, kv_cache_dtype=torch.int8, block_size=16
    )
    assert reason and "torch.int8" in reason and "float8_e4m3fn" in reason
    reason = TorchPagedAttention.supports(
        device=cpu, dtype=torch.float16, head_dim=1024, kv_cache_dtype=torch.float16, block_size=16
    )
    assert reason and "head_dim" in reason
    assert TorchPagedAttention.kv_cache_shape(10, 16, 2, 64) == (2, 10, 16, 2, 64)
    assert TorchPagedAttention.name == "torch" and TorchPagedAttention.priority == 0


def test_plugin_registers_backend_lazily():
    import plugins.kernels

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(plugins.kernels, name="kernels-under-test")
    registered = {}
    pm.hook.register_attention_backends(register=lambda name, target: registered.setdefault(name, target))
    assert registered == {
        "torch": "plugins.kernels.torch_paged:TorchPagedAttention",
        "triton": "plugins.kernels.triton_paged:TritonPagedAttention",
    }
    module_name, _, attr = registered["torch"].partition(":")
    assert getattr(__import__(module_name, fromlist=[attr]), attr) is TorchPagedAttention
