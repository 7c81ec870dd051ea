"""The attention-backend plugin interface.

A backend owns the layout of the paged KV cache and the attention kernel that
reads it. The model runner describes each step's flattened batch once
(``BatchInputs``); the backend turns that into its own metadata once per step
(``build_metadata``), and every ``framework.layers.Attention`` layer then calls
``forward`` with that metadata, which it finds in the forward context.

Layout of one step (no padding between sequences)::

    tokens:      | seq0 new tokens | seq1 new tokens | ... |    (num_tokens)
    query_start_loc[i] .. query_start_loc[i+1]  = the new tokens of sequence i
    seq_lens[i]  = tokens of sequence i in the cache after this step
                   (cached context + new tokens)
    positions[t] = absolute position of token t in its sequence
    slot_mapping[t] = block_tables[i, positions[t] // block_size] * block_size
                      + positions[t] % block_size      (where token t's K/V go)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch


@dataclass
class BatchInputs:
    """One step's flattened batch, built by the model runner.

    Host arrays (numpy, known without a device sync) and their device copies.
    Sequences with a single new token (decodes) come first in the batch, so
    ``num_decodes`` splits it into a decode part and a prefill part.
    """

    # host side
    query_start_loc_np: np.ndarray  # [B + 1] int32, cumulative new-token counts
    seq_lens_np: np.ndarray  # [B] int32, cached + new tokens per sequence
    num_decodes: int  # sequences 0..num_decodes-1 have exactly one new token
    max_query_len: int
    max_seq_len: int
    block_size: int
    # device side
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32; unused entries are 0
    slot_mapping: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_np)

    @property
    def num_tokens(self) -> int:
        return int(self.query_start_loc_np[-1])


class AttentionBackend:
    """Base class of attention backends (registered via ``register_attention_backends``).

    Class-level capabilities (``name``, ``priority``, ``supports``,
    ``kv_cache_shape``, ``build_metadata``) are read without instantiating;
    one instance is made per attention layer.
    """

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0  # higher wins when several support a device
    # True when a pure-decode step can be captured in a CUDA graph and replayed
    # on other data of the same batch size: ``build_metadata`` only slices the
    # device tensors of ``BatchInputs`` and ``forward`` launches work shaped by
    # its host sizes alone (no host reads of device data, no shapes taken from
    # the host arrays' contents other than ``max_seq_len`` as an upper bound).
    # Padded rows (``slot_mapping`` -1, ``seq_lens`` 0) must be skipped.
    supports_cuda_graphs: ClassVar[bool] = False
    # True when ``forward`` accepts the keywords ``rotary`` (the model's
    # ``framework.layers.RotaryEmbedding``) and ``positions`` ([num_tokens]
    # int64): ``framework.layers.Attention`` then hands q and k un-rotated and
    # the backend applies ``rotary(positions, q, k)`` itself (e.g. fused into
    # its KV-cache write), with results equal to the layer's own rotation.
    # Backends without it are never passed the keywords.
    fuses_rotary: ClassVar[bool] = False

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
        """Return ``None`` if this backend can run the configuration, else the reason.

        ``kv_cache_dtype`` may be an fp8 dtype (``kv_cache_dtype="fp8"``...):
        accept it only if ``forward`` honours ``k_scale`` / ``v_scale``.
        """
        return None

    @classmethod
    def kv_cache_shape(cls, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """Shape of one layer's KV cache (the runner allocates one per layer)."""
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    @classmethod
    def build_metadata(cls, batch: BatchInputs) -> Any:
        """Per-step metadata shared by all layers. Default: the batch itself."""
        return batch

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor | None,  # kv_cache_shape(...); None while profiling memory
        metadata: Any,
        k_scale: torch.Tensor | None = None,  # [] float32 on the device; fp8 caches only
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Write the new K/V at ``slot_mapping`` and attend causally over each sequence's cache.

        Contract: every new K/V of the step is written before any token
        attends. Prefix caching relies on it: requests admitted in the same
        step may read blocks that another request of the step is filling.

        FP8 KV cache: when ``kv_cache`` is float8_e4m3fn or float8_e5m2 (only
        if ``supports`` accepted that dtype), ``framework.layers.Attention``
        passes its per-layer scales as the keywords ``k_scale`` and
        ``v_scale``; the backend stores ``saturate(k / k_scale)`` (values
        alike) and reads ``stored * k_scale``, in float32. The scales are
        device tensors whose values may change between steps (read them in
        the kernels, never as host floats, so CUDA graphs stay valid). A
        backend that does not support fp8 is never called with them, so an
        implementation written before these keywords keeps working.
        """
        raise NotImplementedError
