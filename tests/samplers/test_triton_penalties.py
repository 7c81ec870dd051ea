"""The Triton penalties kernel (``plugins.samplers.triton_penalties``) against ``processors.apply_penalties``.

The per-row tensors come from ``build_sampling_metadata`` on real sequences,
as in test_processors.py. The kernel does the reference's float32
operations in the same order, so the results must be equal bit for bit,
both when it writes every row from the raw logits (no copy first) and when
it updates the penalty rows of a copy in place after the sparse edits.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from framework.engine.sampling_inputs import build_sampling_metadata  # noqa: E402
from framework.engine.sequence import Sequence  # noqa: E402
from framework.sampling_params import SamplingParams  # noqa: E402
from plugins.samplers.processors import apply_logits_processors  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 5000  # more than one kernel block
EOS = 1


def make_seq(params: SamplingParams, rng: random.Random) -> Sequence:
    seq = Sequence("r", [rng.randrange(VOCAB) for _ in range(40)], params)
    seq.token_ids += [rng.randrange(60) for _ in range(30)]  # a small range: tokens repeat
    return seq


def both_paths(params_list: list[SamplingParams], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    seqs = [make_seq(p, rng) for p in params_list]
    md = build_sampling_metadata(seqs, VOCAB, torch.device(DEVICE), frozenset({EOS}))
    logits = (torch.randn(len(seqs), VOCAB, generator=torch.Generator().manual_seed(seed)) * 3).to(DEVICE)
    fast = apply_logits_processors(logits, md, use_triton=True)
    reference = apply_logits_processors(logits, md, use_triton=False)
    return logits, fast, reference


@pytest.mark.parametrize("repetition", [1.0, 1.4], ids=["no-repetition", "repetition"])
def test_every_row_penalised_matches_the_reference_exactly(repetition):
    params = [
        SamplingParams(presence_penalty=p, frequency_penalty=f, repetition_penalty=repetition)
        for p, f in [(0.5, 0.0), (0.0, 0.7), (-1.0, 1.5), (2.0, -2.0), (0.3, 0.3)]
    ]
    logits, fast, reference = both_paths(params, seed=0)
    assert torch.equal(fast, reference)
    assert not torch.equal(fast, logits)  # it did something


def test_some_rows_with_sparse_edits_match_the_reference_exactly():
    params = [
        SamplingParams(repetition_penalty=0.7, presence_penalty=0.2, logit_bias={3: 5.0, 4000: -2.0}),
        SamplingParams(),  # untouched
        SamplingParams(frequency_penalty=0.4, min_tokens=50, max_tokens=60, stop_token_ids=[9]),
        SamplingParams(repetition_penalty=1.3),
    ]
    logits, fast, reference = both_paths(params, seed=1)
    assert torch.equal(fast, reference)
    assert torch.equal(fast[1], logits[1])
