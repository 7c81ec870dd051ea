"""Flattening a scheduled batch into the arrays the model runs on (numpy, host side).

No padding between sequences: the new tokens of every scheduled sequence are
concatenated. Decodes (one new token) are put first so that attention
backends can treat them as one dense batch. The sampled positions are the last
new token of each sequence that catches up with its known tokens this step
(a prefill chunk that stops short of the prompt's end samples nothing).

Logits rows, in this order: the S0 sampled positions, then the prompt
positions of requests that asked for ``prompt_logprobs``. The sampler gets
``sample_rows`` of the first part: row i of the sampler is logits row
``sample_rows[i]``, so a child forked this step reuses its parent's row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from framework.engine.scheduler import ScheduledBatch
from framework.engine.sequence import Sequence
from framework.engine.sequence_group import SequenceGroup


@dataclass
class PromptLogprobRows:
    """Prompt positions whose next-token logprobs a step computes."""

    hidden_rows: np.ndarray  # [R] int64, rows of the hidden states
    targets: np.ndarray  # [R] int64, the next prompt token at each row
    owners: list[tuple[SequenceGroup, int]] = field(default_factory=list)  # (request, its row count), in row order
    num_top: int = 0  # top logprobs per row (largest request)


@dataclass
class PreparedBatch:
    seqs: list[Sequence]  # batch order (decodes first)
    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    block_tables: np.ndarray  # [B, max_blocks] int32
    seq_lens: np.ndarray  # [B] int32, cached + new tokens
    query_start_loc: np.ndarray  # [B + 1] int32
    num_decodes: int
    logits_indices: np.ndarray  # [S0] int64, rows of the hidden states that sample
    sample_seqs: list[Sequence]  # the S sequences that get a token, in sampler-row order
    sample_rows: np.ndarray | None = None  # [S] int64 logits row of each sample seq; None: 0..S-1
    prompt_logprobs: PromptLogprobRows | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.query_start_loc[-1])


def prepare_batch(batch: ScheduledBatch, block_size: int) -> PreparedBatch:
    decodes = [i for i, n in enumerate(batch.num_new_tokens) if n == 1]
    order = decodes + [i for i, n in enumerate(batch.num_new_tokens) if n != 1]
    seqs = [batch.seqs[i] for i in order]
    num_seqs = len(seqs)

    query_lens = np.fromiter((batch.num_new_tokens[i] for i in order), dtype=np.int64, count=num_seqs)
    starts = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=num_seqs)
    totals = np.fromiter((s.num_tokens for s in seqs), dtype=np.int64, count=num_seqs)
    seq_lens = starts + query_lens
    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(query_lens, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])

    if len(decodes) == num_seqs:
        input_ids = np.fromiter((s.token_ids[-1] for s in seqs), dtype=np.int64, count=num_seqs)
    else:
        ids: list[int] = []
        for seq, start, n in zip(seqs, starts.tolist(), query_lens.tolist()):
            ids.extend(seq.token_ids[start : start + n])
        input_ids = np.asarray(ids, dtype=np.int64)

    # positions[t] = start of t's sequence + t's offset among that sequence's new tokens
    seq_of_token = np.repeat(np.arange(num_seqs), query_lens)
    positions = np.arange(num_tokens, dtype=np.int64) + np.repeat(starts - query_start_loc[:-1], query_lens)

    block_tables, slot_mapping = _tables_and_slots(seqs, seq_of_token, positions, block_size)

    samples = seq_lens == totals
    logits_indices = query_start_loc[1:][samples] - 1
    sample_seqs = [s for s, sampled in zip(seqs, samples.tolist()) if sampled]
    sample_rows = _fork_rows(batch, sample_seqs)
    prompt_rows = _prompt_logprob_rows(seqs, starts, query_lens, query_start_loc)
    return PreparedBatch(
        seqs=seqs,
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        block_tables=block_tables,
        seq_lens=seq_lens.astype(np.int32),
        query_start_loc=query_start_loc.astype(np.int32),
        num_decodes=len(decodes),
        logits_indices=logits_indices,
        sample_seqs=sample_seqs,
        sample_rows=sample_rows,
        prompt_logprobs=prompt_rows,
    )


def prepare_continuation(seqs: list[Sequence], block_size: int) -> PreparedBatch:
    """A pure-decode step that follows a step still in flight (async scheduling, ``LLMEngine``).

    Each sequence's last sampled token is not on the host yet: this step
    computes it at position ``num_tokens`` (the in-flight step computes
    ``num_tokens - 1``) and samples the one after. ``input_ids`` are zeros
    here; the runner fills them on the device from the in-flight step's
    sampled tokens. The blocks must hold ``num_tokens + 1`` tokens.
    """
    n = len(seqs)
    positions = np.fromiter((s.num_tokens for s in seqs), dtype=np.int64, count=n)
    rows = np.arange(n)
    block_tables, slot_mapping = _tables_and_slots(seqs, rows, positions, block_size)
    return PreparedBatch(
        seqs=list(seqs),
        input_ids=np.zeros(n, dtype=np.int64),
        positions=positions,
        slot_mapping=slot_mapping,
        block_tables=block_tables,
        seq_lens=(positions + 1).astype(np.int32),
        query_start_loc=np.arange(n + 1, dtype=np.int32),
        num_decodes=n,
        logits_indices=rows.astype(np.int64),
        sample_seqs=list(seqs),
    )


def _tables_and_slots(
    seqs: list[Sequence], seq_of_token: np.ndarray, positions: np.ndarray, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """``[B, W]`` int32 block tables (0-padded to the widest) and each token's int64 KV-cache slot."""
    # Rows padded with 0 as Python lists, then one conversion (about twice as fast as filling row by row).
    width = max(1, max((len(s.block_ids) for s in seqs), default=0))
    pad = [0] * width
    block_tables = np.array([s.block_ids + pad[len(s.block_ids) :] for s in seqs], dtype=np.int32)
    block_tables = block_tables.reshape(len(seqs), width)
    slot_mapping = block_tables[seq_of_token, positions // block_size].astype(np.int64) * block_size
    slot_mapping += positions % block_size
    return block_tables, slot_mapping


def _fork_rows(batch: ScheduledBatch, sample_seqs: list[Sequence]) -> np.ndarray | None:
    """Append the children forked this step to ``sample_seqs``; each samples from its parent's row."""
    if not batch.forks:
        return None
    row_of = {id(s): i for i, s in enumerate(sample_seqs)}
    rows = list(range(len(sample_seqs)))
    for parent, child in batch.forks:
        rows.append(row_of[id(parent)])
        sample_seqs.append(child)
    return np.asarray(rows, dtype=np.int64)


def _prompt_logprob_rows(seqs, starts, query_lens, query_start_loc) -> PromptLogprobRows | None:
    """Rows of prompt positions p whose next token p + 1 still lacks its prompt logprob."""
    hidden_rows: list[np.ndarray] = []
    targets: list[int] = []
    owners: list[tuple[SequenceGroup, int]] = []
    num_top = 0
    for i, seq in enumerate(seqs):
        group = seq.group
        if group is None or not group.needs_prompt_logprobs:
            continue
        # positions p in this step's chunk with len(done) - 1 <= p <= num_prompt - 2
        first = max(int(starts[i]), len(group.prompt_logprobs) - 1)
        last = min(int(starts[i] + query_lens[i]), seq.num_prompt_tokens - 1)
        if last <= first:
            continue
        hidden_rows.append(np.arange(first, last) - starts[i] + query_start_loc[i])
        targets.extend(seq.token_ids[first + 1 : last + 1])
        owners.append((group, last - first))
        num_top = max(num_top, group.params.prompt_logprobs)
    if not owners:
        return None
    return PromptLogprobRows(np.concatenate(hidden_rows), np.asarray(targets, dtype=np.int64), owners, num_top)
