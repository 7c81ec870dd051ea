"""The driver's messages to the workers: an int64 header, then an int64 payload.

No pickle: every message is two CPU tensors broadcast over the gloo message
group (``ParallelState.broadcast``). The header has ``HEADER_SIZE`` slots::

    [op, a1, a2, ...]              unused slots are 0

    op          arguments                                   payload
    STEP        T, B, W, num_decodes, S0, S, R, C, SO, SI   yes (below)
    BLOCK_BYTES -                                           -   then reduce_int(max)
    PROFILE     num_tokens, num_seqs                        -   then reduce_int(min)
    INIT_KV     num_blocks                                  -
    SHUTDOWN    -                                           -

A step's payload is the flattened batch the driver made with
``prepare_batch`` (T tokens, B sequences, block tables W wide, S0 sampled
rows, S sampled sequences, R prompt-logprob rows (-1: no prompt logprobs),
C block copies, SO swap-outs, SI swap-ins; B = 0: the step only moves blocks)::

    input_ids[T] | positions[T] | slot_mapping[T] | logits_indices[S0] | prompt rows[R]
    | seq_lens[B] | query_start_loc[B + 1] | block_tables[B * W]
    | copies[2C] | swap_out[2SO] | swap_in[2SI]       (src, dst) pairs

A worker rebuilds a ``PreparedBatch`` from it whose ``seqs`` and
``sample_seqs`` are placeholders (None): a worker runs the forward and its
collectives, never the sampler, so it only needs their counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from framework.engine.input_batch import PreparedBatch, PromptLogprobRows

HEADER_SIZE = 12
STEP, BLOCK_BYTES, PROFILE, INIT_KV, SHUTDOWN = 1, 2, 3, 4, 5


def control(op: int, *args: int) -> np.ndarray:
    """A header without payload."""
    header = np.zeros(HEADER_SIZE, dtype=np.int64)
    header[0] = op
    header[1 : 1 + len(args)] = args
    return header


Pairs = list[tuple[int, int]]


@dataclass
class StepMessage:
    """What a worker needs of one step."""

    prepared: PreparedBatch | None  # None: no forward this step
    copies: Pairs
    swap_out: Pairs
    swap_in: Pairs


def _pairs(pairs: Pairs) -> np.ndarray:
    return np.asarray(pairs, dtype=np.int64).reshape(-1)


def encode_step(prepared: PreparedBatch | None, copies: Pairs, swap_out: Pairs, swap_in: Pairs):
    """(header, payload) of one step."""
    moves = [_pairs(copies), _pairs(swap_out), _pairs(swap_in)]
    counts = [len(copies), len(swap_out), len(swap_in)]
    if prepared is None:
        return control(STEP, 0, 0, 0, 0, 0, 0, -1, *counts), np.concatenate(moves)
    prompt = prepared.prompt_logprobs
    prompt_rows = prompt.hidden_rows if prompt is not None else np.zeros(0, dtype=np.int64)
    tables = prepared.block_tables
    num_seqs, width = tables.shape
    header = control(
        STEP,
        prepared.num_tokens,
        num_seqs,
        width,
        prepared.num_decodes,
        len(prepared.logits_indices),
        len(prepared.sample_seqs),
        len(prompt_rows) if prompt is not None else -1,  # -1: no prompt logprobs this step
        *counts,
    )
    parts = [
        prepared.input_ids,
        prepared.positions,
        prepared.slot_mapping,
        prepared.logits_indices,
        prompt_rows,
        prepared.seq_lens,
        prepared.query_start_loc,
        tables.reshape(-1),
        *moves,
    ]
    return header, np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])


def _sizes(header: np.ndarray) -> list[int]:
    t, b, w, _, s0, _, r, c, so, si = (int(x) for x in header[1:11])
    return [t, t, t, s0, max(r, 0), b, b + 1 if b else 0, b * w, 2 * c, 2 * so, 2 * si]


def step_payload_size(header: np.ndarray) -> int:
    return sum(_sizes(header))


def decode_step(header: np.ndarray, payload: np.ndarray) -> StepMessage:
    """The worker's view of one step: a ``PreparedBatch`` with placeholder sequences, and the block moves."""
    _, b, w, num_decodes, _, s, r = (int(x) for x in header[1:8])
    parts = np.split(payload, np.cumsum(_sizes(header))[:-1])
    (
        input_ids,
        positions,
        slots,
        logits_indices,
        prompt_rows,
        seq_lens,
        qsl,
        tables,
        copies,
        out,
        into,
    ) = parts
    moves = [[(int(a), int(z)) for a, z in m.reshape(-1, 2).tolist()] for m in (copies, out, into)]
    if b == 0:
        return StepMessage(None, *moves)
    prompt = None
    if r >= 0:
        prompt = PromptLogprobRows(hidden_rows=prompt_rows, targets=np.zeros(0, dtype=np.int64))
    prepared = PreparedBatch(
        seqs=[None] * b,
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slots,
        block_tables=tables.astype(np.int32).reshape(b, w),
        seq_lens=seq_lens.astype(np.int32),
        query_start_loc=qsl.astype(np.int32),
        num_decodes=num_decodes,
        logits_indices=logits_indices,
        sample_seqs=[None] * s,
        prompt_logprobs=prompt,
    )
    return StepMessage(prepared, *moves)
