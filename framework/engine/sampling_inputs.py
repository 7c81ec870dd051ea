"""Per-step sampling parameters of the sampled rows, as device tensors."""

from __future__ import annotations

import torch

from framework.engine.sequence import Sequence
from framework.sampling_metadata import SamplingMetadata


def build_sampling_metadata(seqs: list[Sequence], vocab_size: int, device: torch.device) -> SamplingMetadata:
    """One row per sampled sequence, in the order of the logits rows."""
    params = [s.params for s in seqs]
    temperature = [p.temperature for p in params]
    top_k = [p.top_k if p.top_k > 0 else vocab_size for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    greedy = [p.greedy for p in params]
    generators = {row: s.generator for row, s in enumerate(seqs) if s.generator is not None}
    max_logprobs = max((p.logprobs or 0 for p in params), default=0)
    return SamplingMetadata(
        temperature=torch.tensor(temperature, dtype=torch.float32).to(device, non_blocking=True),
        top_k=torch.tensor(top_k, dtype=torch.int64).to(device, non_blocking=True),
        top_p=torch.tensor(top_p, dtype=torch.float32).to(device, non_blocking=True),
        min_p=torch.tensor(min_p, dtype=torch.float32).to(device, non_blocking=True),
        generators=generators,
        all_greedy=all(greedy),
        all_random=not any(greedy),
        no_top_k=all(k >= vocab_size for k in top_k),
        no_top_p=all(p >= 1.0 for p in top_p),
        no_min_p=all(p <= 0.0 for p in min_p),
        max_num_logprobs=max_logprobs,
    )
