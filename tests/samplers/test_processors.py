"""Penalties, logit_bias and min_tokens against transformers' logits processors.

The per-row tensors come from ``build_sampling_metadata`` on real sequences,
so the host-side builder (token counts by scatter_add, sparse edits) is
tested with the device-side processors. Presence and frequency penalties
have no transformers processor; they are checked against OpenAI's formula
written out per token.
"""

from __future__ import annotations

import random

import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from framework.engine.sampling_inputs import build_sampling_metadata
from framework.engine.sequence import Sequence
from framework.sampling_params import SamplingParams
from plugins.samplers.processors import apply_logits_processors
from plugins.samplers.standard import StandardSampler

VOCAB = 50
EOS = 1


def make_seq(params: SamplingParams, rng: random.Random, prompt_len=12, output_len=9) -> Sequence:
    seq = Sequence("r", [rng.randrange(VOCAB) for _ in range(prompt_len)], params)
    seq.token_ids += [rng.randrange(VOCAB) for _ in range(output_len)]
    return seq


def process(seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
    md = build_sampling_metadata(seqs, VOCAB, torch.device("cpu"), frozenset({EOS}))
    return apply_logits_processors(logits, md)


def test_repetition_penalty_matches_transformers_over_prompt_and_output():
    rng = random.Random(0)
    penalties = [1.0, 1.3, 0.7, 2.0, 1.0]
    seqs = [make_seq(SamplingParams(repetition_penalty=p), rng) for p in penalties]
    logits = torch.randn(len(seqs), VOCAB) * 3
    ours = process(seqs, logits)
    for row, (seq, penalty) in enumerate(zip(seqs, penalties)):
        processor = RepetitionPenaltyLogitsProcessor(penalty)
        expected = processor(torch.tensor([seq.token_ids]), logits[row : row + 1].clone())[0]
        torch.testing.assert_close(ours[row], expected, atol=1e-6, rtol=0)
    assert not torch.equal(ours[1], logits[1])  # it did something
    assert torch.equal(ours[0], logits[0])  # rows without penalties are untouched


def test_presence_and_frequency_penalties_follow_openai_over_generated_tokens():
    rng = random.Random(1)
    settings = [(0.5, 0.0), (0.0, 0.7), (-1.0, 1.5), (2.0, -2.0), (0.0, 0.0)]
    seqs = [make_seq(SamplingParams(presence_penalty=p, frequency_penalty=f), rng) for p, f in settings]
    logits = torch.randn(len(seqs), VOCAB)
    ours = process(seqs, logits)
    for row, (seq, (presence, frequency)) in enumerate(zip(seqs, settings)):
        expected = logits[row].clone()
        for token in set(seq.output_token_ids):  # prompt tokens do not count
            count = seq.output_token_ids.count(token)
            expected[token] -= frequency * count + presence
        torch.testing.assert_close(ours[row], expected, atol=1e-6, rtol=0)


def test_logit_bias_matches_sequence_bias():
    rng = random.Random(2)
    biases = [{3: 5.0, 7: -100.0}, {}, {0: 0.5, 49: 100.0, 3: -2.0}]
    seqs = [make_seq(SamplingParams(logit_bias=b), rng) for b in biases]
    logits = torch.randn(len(seqs), VOCAB)
    ours = process(seqs, logits)
    for row, bias in enumerate(biases):
        expected = logits[row : row + 1].clone()
        if bias:
            processor = SequenceBiasLogitsProcessor({(t,): v for t, v in bias.items()})
            expected = processor(torch.tensor([seqs[row].token_ids]), expected)
        torch.testing.assert_close(ours[row], expected[0], atol=1e-6, rtol=0)


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    rng = random.Random(3)
    cases = [(5, [9], False, 3), (5, [9], False, 5), (4, [], True, 1), (0, [9, 11], False, 0)]
    seqs = []
    for min_tokens, stop_ids, ignore_eos, generated in cases:
        params = SamplingParams(min_tokens=min_tokens, stop_token_ids=stop_ids, ignore_eos=ignore_eos)
        seqs.append(make_seq(params, rng, prompt_len=6, output_len=generated))
    logits = torch.randn(len(seqs), VOCAB)
    ours = process(seqs, logits)
    for row, (seq, (min_tokens, stop_ids, ignore_eos, _)) in enumerate(zip(seqs, cases)):
        banned = stop_ids + ([] if ignore_eos else [EOS])
        processor = MinNewTokensLengthLogitsProcessor(seq.num_prompt_tokens, min_tokens, banned or [EOS])
        expected = processor(torch.tensor([seq.token_ids]), logits[row : row + 1].clone())[0] if banned else logits[row]
        torch.testing.assert_close(ours[row], expected, atol=0, rtol=0)
    assert ours[0, 9] == float("-inf") and ours[1, 9] == logits[1, 9]  # lifted once min_tokens are out


def test_combined_order_is_bans_then_bias_then_penalties():
    rng = random.Random(4)
    params = SamplingParams(
        logit_bias={5: 3.0, 6: -1.0}, repetition_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.2,
        min_tokens=20, max_tokens=30, stop_token_ids=[8],
    )  # fmt: skip
    seq = make_seq(params, rng)
    seq.token_ids += [5, 6, 5]
    logits = torch.randn(1, VOCAB)
    ids = torch.tensor([seq.token_ids])
    expected = MinNewTokensLengthLogitsProcessor(seq.num_prompt_tokens, 20, [EOS, 8])(ids, logits.clone())
    expected = SequenceBiasLogitsProcessor({(5,): 3.0, (6,): -1.0})(ids, expected)
    expected = RepetitionPenaltyLogitsProcessor(1.5)(ids, expected)[0]
    for token in set(seq.output_token_ids):
        expected[token] -= 0.2 * seq.output_token_ids.count(token) + 0.3
    torch.testing.assert_close(process([seq], logits)[0], expected, atol=1e-6, rtol=0)


def test_sampler_samples_from_the_processed_logits_and_reports_raw_logprobs():
    rng = random.Random(5)
    seqs = [make_seq(SamplingParams(temperature=0, logit_bias={4: 100.0}), rng) for _ in range(3)]
    seqs.append(make_seq(SamplingParams(temperature=1.0, logit_bias={4: 100.0}, min_tokens=50, max_tokens=60), rng))
    logits = torch.randn(len(seqs), VOCAB)
    md = build_sampling_metadata(seqs, VOCAB, torch.device("cpu"), frozenset({EOS}), num_top=3)
    out = StandardSampler()(logits, md)
    assert out.token_ids.tolist() == [4, 4, 4, 4]  # a +100 bias wins, greedy or not
    raw = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logprobs, raw[:, 4], atol=1e-5, rtol=0)
    assert torch.equal(out.top_token_ids, raw.topk(3).indices)
