"""The device-resident penalty counts equal counts rebuilt from scratch, step after step."""

from __future__ import annotations

import random

import torch

from framework.engine.sampling_inputs import TokenCounts, token_counts
from framework.engine.sequence import Sequence
from framework.sampling_params import SamplingParams

VOCAB = 50


def _seq(rng: random.Random, repetition: float = 1.0) -> Sequence:
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))]
    return Sequence("r", prompt, SamplingParams(frequency_penalty=0.5, repetition_penalty=repetition))


def _check(cache: TokenCounts, seqs: list[Sequence], want_prompt: bool) -> None:
    counts, mask = cache.rows(seqs, want_prompt)
    expected = token_counts([s.output_token_ids for s in seqs], VOCAB, torch.device("cpu"))
    assert torch.equal(counts, expected)
    if want_prompt:
        expected_mask = token_counts([s.prompt_token_ids for s in seqs], VOCAB, torch.device("cpu")) > 0
        rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
        assert torch.equal(mask[rows], expected_mask[rows])  # other rows have no repetition penalty to apply
    else:
        assert mask is None


def test_counts_follow_growing_sequences_forks_and_churn():
    rng = random.Random(0)
    cache = TokenCounts(VOCAB, torch.device("cpu"), max_idle_steps=2)
    live = [_seq(rng, repetition=1.3 if i % 2 else 1.0) for i in range(5)]
    for step in range(60):
        # a random subset samples this step (others are chunk-prefilling or preempted)
        batch = [s for s in live if rng.random() < 0.8] or live[:1]
        rng.shuffle(batch)
        _check(cache, batch, want_prompt=any(s.params.repetition_penalty != 1.0 for s in batch))
        for s in batch:
            s.token_ids.extend(rng.randrange(VOCAB) for _ in range(1 if rng.random() < 0.9 else 3))
        if rng.random() < 0.2:  # a request finishes, a new one arrives
            live.pop(rng.randrange(len(live)))
            live.append(_seq(rng, repetition=1.2))
        if rng.random() < 0.1:  # parallel sampling / beam search forks a sequence
            live.append(live[rng.randrange(len(live))].fork())
        if rng.random() < 0.05:  # a sequence whose tokens were rewritten (same id, shorter)
            victim = live[rng.randrange(len(live))]
            del victim.token_ids[victim.num_prompt_tokens :]
    assert cache.capacity <= 32  # slots are reused, not leaked
    assert len(cache.entries) <= len(live) + 8


def test_idle_entries_are_evicted_and_memory_returned():
    rng = random.Random(1)
    cache = TokenCounts(VOCAB, torch.device("cpu"), max_idle_steps=1)
    seqs = [_seq(rng, 1.5) for _ in range(3)]
    _check(cache, seqs, want_prompt=True)
    other = [_seq(rng)]
    for _ in range(3):
        _check(cache, other, want_prompt=False)
    assert set(cache.entries) == {other[0].seq_id}
    assert sorted(cache.free + [cache.entries[other[0].seq_id][0]]) == list(range(cache.capacity))
