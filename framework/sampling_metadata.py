"""What a sampler receives each step: per-row parameters as device tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingMetadata:
    """Sampling parameters of the N rows of one step's logits.

    Tensors live on the logits' device; the boolean flags and sizes are
    host-side so a sampler can skip work without a device sync. Every field
    added after the first release has a default that means "nothing to do",
    so a sampler written against the first version keeps working.

    Logits processing, in this order (vLLM's): ``min_tokens`` bans, then
    ``logit_bias``, then the penalties; temperature and the filters come after.
    """

    temperature: torch.Tensor  # [N] float32; 0 means greedy for that row
    top_k: torch.Tensor  # [N] int64; values >= vocab size mean "off"
    top_p: torch.Tensor  # [N] float32; 1.0 means "off"
    min_p: torch.Tensor  # [N] float32; 0.0 means "off"
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> per-request seed
    all_greedy: bool = False
    all_random: bool = False
    no_top_k: bool = True
    no_top_p: bool = True
    no_min_p: bool = True
    max_num_logprobs: int = 0  # top logprobs to return per row (largest request in the batch)

    # Penalties, for the P rows listed in penalty_rows only (None: no row has any).
    penalty_rows: torch.Tensor | None = None  # [P] int64 rows of the logits
    presence_penalty: torch.Tensor | None = None  # [P] float32
    frequency_penalty: torch.Tensor | None = None  # [P] float32
    repetition_penalty: torch.Tensor | None = None  # [P] float32; 1.0 means "off"
    output_token_counts: torch.Tensor | None = None  # [P, V] int32, occurrences in the generated tokens
    prompt_token_mask: torch.Tensor | None = None  # [P, V] bool, token in the prompt; None: no repetition penalty

    # Sparse per-row edits, as (row, token) index pairs.
    logit_bias_index: torch.Tensor | None = None  # [2, M] int64
    logit_bias_value: torch.Tensor | None = None  # [M] float32, added to the logits
    min_tokens_index: torch.Tensor | None = None  # [2, M] int64, set to -inf (EOS/stop ids before min_tokens)

    # Rows whose returned logprobs (sampled and top) come from the processed
    # logits (after bans, bias and penalties) rather than the raw ones: the
    # rows of strategies that rank by them, such as beam search. None: all raw.
    processed_logprob_rows: torch.Tensor | None = None  # [N] bool

    @property
    def no_logits_processing(self) -> bool:
        return self.penalty_rows is None and self.logit_bias_index is None and self.min_tokens_index is None


@dataclass
class SamplerOutput:
    """Result of one sampling step (all on the device; the runner copies once)."""

    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor  # [N] float32, log_softmax of the raw logits at token_ids (see processed_logprob_rows)
    ranks: torch.Tensor | None = None  # [N] int64, 1 = most likely; when max_num_logprobs > 0
    top_token_ids: torch.Tensor | None = None  # [N, max_num_logprobs] int64
    top_logprobs: torch.Tensor | None = None  # [N, max_num_logprobs] float32
