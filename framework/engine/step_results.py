"""A step's results on the host: packed into one tensor on the device, copied once.

Row layout of the packed float64 tensor (``width`` = W)::

    [ token id | logprob | rank (0 = unknown) | W top token ids | W top logprobs ]

Sampled rows come first, then prompt-logprob rows (the next prompt token's
logprob at each prompt position). Missing top entries are padded and
dropped again when unpacking. ``LaunchedStep`` is a step whose packed rows
are still on their way: ``start_copy_to_host`` queues the copy into pinned
memory, and ``unpack`` waits for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from framework.engine.input_batch import PreparedBatch, PromptLogprobRows
from framework.engine.sequence import Sequence
from framework.engine.sequence_group import SequenceGroup

# (token id, logprob, rank or None, [(top token id, logprob)...]) of one prompt position
PromptEntry = tuple[int, float, Optional[int], list[tuple[int, float]]]


@dataclass
class SampledToken:
    """What one sequence got this step (host values)."""

    seq: Sequence
    token_id: int
    logprob: float
    rank: Optional[int] = None
    top: Optional[list[tuple[int, float]]] = None  # (token id, logprob), most likely first


@dataclass
class StepResult:
    samples: list[SampledToken] = field(default_factory=list)
    prompt_logprobs: list[tuple[SequenceGroup, list[PromptEntry]]] = field(default_factory=list)


def pack_rows(
    token_ids: torch.Tensor,
    logprobs: torch.Tensor,
    ranks: torch.Tensor | None,
    top_ids: torch.Tensor | None,
    top_logprobs: torch.Tensor | None,
    width: int,
) -> torch.Tensor:
    """``[R, 3 + 2 * width]`` float64 rows (see the module docstring)."""
    out = torch.zeros(token_ids.shape[0], 3 + 2 * width, dtype=torch.float64, device=token_ids.device)
    out[:, 0] = token_ids
    out[:, 1] = logprobs
    if ranks is not None:
        out[:, 2] = ranks
    if top_ids is not None and width:
        w = min(width, top_ids.shape[1])
        out[:, 3 : 3 + w] = top_ids[:, :w]
        out[:, 3 + width : 3 + width + w] = top_logprobs[:, :w]
    return out


def _unpack_row(row: list[float], width: int, num_top: int) -> tuple[int, float, Optional[int], list]:
    rank = int(row[2]) or None
    ids, lps = row[3 : 3 + num_top], row[3 + width : 3 + width + num_top]
    return int(row[0]), row[1], rank, [(int(i), lp) for i, lp in zip(ids, lps)]


def unpack(
    packed: torch.Tensor,
    width: int,
    sample_seqs: list[Sequence],
    num_top: int,
    prompt: PromptLogprobRows | None,
    ready=None,
) -> StepResult:
    """Split the step's packed results per sequence: ``packed`` on the host once ``ready`` (a CUDA event
    recorded after its copy, or None) has happened, or on the device (then copied here)."""
    if ready is not None:
        ready.synchronize()
    rows = packed.tolist()
    result = StepResult()
    for seq, row in zip(sample_seqs, rows):
        token, logprob, rank, top = _unpack_row(row, width, num_top)
        result.samples.append(SampledToken(seq, token, logprob, rank, top if num_top else None))
    offset = len(sample_seqs)
    for group, count in prompt.owners if prompt is not None else ():
        entries = [_unpack_row(row, width, prompt.num_top) for row in rows[offset : offset + count]]
        result.prompt_logprobs.append((group, entries))
        offset += count
    return result


@dataclass
class LaunchedStep:
    """A step whose device work is queued: its packed results (``step_results``) on the device, their
    host copy (pinned; complete once ``ready`` has happened) and how to unpack them."""

    prepared: PreparedBatch | None
    device: torch.Tensor | None = None
    host: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None  # None: ``host`` is complete already (CPU)
    width: int = 0
    num_top: int = 0


def start_copy_to_host(packed: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying ``packed`` into pinned host memory; returns the copy and an event recorded after it."""
    if packed.device.type != "cuda":
        return packed, None
    host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
    host.copy_(packed, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready
