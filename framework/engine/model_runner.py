"""The model runner: the only place where a step's batch becomes tensors.

It owns the model, the KV cache and the sampler. ``execute`` takes a
``ScheduledBatch``, flattens it (``input_batch.prepare_batch``), runs the
model on the new tokens only, computes logits only at the sampled rows, samples
on the device and copies the results to the host once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from framework.attention import BatchInputs
from framework.config import EngineConfig
from framework.engine.backend_selection import select_attention_backend
from framework.engine.input_batch import PreparedBatch, prepare_batch
from framework.engine.sampling_inputs import build_sampling_metadata
from framework.engine.scheduler import ScheduledBatch
from framework.engine.sequence import Sequence
from framework.forward_context import set_forward_context
from framework.layers.attention import Attention
from framework.layers.context import LayerContext
from framework.model_config import ModelConfig
from framework.model_loader import init_dummy_weights, load_weights
from framework.registry import Registries

logger = logging.getLogger(__name__)


@dataclass
class SampledToken:
    """What one sequence got this step (host values)."""

    seq: Sequence
    token_id: int
    logprob: float
    rank: Optional[int] = None
    top: Optional[list[tuple[int, float]]] = None  # (token id, logprob), most likely first


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        registries: Registries,
        device: torch.device,
        quant_config=None,
    ):
        self.config = config
        self.model_config = model_config
        self.device = device
        self.block_size = model_config.block_size
        self.backend = select_attention_backend(registries, device, model_config, config.attention_backend)
        ctx = LayerContext(
            dtype=model_config.dtype, device=device, attention_backend=self.backend, quant_config=quant_config
        )
        model_cls = registries.models.get(model_config.architecture)
        with torch.device(device):
            self.model = model_cls(model_config.hf_config, ctx)
        if config.load_format == "dummy":
            init_dummy_weights(self.model, seed=config.seed)
        else:
            load_weights(self.model, model_config.path)
        self.model.eval()
        self.sampler = registries.samplers.get("standard")()
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.kv_cache: torch.Tensor | None = None
        logger.info("model %s loaded on %s; attention backend %r", model_config.architecture, device, self.backend.name)

    # -- KV cache ------------------------------------------------------------

    def kv_block_bytes(self) -> int:
        mc = self.model_config
        per_layer = self.backend.kv_cache_shape(1, self.block_size, mc.num_kv_heads, mc.head_dim)
        elem = torch.empty((), dtype=mc.kv_torch_dtype).element_size()
        return len(self.attn_layers) * int(np.prod(per_layer)) * elem

    def init_kv_cache(self, num_blocks: int) -> None:
        mc = self.model_config
        shape = self.backend.kv_cache_shape(num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)
        self.kv_cache = torch.zeros((len(self.attn_layers), *shape), dtype=mc.kv_torch_dtype, device=self.device)
        for layer, cache in zip(self.attn_layers, self.kv_cache):
            layer.kv_cache = cache

    @torch.inference_mode()
    def profile_peak_memory(self, num_tokens: int, num_seqs: int) -> int:
        """Peak device bytes of a forward over ``num_tokens`` tokens (no KV cache) and sampling."""
        torch.cuda.reset_peak_memory_stats(self.device)
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(num_tokens, device=self.device) % self.model_config.max_model_len
        with set_forward_context(None):
            hidden = self.model(input_ids, positions)
            rows = torch.linspace(0, num_tokens - 1, num_seqs, device=self.device).long()
            logits = self.model.compute_logits(hidden[rows])
            torch.softmax(logits, dim=-1)
        torch.cuda.synchronize(self.device)
        del hidden, logits
        return torch.cuda.max_memory_allocated(self.device)

    # -- one step ------------------------------------------------------------

    def _batch_inputs(self, prepared: PreparedBatch) -> BatchInputs:
        def dev(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(self.device, non_blocking=True)

        return BatchInputs(
            query_start_loc_np=prepared.query_start_loc,
            seq_lens_np=prepared.seq_lens,
            num_decodes=prepared.num_decodes,
            max_query_len=int(np.diff(prepared.query_start_loc).max()),
            max_seq_len=int(prepared.seq_lens.max()),
            block_size=self.block_size,
            query_start_loc=dev(prepared.query_start_loc),
            seq_lens=dev(prepared.seq_lens),
            block_tables=dev(prepared.block_tables),
            slot_mapping=dev(prepared.slot_mapping),
            positions=dev(prepared.positions),
        )

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[SampledToken]:
        prepared = prepare_batch(batch, self.block_size)
        inputs = self._batch_inputs(prepared)
        metadata = self.backend.build_metadata(inputs)
        input_ids = torch.from_numpy(prepared.input_ids).to(self.device, non_blocking=True)
        with set_forward_context(metadata):
            hidden = self.model(input_ids, inputs.positions)
        if not prepared.sample_seqs:
            return []
        rows = torch.from_numpy(prepared.logits_indices).to(self.device, non_blocking=True)
        logits = self.model.compute_logits(hidden[rows])
        sampling = build_sampling_metadata(prepared.sample_seqs, logits.shape[-1], self.device)
        out = self.sampler(logits, sampling)
        return _to_host(prepared.sample_seqs, out, sampling.max_num_logprobs)


def _to_host(seqs: list[Sequence], out, num_top: int) -> list[SampledToken]:
    """Pack every result into one float64 tensor and copy it to the host once."""
    columns = [out.token_ids.double()[:, None], out.logprobs.double()[:, None]]
    if num_top:
        columns += [out.ranks.double()[:, None], out.top_token_ids.double(), out.top_logprobs.double()]
    rows = torch.cat(columns, dim=1).tolist()
    results = []
    for seq, row in zip(seqs, rows):
        sample = SampledToken(seq, int(row[0]), row[1])
        if num_top:
            sample.rank = int(row[2])
            ids, lps = row[3 : 3 + num_top], row[3 + num_top :]
            sample.top = [(int(i), lp) for i, lp in zip(ids, lps)]
        results.append(sample)
    return results
