"""Per-step sampling parameters of the sampled rows, as device tensors.

Host work is per sequence (one row each), never per token. Penalty rows need
each sequence's token counts over the vocabulary; ``TokenCounts`` keeps them
on the device between steps, so a decode step only adds the one new token of
each row (a sequence seen for the first time is counted from its full history
once). Without a cache (``counts=None``) they are built from scratch with
``token_counts``: token lists go to the device as one padded array and the
counts come from a ``scatter_add``.
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
    counts: "TokenCounts | None" = None,
) -> SamplingMetadata:
    """One row per sampled sequence, in the order of the logits rows.

    ``num_top`` overrides the number of top logprobs (the runner passes the
    largest of the whole step, so every sampler returns the same width).
    ``counts`` is the runner's persistent ``TokenCounts`` (None: rebuild the
    penalty counts from the token lists).
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
        _add_penalties(md, seqs, special, vocab_size, device, counts)
        _add_sparse_edits(md, seqs, special, eos_token_ids, device)
    processed = [s.group is not None and s.group.uses_processed_logprobs for s in seqs]
    if any(processed):
        md.processed_logprob_rows = dev(processed, torch.bool)
    return md



def _add_penalties(md: SamplingMetadata, seqs, special: list[int], vocab_size: int, device, counts) -> None:
    rows = [i for i in special if seqs[i].params.has_penalties]
    if not rows:
        return
    params = [seqs[i].params for i in rows]
    md.penalty_rows = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    md.presence_penalty = torch.tensor([p.presence_penalty for p in params]).to(device, non_blocking=True)
    md.frequency_penalty = torch.tensor([p.frequency_penalty for p in params]).to(device, non_blocking=True)
    md.repetition_penalty = torch.tensor([p.repetition_penalty for p in params]).to(device, non_blocking=True)
    want_prompt = any(p.repetition_penalty != 1.0 for p in params)
    if counts is not None and counts.vocab_size == vocab_size:
        md.output_token_counts, md.prompt_token_mask = counts.rows([seqs[i] for i in rows], want_prompt)
        return
    md.output_token_counts = token_counts([seqs[i].output_token_ids for i in rows], vocab_size, device)
    if want_prompt:
        md.prompt_token_mask = token_counts([seqs[i].prompt_token_ids for i in rows], vocab_size, device) > 0


class TokenCounts:
    """Each penalised sequence's token counts, kept on the device from step to step.

    Row ``slot`` of ``counts`` (int32 ``[capacity, vocab_size]``) holds the
    occurrences of every token among a sequence's generated tokens, and the
    same row of ``prompt_mask`` (bool) which tokens its prompt contains (made
    only for sequences with a repetition penalty). ``rows`` brings the rows of
    a step's sequences up to date -- adding the tokens generated since the
    sequence was last seen, normally one -- in a single ``index_put_``, and
    returns them gathered in the step's order.

    A sequence is known by its ``seq_id`` and checked by identity and length,
    so a new or rewritten sequence is counted again from its token list.
    Entries unused for ``max_idle_steps`` steps (finished, preempted or
    chunk-prefilling sequences) give their slot back; the table grows by
    doubling, up to the number of sequences live in that window.
    """

    def __init__(self, vocab_size: int, device: torch.device, max_idle_steps: int = 4):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.max_idle_steps = max_idle_steps
        self.counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=self.device)
        self.prompt_mask: torch.Tensor | None = None
        self.entries: dict[int, list] = {}  # seq_id -> [slot, sequence, outputs counted, has prompt row, last step]
        self.free: list[int] = []
        self.step = 0

    @property
    def capacity(self) -> int:
        return self.counts.shape[0]

    def rows(self, seqs: list[Sequence], want_prompt: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.step += 1
        slots = np.empty(len(seqs), dtype=np.int64)
        fresh, fresh_prompt = [], []  # slots to zero; (slot, sequence) whose prompt row to build
        upd_slots, upd_tokens = [], []  # (slot, token) occurrences to add
        for i, seq in enumerate(seqs):
            entry = self.entries.get(seq.seq_id)
            done = seq.num_output_tokens
            if entry is None or entry[1] is not seq or entry[2] > done:
                if entry is not None:
                    self.free.append(entry[0])
                entry = [self._take_slot(), seq, 0, False, 0]
                self.entries[seq.seq_id] = entry
                fresh.append(entry[0])
            slot, _, counted, _, _ = entry
            if done > counted:
                new = seq.token_ids[seq.num_prompt_tokens + counted :]
                upd_slots.extend([slot] * len(new))
                upd_tokens.extend(new)
                entry[2] = done
            if want_prompt and seq.params.repetition_penalty != 1.0 and not entry[3]:
                fresh_prompt.append((slot, seq))
                entry[3] = True
            entry[4] = self.step
            slots[i] = slot
        if fresh:
            self.counts[self._index(fresh)] = 0
        if upd_slots:
            index = self._index(np.array([upd_slots, upd_tokens], dtype=np.int64))
            ones = torch.ones(index.shape[1], dtype=torch.int32, device=self.device)
            self.counts.index_put_((index[0], index[1]), ones, accumulate=True)
        rows = self._index(slots)
        mask = None
        if want_prompt:
            mask = self._prompt_rows(rows, fresh_prompt)
        self._evict_idle()
        return self.counts[rows], mask

    def _prompt_rows(self, rows: torch.Tensor, fresh_prompt: list) -> torch.Tensor:
        if self.prompt_mask is None or self.prompt_mask.shape[0] != self.capacity:
            old = self.prompt_mask
            self.prompt_mask = torch.zeros(self.capacity, self.vocab_size, dtype=torch.bool, device=self.device)
            if old is not None:
                self.prompt_mask[: old.shape[0]] = old
        if fresh_prompt:
            slots = [slot for slot, _ in fresh_prompt]
            self.prompt_mask[self._index(slots)] = False
            pairs = np.array(
                [(slot, t) for slot, seq in fresh_prompt for t in seq.prompt_token_ids], dtype=np.int64
            ).reshape(-1, 2)
            if len(pairs):
                index = self._index(pairs.T.copy())
                self.prompt_mask[index[0], index[1]] = True
        return self.prompt_mask[rows]

    def _take_slot(self) -> int:
        if not self.free:
            old = self.capacity
            new = max(8, 2 * old)
            grown = torch.zeros(new, self.vocab_size, dtype=torch.int32, device=self.device)
            grown[:old] = self.counts
            self.counts = grown
            self.free = list(range(new - 1, old - 1, -1))
        return self.free.pop()

    def _evict_idle(self) -> None:
        oldest = self.step - self.max_idle_steps
        idle = [sid for sid, e in self.entries.items() if e[4] < oldest]
        for sid in idle:
            self.free.append(self.entries.pop(sid)[0])
        if idle and not self.entries:  # nothing penalised is live: give the memory back
            self.counts = self.counts[:0]
            self.prompt_mask = None
            self.free = []

    def _index(self, values) -> torch.Tensor:
        array = np.asarray(values, dtype=np.int64)
        return torch.from_numpy(array).to(self.device, non_blocking=True)


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
