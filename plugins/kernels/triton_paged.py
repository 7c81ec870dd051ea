"""Paged attention in Triton: the fast path on CUDA GPUs (sm80 and newer).

The cache layout is the torch backend's, ``(2, num_blocks, block_size,
num_kv_heads, head_dim)``, so either backend reads a cache the other wrote.

One step (``forward``), three kinds of launch, all shaped by host ints:

1. ``triton_cache_write``: the new K/V of every token go to ``slot_mapping``
   (one program per token; negative slots are padding and skipped); when the
   layer hands over the rotary embedding (``fuses_rotary``), the same launch
   rotates q and k first;
2. ``triton_decode``: the first ``num_decodes`` sequences (one new token
   each), split-K over the keys when the batch alone does not fill the GPU;
3. ``triton_prefill``: the remaining sequences, packed without padding, each
   with any mix of cached context and new tokens (fresh prompts, chunked
   prefill, prefix hits).

Splits. ``build_metadata`` records the longest decode rounded up to a power
of two (``decode_seq_len_bucket``); ``forward`` picks ``num_splits`` from it,
the decode batch size and the layer's KV heads (``choose_num_splits``). The
kernel derives each split's range from the sequence's own length, so a fixed
``num_splits`` is right for every length: a CUDA graph captured for a batch
size keeps the ``num_splits`` of its bucket (only speed depends on it).

FP8 KV cache: ``forward`` takes the layer's ``k_scale`` / ``v_scale`` (float32
device scalars); the write kernel stores ``saturate(x / scale)`` and the
attention kernels multiply by the scales in float32 (see ``triton_decode``).
float8_e5m2 runs from sm80; float8_e4m3fn needs sm89 (Ada, Hopper), where
Triton has the e4m3 conversions.

This module imports without Triton (``supports`` says why it cannot run);
the kernel modules are imported on first use.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from framework.attention import AttentionBackend, BatchInputs
from framework.ops.split_k import num_sms

if TYPE_CHECKING:
    from framework.layers.rotary import RotaryEmbedding

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_MIN_CAPABILITY = (8, 0)
_E4M3_CAPABILITY = (8, 9)  # Triton's float8e4nv conversions need Ada or newer
_MAX_HEAD_DIM = 256


def _device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device; None for any other device."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@dataclass
class TritonPagedMetadata:
    """Per-step metadata shared by every layer (slices of the batch; no host sync)."""

    num_tokens: int
    num_decodes: int
    num_prefills: int
    num_prefill_tokens: int
    decode_seq_len_bucket: int  # next power of two >= the longest decode's seq_len (0: no decodes)
    block_size: int
    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, W] int32


class TritonPagedAttention(AttentionBackend):
    """Paged prefill and split-K decode attention written in Triton (CUDA)."""

    name = "triton"
    priority = 10
    supports_cuda_graphs = True  # see the module docstring: shapes come from host ints; padding is skipped
    fuses_rotary = True  # the cache-write kernel rotates q and k (triton_cache_write.rotary_write_kv_cache)

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
        if device.type != "cuda":
            return f"needs a CUDA GPU (device is {device.type})"
        if not _triton_available():
            return "triton is not installed (pip install triton)"
        capability = _device_capability(device)
        if capability is None:
            return "no CUDA device is available"
        if capability < _MIN_CAPABILITY:
            return f"needs compute capability >= 8.0 (sm80); the device is sm{capability[0]}{capability[1]}"
        if dtype not in _DTYPES:
            return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
        if kv_cache_dtype not in _DTYPES + _FP8_DTYPES:
            return (
                f"KV-cache dtype {kv_cache_dtype} is not supported "
                "(float16, bfloat16, float32, float8_e4m3fn, float8_e5m2)"
            )
        if kv_cache_dtype == torch.float8_e4m3fn and capability < _E4M3_CAPABILITY:
            return (
                f"an fp8 e4m3 KV cache needs compute capability >= 8.9 (sm89) for Triton's e4m3 conversions; "
                f"the device is sm{capability[0]}{capability[1]} (use kv_cache_dtype='fp8_e5m2')"
            )
        if head_dim % 16 or not 16 <= head_dim <= _MAX_HEAD_DIM:
            return f"head_dim {head_dim} is not supported (a multiple of 16 up to {_MAX_HEAD_DIM})"
        if block_size < 1 or block_size & (block_size - 1):
            return f"block_size {block_size} is not a power of two"
        return None

    @classmethod
    def kv_cache_shape(cls, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    @classmethod
    def build_metadata(cls, batch: BatchInputs) -> TritonPagedMetadata:
        # Sizes come from the host arrays; the device tensors are only sliced.
        nd, num_seqs = batch.num_decodes, batch.num_seqs
        num_tokens = int(batch.query_start_loc_np[-1])
        longest_decode = int(batch.seq_lens_np[:nd].max()) if nd else 0
        return TritonPagedMetadata(
            num_tokens=num_tokens,
            num_decodes=nd,
            num_prefills=num_seqs - nd,
            num_prefill_tokens=num_tokens - int(batch.query_start_loc_np[nd]),
            decode_seq_len_bucket=1 << (longest_decode - 1).bit_length() if longest_decode else 0,
            block_size=batch.block_size,
            slot_mapping=batch.slot_mapping[:num_tokens],
            query_start_loc=batch.query_start_loc,
            seq_lens=batch.seq_lens,
            block_tables=batch.block_tables,
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor | None,
        metadata: TritonPagedMetadata | None,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
        rotary: RotaryEmbedding | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if kv_cache is None:  # memory-profiling run: no cache, no metadata
            return torch.empty_like(q)
        from plugins.kernels import triton_cache_write, triton_decode, triton_prefill

        md = metadata
        n, nd = md.num_tokens, md.num_decodes
        # Flat [slots, Hk, D] views share storage with kv_cache.
        key_cache = kv_cache[0].flatten(0, 1)
        value_cache = kv_cache[1].flatten(0, 1)
        if rotary is not None and triton_cache_write.rotary_supported(q, k, rotary.cos_sin_cache):
            q = triton_cache_write.rotary_write_kv_cache(
                positions[:n], q, k, v, key_cache, value_cache, md.slot_mapping,
                rotary.cos_sin_cache, rotary.rotary_dim, k_scale, v_scale,
            )  # fmt: skip
        else:
            if rotary is not None:  # layouts the fused kernel does not take: rotate, then write
                num_q, num_k = q.shape[:2], k.shape[:2]
                q, k = rotary(positions, q.flatten(1), k.flatten(1))
                q, k = q.view(*num_q, -1), k.view(*num_k, -1)
            triton_cache_write.write_kv_cache(k[:n], v[:n], key_cache, value_cache, md.slot_mapping, k_scale, v_scale)

        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if q.shape[0] > n:  # padded rows (e.g. a CUDA-graph bucket): defined, unused
            out[n:].zero_()
        scale, page = self.scale, md.block_size
        if nd > 0:
            num_splits = triton_decode.choose_num_splits(
                nd, self.num_kv_heads, md.decode_seq_len_bucket, num_sms(q.device)
            )
            triton_decode.decode_attention(
                q[:nd], key_cache, value_cache, md.block_tables[:nd], md.seq_lens[:nd], out[:nd],
                scale, page, num_splits, k_scale=k_scale, v_scale=v_scale,
            )  # fmt: skip
        if md.num_prefills > 0:
            triton_prefill.prefill_attention(
                q, key_cache, value_cache, md.block_tables, md.seq_lens, md.query_start_loc, out,
                scale, page, first_seq=nd, num_prefills=md.num_prefills,
                num_prefill_tokens=md.num_prefill_tokens, k_scale=k_scale, v_scale=v_scale,
            )  # fmt: skip
        return out
