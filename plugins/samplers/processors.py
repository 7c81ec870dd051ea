"""Logits processing before sampling: ``min_tokens`` bans, ``logit_bias``, penalties.

Vectorised over the batch on the logits' device (vLLM's order and formulas):

1. ``min_tokens``: EOS and ``stop_token_ids`` get ``-inf`` in rows that have
   generated fewer than ``min_tokens`` tokens (transformers'
   ``MinNewTokensLengthLogitsProcessor``);
2. ``logit_bias``: a sparse add of ``(row, token) -> bias`` (transformers'
   ``SequenceBiasLogitsProcessor`` with one-token sequences);
3. penalties, only on the rows that have any:
   * repetition (over prompt + generated tokens, as vLLM and transformers'
     ``RepetitionPenaltyLogitsProcessor``): a seen token's logit is divided
     by the penalty when positive, multiplied when not;
   * frequency and presence (over generated tokens, as OpenAI/vLLM):
     ``logit -= frequency * count + presence * (count > 0)``.

On a GPU the penalties are one Triton pass (``triton_penalties``, equal to
``apply_penalties`` bit for bit); when every row has penalties and there is
no sparse edit it also makes the copy, so the logits are read once.
"""

from __future__ import annotations

import torch

from framework.sampling_metadata import SamplingMetadata


def apply_logits_processors(logits: torch.Tensor, md: SamplingMetadata, use_triton: bool = False) -> torch.Tensor:
    """The processed logits ``[N, V]``: ``logits`` itself when nothing applies, else a new tensor.

    ``use_triton``: penalties by the Triton kernel (float32 logits with unit stride).
    """
    if md.no_logits_processing:
        return logits
    sparse = md.min_tokens_index is not None or md.logit_bias_index is not None
    if use_triton and not sparse and md.penalty_rows is not None and md.penalty_rows.shape[0] == logits.shape[0]:
        # Every row is a (distinct) penalty row: the kernel writes each one, no copy first.
        x = torch.empty_like(logits)
        _triton_penalties().apply_penalties(logits, x, md)
        return x
    x = logits.clone()
    if md.min_tokens_index is not None:
        rows, tokens = md.min_tokens_index
        x[rows, tokens] = float("-inf")
    if md.logit_bias_index is not None:
        rows, tokens = md.logit_bias_index
        x.index_put_((rows, tokens), md.logit_bias_value, accumulate=True)
    if md.penalty_rows is not None:
        if use_triton:
            _triton_penalties().apply_penalties(x, x, md)
        else:
            x[md.penalty_rows] = apply_penalties(x[md.penalty_rows], md)
    return x


def apply_penalties(x: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Penalised ``[P, V]`` logits of the penalty rows (see the module docstring)."""
    counts = md.output_token_counts.to(x.dtype)
    generated = counts > 0
    if md.prompt_token_mask is not None:
        seen = generated | md.prompt_token_mask
        penalty = md.repetition_penalty.unsqueeze(1)
        x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
    x = x - md.frequency_penalty.unsqueeze(1) * counts
    return x - md.presence_penalty.unsqueeze(1) * generated.to(x.dtype)


def _triton_penalties():
    """The kernel module, imported on first use (the CPU path never loads Triton)."""
    from plugins.samplers import triton_penalties

    return triton_penalties
