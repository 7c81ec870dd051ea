"""Reference paged attention in pure torch (any device, any float dtype).

Cache layout (one layer)::

    kv_cache[0] = keys, kv_cache[1] = values,
    each [num_blocks, block_size, num_kv_heads, head_dim]; viewed flat as
    [num_blocks * block_size, num_kv_heads, head_dim], token slot
    ``s = block_id * block_size + offset`` is row ``s``.

One step (``forward``):

1. write the new K/V of every token at ``slot_mapping`` (cast to the cache
   dtype; for an fp8 cache, ``x / k_scale`` or ``x / v_scale`` saturated and
   rounded, see ``plugins.quant.fp8_kv``);
2. decodes (the first ``num_decodes`` sequences, one new token each): one
   batched gather of each sequence's blocks through ``block_tables``, keys at
   index >= seq_len masked, softmax in float32 (GQA by grouping query heads);
3. prefills (the remaining sequences; fresh prompts or chunks whose first
   ``seq_len - query_len`` tokens are already cached): a loop over those
   sequences, each gathering its own ``seq_len`` keys and attending with
   ``scaled_dot_product_attention`` under a causal mask offset by the cached
   context.

Reads dequantize an fp8 cache in float32 (``stored * scale``) before use.
It favours clarity over speed: the Triton backend is the fast path on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from framework.attention import AttentionBackend, BatchInputs
from plugins.quant import fp8_kv

_FLOAT_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FP8_CACHE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_MAX_HEAD_DIM = 512


@dataclass
class PrefillSeq:
    """One prefill sequence: host ints and its per-step device tensors."""

    query_start: int  # first row of its new tokens in q/k/v
    query_end: int  # one past its last row
    seq_len: int  # cached context + new tokens
    slots: torch.Tensor  # [seq_len] int64, cache row of each of its tokens, in order
    mask: torch.Tensor  # [query_len, seq_len] bool, True where query i may see key j


@dataclass
class TorchPagedMetadata:
    """Per-step metadata shared by every layer (built once, no host sync)."""

    num_tokens: int
    num_decodes: int
    slot_mapping: torch.Tensor  # [num_tokens] int64
    # decodes: L = (blocks of the longest decode sequence) * block_size
    decode_slots: torch.Tensor | None  # [num_decodes, L] int64 cache rows
    decode_valid: torch.Tensor | None  # [num_decodes, L] bool, key index < seq_len
    prefills: list[PrefillSeq]


def _blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def _slots_of(block_tables: torch.Tensor, num_blocks: int, block_size: int) -> torch.Tensor:
    """Cache rows of the first ``num_blocks`` blocks of each row: [B, num_blocks * block_size]."""
    blocks = block_tables[:, :num_blocks].to(torch.int64)
    offsets = torch.arange(block_size, device=blocks.device, dtype=torch.int64)
    return (blocks[:, :, None] * block_size + offsets).reshape(blocks.shape[0], -1)


class _Dequantized:
    """An fp8 cache seen through byte views: ``cache[rows]`` gives ``float32(stored) * scale``."""

    def __init__(self, cache_bytes: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor):
        self.cache_bytes, self.dtype, self.scale = cache_bytes, dtype, scale

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        return fp8_kv.dequantize(self.cache_bytes[rows].view(self.dtype), self.scale)


class TorchPagedAttention(AttentionBackend):
    """Paged attention written with plain torch ops; the portable fallback."""

    name = "torch"
    priority = 0
    supports_cuda_graphs = False  # decode gathers are sized from host data (seq_lens_np), so no graph replay

    @classmethod
    def supports(
        cls,
        *,
        device: torch.device,
        dtype: torch.dtype,
        head_dim: int,
        kv_cache_dtype: torch.dtype,
        block_size: int,
    ) -> str | None:
        if head_dim > _MAX_HEAD_DIM:
            return f"head_dim {head_dim} > {_MAX_HEAD_DIM} is not supported by the torch backend"
        if kv_cache_dtype not in _FLOAT_CACHE_DTYPES + _FP8_CACHE_DTYPES:
            return (
                f"KV-cache dtype {kv_cache_dtype} is not supported by the torch backend "
                "(float32, float16, bfloat16, float8_e4m3fn, float8_e5m2)"
            )
        return None

    @classmethod
    def kv_cache_shape(cls, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    @classmethod
    def build_metadata(cls, batch: BatchInputs) -> TorchPagedMetadata:
        # Every shape and loop bound comes from the host arrays; the device
        # tensors are only indexed and compared, so nothing waits on the device.
        qsl, seq_lens, bs = batch.query_start_loc_np, batch.seq_lens_np, batch.block_size
        nd, num_seqs = batch.num_decodes, batch.num_seqs
        num_tokens = int(qsl[-1])
        device = batch.block_tables.device

        decode_slots = decode_valid = None
        if nd > 0:
            # Gather only as many blocks as the longest decode sequence needs.
            key_len = _blocks_for(int(seq_lens[:nd].max()), bs) * bs
            decode_slots = _slots_of(batch.block_tables[:nd], key_len // bs, bs)
            key_index = torch.arange(key_len, device=device)
            decode_valid = key_index[None, :] < batch.seq_lens[:nd, None]

        prefills = []
        if num_seqs > nd:
            max_blocks = _blocks_for(int(seq_lens[nd:].max()), bs)
            all_slots = _slots_of(batch.block_tables[nd:], max_blocks, bs)
            for i in range(nd, num_seqs):
                start, end, seq_len = int(qsl[i]), int(qsl[i + 1]), int(seq_lens[i])
                # Query row r has absolute position context + r and sees keys 0..context + r.
                context = seq_len - (end - start)
                rows = torch.arange(end - start, device=device)[:, None] + context
                mask = torch.arange(seq_len, device=device)[None, :] <= rows
                prefills.append(PrefillSeq(start, end, seq_len, all_slots[i - nd, :seq_len], mask))

        return TorchPagedMetadata(
            num_tokens=num_tokens,
            num_decodes=nd,
            slot_mapping=batch.slot_mapping[:num_tokens].to(torch.int64),
            decode_slots=decode_slots,
            decode_valid=decode_valid,
            prefills=prefills,
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor | None,
        metadata: TorchPagedMetadata | None,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if kv_cache is None:  # memory-profiling run: no cache, no metadata
            return torch.empty_like(q)
        n = metadata.num_tokens
        if kv_cache.dtype in _FP8_CACHE_DTYPES:
            return self._forward_fp8(q, k, v, kv_cache, metadata, k_scale, v_scale)
        # Flat views share storage with kv_cache, so writes land in the cache.
        key_cache = kv_cache[0].view(-1, self.num_kv_heads, self.head_dim)
        value_cache = kv_cache[1].view(-1, self.num_kv_heads, self.head_dim)
        key_cache.index_copy_(0, metadata.slot_mapping, k[:n].to(kv_cache.dtype))
        value_cache.index_copy_(0, metadata.slot_mapping, v[:n].to(kv_cache.dtype))
        return self._attend(q, key_cache, value_cache, metadata)

    def _forward_fp8(self, q, k, v, kv_cache, metadata, k_scale, v_scale) -> torch.Tensor:
        """fp8 cache: store ``x / scale`` (saturated), attend over ``stored * scale`` in float32.

        CPU torch has no fp8 ``index_copy_``, so writes and gathers go through
        byte views; attention runs on a float32 view of the dequantized
        gathered rows (``_Dequantized``), never on a float copy of the pool.
        """
        n, dtype = metadata.num_tokens, kv_cache.dtype
        one = torch.ones((), dtype=torch.float32, device=kv_cache.device)
        k_scale = one if k_scale is None else k_scale
        v_scale = one if v_scale is None else v_scale
        key_bytes = kv_cache[0].view(torch.uint8).view(-1, self.num_kv_heads, self.head_dim)
        value_bytes = kv_cache[1].view(torch.uint8).view(-1, self.num_kv_heads, self.head_dim)
        for cache, x, scale in ((key_bytes, k, k_scale), (value_bytes, v, v_scale)):
            cache.index_copy_(0, metadata.slot_mapping, fp8_kv.quantize(x[:n], scale, dtype).view(torch.uint8))
        keys, values = _Dequantized(key_bytes, dtype, k_scale), _Dequantized(value_bytes, dtype, v_scale)
        return self._attend(q, keys, values, metadata)

    def _attend(self, q: torch.Tensor, key_cache, value_cache, metadata: TorchPagedMetadata) -> torch.Tensor:
        n = metadata.num_tokens

        out = torch.empty_like(q)
        if q.shape[0] > n:  # padded rows (e.g. a CUDA-graph bucket): defined, unused
            out[n:].zero_()
        nd = metadata.num_decodes
        if nd > 0:
            out[:nd] = self._decode(q[:nd], key_cache, value_cache, metadata)
        for seq in metadata.prefills:
            out[seq.query_start : seq.query_end] = self._prefill(
                q[seq.query_start : seq.query_end], key_cache, value_cache, seq
            )
        return out

    def _decode(
        self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, md: TorchPagedMetadata
    ) -> torch.Tensor:
        """One query token per sequence, batched: q [B, Hq, D] -> [B, Hq, D]."""
        batch, group = q.shape[0], self.num_heads // self.num_kv_heads
        keys = key_cache[md.decode_slots].float()  # [B, L, Hk, D]
        values = value_cache[md.decode_slots].float()
        # Slots past seq_len (the tail of the last block) hold stale or
        # uninitialised data: zero the values so that a NaN there cannot leak
        # through a zero probability (0 * NaN = NaN); the scores are masked.
        values = values.masked_fill(~md.decode_valid[:, :, None, None], 0.0)
        # GQA: query head h = kv_head * group + g uses kv head h // group.
        qg = q.float().view(batch, self.num_kv_heads, group, self.head_dim)
        scores = torch.einsum("bkgd,blkd->bkgl", qg, keys) * self.scale  # [B, Hk, G, L]
        scores = scores.masked_fill(~md.decode_valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.einsum("bkgl,blkd->bkgd", probs, values)
        return out.reshape(batch, self.num_heads, self.head_dim).to(q.dtype)

    def _prefill(
        self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, seq: PrefillSeq
    ) -> torch.Tensor:
        """One sequence's new tokens: q [Q, Hq, D] over its seq_len cached keys -> [Q, Hq, D]."""
        group = self.num_heads // self.num_kv_heads
        keys = key_cache[seq.slots].to(q.dtype)  # [S, Hk, D]
        values = value_cache[seq.slots].to(q.dtype)
        if group > 1:
            keys = keys.repeat_interleave(group, dim=1)  # [S, Hq, D]
            values = values.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),  # [Hq, Q, D]
            keys.transpose(0, 1),  # [Hq, S, D]
            values.transpose(0, 1),
            attn_mask=seq.mask,  # [Q, S], broadcast over heads
            scale=self.scale,
        )
        return out.transpose(0, 1)
