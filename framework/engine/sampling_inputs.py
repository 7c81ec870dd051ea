"""Per-step sampling parameters of the sampled rows, as device tensors.

Host work is per sequence (one row each), never per token: token lists go
to the device as one padded array, and the per-row token counts are built
there with a ``scatter_add``.
"""

from __future__ import annotations

import numpy as np
import torch

from framework.engine.sequence import Sequence
from framework.sampling_metadata import SamplingMetadata


def build_sampling_metadata(
    seqs: list[Sequence],
    vocab_size: int,
    device: torch.device,
    eos_token_ids: frozenset[int] = frozenset(),
    num_top: int | None = None,
) -> SamplingMetadata:
    """One row per sampled sequence, in the order of the logits rows.

    ``num_top`` overrides the number of top logprobs (the runner passes the
    largest of the whole step, so every sampler returns the same width).
    """
    params = [s.params for s in seqs]
    top_k = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]  # k >= V is "off"
    greedy = [p.greedy for p in params]
    if num_top is None:
        num_top = max((s.group.num_top_logprobs if s.group else s.params.logprobs or 0 for s in seqs), default=0)

    def dev(values, dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    md = SamplingMetadata(
        temperature=dev([p.temperature for p in params], torch.float32),
        top_k=dev(top_k, torch.int64),
        top_p=dev([p.top_p for p in params], torch.float32),
        min_p=dev([p.min_p for p in params], torch.float32),
        generators={row: s.generator for row, s in enumerate(seqs) if s.generator is not None},
        all_greedy=all(greedy),
        all_random=not any(greedy),
        no_top_k=all(k >= vocab_size for k in top_k),
        no_top_p=all(p.top_p >= 1.0 for p in params),
        no_min_p=all(p.min_p <= 0.0 for p in params),
        max_num_logprobs=min(num_top, vocab_size),
    )
    # Rows with any logits processing, found in one pass (usually none).
    special = [i for i, p in enumerate(params) if p.processes_logits]
    if special:
        _add_penalties(md, seqs, special, vocab_size, device)
        _add_sparse_edits(md, seqs, special, eos_token_ids, device)
    processed = [s.group is not None and s.group.uses_processed_logprobs for s in seqs]
    if any(processed):
        md.processed_logprob_rows = dev(processed, torch.bool)
    return md



def _add_penalties(md: SamplingMetadata, seqs: list[Sequence], special: list[int], vocab_size: int, device) -> None:
    rows = [i for i in special if seqs[i].params.has_penalties]
    if not rows:
        return
    params = [seqs[i].params for i in rows]
    md.penalty_rows = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    md.presence_penalty = torch.tensor([p.presence_penalty for p in params]).to(device, non_blocking=True)
    md.frequency_penalty = torch.tensor([p.frequency_penalty for p in params]).to(device, non_blocking=True)
    md.repetition_penalty = torch.tensor([p.repetition_penalty for p in params]).to(device, non_blocking=True)
    md.output_token_counts = token_counts([seqs[i].output_token_ids for i in rows], vocab_size, device)
    if any(p.repetition_penalty != 1.0 for p in params):
        md.prompt_token_mask = token_counts([seqs[i].prompt_token_ids for i in rows], vocab_size, device) > 0


def token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """``[len(token_lists), vocab_size]`` int32 occurrence counts, built on the device.

    The lists are padded with ``vocab_size`` (a spare column, dropped after
    the ``scatter_add``) into one array, so there is one transfer and no loop
    over tokens.
    """
    width = max(1, max(len(t) for t in token_lists))
    padded = np.full((len(token_lists), width), vocab_size, dtype=np.int64)
    for row, tokens in zip(padded, token_lists):
        row[: len(tokens)] = tokens
    index = torch.from_numpy(padded).to(device, non_blocking=True)
    counts = torch.zeros(len(token_lists), vocab_size + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.int32))
    return counts[:, :vocab_size]


def _add_sparse_edits(md: SamplingMetadata, seqs: list[Sequence], special: list[int], eos_ids, device) -> None:
    """``logit_bias`` entries and ``min_tokens`` bans as (row, token) index lists (loops over sequences)."""
    bias_rows, bias_ids, bias_values, ban_rows, ban_ids = [], [], [], [], []
    for row in special:
        seq = seqs[row]
        params = seq.params
        if params.logit_bias:
            bias_rows.extend([row] * len(params.logit_bias))
            bias_ids.extend(params.logit_bias)
            bias_values.extend(params.logit_bias.values())
        if seq.num_output_tokens < params.min_tokens:
            banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
            ban_rows.extend([row] * len(banned))
            ban_ids.extend(banned)
    if bias_rows:
        md.logit_bias_index = torch.tensor([bias_rows, bias_ids], dtype=torch.int64).to(device, non_blocking=True)
        md.logit_bias_value = torch.tensor(bias_values, dtype=torch.float32).to(device, non_blocking=True)
    if ban_rows:
        md.min_tokens_index = torch.tensor([ban_rows, ban_ids], dtype=torch.int64).to(device, non_blocking=True)
