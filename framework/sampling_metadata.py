"""What a sampler receives each step: per-row parameters as device tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingMetadata:
    """Sampling parameters of the N rows of one step's logits.

    Tensors live on the logits' device; the boolean flags are host-side so a
    sampler can skip work without a device sync.
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


@dataclass
class SamplerOutput:
    """Result of one sampling step (all on the device; the runner copies once)."""

    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor  # [N] float32, log_softmax of the raw logits at token_ids
    ranks: torch.Tensor | None = None  # [N] int64, 1 = most likely; when max_num_logprobs > 0
    top_token_ids: torch.Tensor | None = None  # [N, max_num_logprobs] int64
    top_logprobs: torch.Tensor | None = None  # [N, max_num_logprobs] float32
