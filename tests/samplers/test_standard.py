"""Tests of plugins.samplers.standard.StandardSampler (CPU)."""

from __future__ import annotations

import importlib

import numpy as np
import pluggy
import pytest
import torch

from framework import hookspecs
from framework.sampling_metadata import SamplingMetadata
from plugins.samplers.standard import StandardSampler

# A 12-token vocabulary with spread logits, deliberately not in sorted order.
LOGITS_12 = [2.0, -1.0, 3.1, 0.4, 1.3, -2.5, 2.6, 0.9, -0.3, 1.8, -4.0, 0.0]


def make_metadata(temperature, top_k=None, top_p=None, min_p=None, vocab=None, generators=None, max_num_logprobs=0):
    """SamplingMetadata from per-row Python lists, with honest host-side flags.

    ``top_k`` uses 0 for "off" here and is stored as ``vocab`` (the contract's "off").
    """
    n = len(temperature)
    top_k = [0] * n if top_k is None else top_k
    top_p = [1.0] * n if top_p is None else top_p
    min_p = [0.0] * n if min_p is None else min_p
    greedy = [t < 1e-5 for t in temperature]
    # Greedy rows never filter (SamplingParams normalises them the same way).
    return SamplingMetadata(
        temperature=torch.tensor(temperature, dtype=torch.float32),
        top_k=torch.tensor([k if 0 < k < vocab else vocab for k in top_k], dtype=torch.int64),
        top_p=torch.tensor(top_p, dtype=torch.float32),
        min_p=torch.tensor(min_p, dtype=torch.float32),
        generators=dict(generators or {}),
        all_greedy=all(greedy),
        all_random=not any(greedy),
        no_top_k=all(g or not 0 < k < vocab for g, k in zip(greedy, top_k)),
        no_top_p=all(g or p >= 1.0 for g, p in zip(greedy, top_p)),
        no_min_p=all(g or m <= 0.0 for g, m in zip(greedy, min_p)),
        max_num_logprobs=max_num_logprobs,
    )


def reference_distribution(logits, temperature, top_k, top_p, min_p):
    """The target distribution, written independently: a loop over ranked tokens in numpy."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    ranked = np.argsort(-x, kind="stable")
    keep = np.zeros(len(x), dtype=bool)
    keep[ranked[: (top_k if top_k > 0 else len(x))]] = True
    probs = np.exp(x - x.max()) * keep
    probs /= probs.sum()
    if top_p < 1.0:
        mass = 0.0  # mass of the better-ranked tokens kept so far
        for rank, token in enumerate(ranked):
            if keep[token] and rank > 0 and mass >= top_p:
                keep[token] = False
            mass += probs[token]
        probs = np.exp(x - x.max()) * keep
        probs /= probs.sum()
    if min_p > 0.0:
        probs[probs < min_p * probs.max()] = 0.0
        probs /= probs.sum()
    return probs


def empirical(tokens: torch.Tensor, vocab: int) -> np.ndarray:
    return np.bincount(tokens.numpy(), minlength=vocab) / tokens.numel()


# (temperature, top_k (0 = off), top_p, min_p). Each filter changes the
# target by a total variation of >= 0.07 in at least one case; in the first,
# top-k, top-p and temperature all bite (top-p acts on the top-k-renormalised mass).
COMBOS = [
    (0.7, 4, 0.8, 0.1),
    (1.0, 0, 1.0, 0.0),
    (1.3, 0, 0.9, 0.0),
    (0.5, 0, 1.0, 0.2),
    (1.5, 6, 0.9, 0.0),
]


def test_registered_through_the_hook():
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(importlib.import_module("plugins.samplers"))
    found = {}
    pm.hook.register_samplers(register=lambda name, target: found.setdefault(name, target))
    module, _, attr = found["standard"].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    assert cls is StandardSampler and cls.name == "standard"


def test_greedy_is_argmax_with_raw_logprobs_and_top_logprobs():
    torch.manual_seed(0)
    logits = torch.randn(16, 100) * 3
    md = make_metadata([0.0] * 16, vocab=100, max_num_logprobs=5)
    out = StandardSampler()(logits, md)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    ref = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.token_ids[:, None]).squeeze(1), atol=1e-5, rtol=0)
    top = ref.topk(5, -1)
    assert torch.equal(out.top_token_ids, top.indices)
    torch.testing.assert_close(out.top_logprobs, top.values, atol=1e-5, rtol=0)
    assert torch.equal(out.ranks, torch.ones(16, dtype=torch.int64))


def test_ties_take_the_first_index_and_share_the_best_rank():
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0], [3.0, 3.0, 3.0, 3.0]])
    out = StandardSampler()(logits, make_metadata([0.0, 0.0], vocab=4, max_num_logprobs=2))
    assert out.token_ids.tolist() == [1, 0]
    assert out.ranks.tolist() == [1, 1]


def test_random_rows_report_raw_logprobs_and_ranks():
    torch.manual_seed(1)
    logits = torch.randn(64, 30)
    # High temperature on flat logits: sampled tokens land at many ranks.
    md = make_metadata([2.0] * 64, top_p=[0.9] * 64, vocab=30, max_num_logprobs=3)
    out = StandardSampler()(logits, md)
    ref = torch.log_softmax(logits, -1)  # raw: before temperature and top-p
    chosen = ref.gather(1, out.token_ids[:, None])
    torch.testing.assert_close(out.logprobs, chosen.squeeze(1), atol=1e-5, rtol=0)
    assert torch.equal(out.ranks, (ref > chosen).sum(-1) + 1)
    assert (out.ranks > 1).sum() > 10
    assert torch.equal(out.top_token_ids, ref.topk(3, -1).indices)
    torch.testing.assert_close(out.top_logprobs, ref.topk(3, -1).values, atol=1e-5, rtol=0)


def test_no_top_logprobs_unless_asked():
    out = StandardSampler()(torch.randn(3, 10), make_metadata([1.0, 0.0, 0.5], vocab=10))
    assert out.ranks is None and out.top_token_ids is None and out.top_logprobs is None
    assert out.token_ids.dtype == torch.int64 and out.token_ids.shape == (3,)


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "t{}-k{}-p{}-m{}".format(*c))
def test_sampling_matches_target_distribution(combo):
    temperature, top_k, top_p, min_p = combo
    n, vocab = 20_000, len(LOGITS_12)
    torch.manual_seed(2)
    logits = torch.tensor([LOGITS_12] * n)
    md = make_metadata([temperature] * n, [top_k] * n, [top_p] * n, [min_p] * n, vocab=vocab)
    tokens = StandardSampler()(logits, md).token_ids
    target = reference_distribution(LOGITS_12, *combo)
    assert 0.5 * np.abs(empirical(tokens, vocab) - target).sum() < 0.02
    assert (empirical(tokens, vocab)[target == 0] == 0).all()  # filtered tokens never appear


def test_mixed_parameters_in_one_batch_each_row_gets_its_own_distribution():
    per_combo, vocab = 20_000, len(LOGITS_12)
    rows = [c for c in COMBOS for _ in range(per_combo)] + [(0.0, 0, 1.0, 0.0)] * 100
    torch.manual_seed(3)
    order = torch.randperm(len(rows))  # interleave the combinations
    rows = [rows[i] for i in order]
    md = make_metadata(*map(list, zip(*rows)), vocab=vocab)
    tokens = StandardSampler()(torch.tensor([LOGITS_12] * len(rows)), md).token_ids
    for combo in COMBOS:
        mask = torch.tensor([r == combo for r in rows])
        target = reference_distribution(LOGITS_12, *combo)
        assert 0.5 * np.abs(empirical(tokens[mask], vocab) - target).sum() < 0.02, combo
    greedy = torch.tensor([r[0] == 0.0 for r in rows])
    assert (tokens[greedy] == int(np.argmax(LOGITS_12))).all()


def test_mixed_greedy_and_random_rows():
    torch.manual_seed(4)
    n, vocab = 64, 50
    logits = torch.randn(n, vocab)
    temperature = [0.0 if i % 2 == 0 else 5.0 for i in range(n)]
    out = StandardSampler()(logits, make_metadata(temperature, top_k=[20] * n, min_p=[0.01] * n, vocab=vocab))
    argmax = logits.argmax(-1)
    assert torch.equal(out.token_ids[0::2], argmax[0::2])
    assert (out.token_ids[1::2] != argmax[1::2]).sum() > 16  # the hot rows really sample


def _seeded_run(seed: int, in_batch: bool, steps: int = 50, vocab: int = 500) -> list[int]:
    """Tokens of one seeded row (t=1.0, top_p=0.95) over ``steps`` steps, alone or as row 7 of 32."""
    step_logits = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(99))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(1000 + in_batch)  # the unseeded rows differ between the two runs
    tokens = []
    for step in range(steps):
        if not in_batch:
            md = make_metadata([1.0], top_p=[0.95], vocab=vocab, generators={0: gen})
            tokens.append(StandardSampler()(step_logits[step : step + 1], md).token_ids[0])
            continue
        n, row = 32, 7
        logits = torch.randn(n, vocab) * 2
        logits[row] = step_logits[step]
        temperature = [0.0 if i % 5 == 0 else 0.3 + 0.1 * (i % 7) for i in range(n)]
        temperature[row] = 1.0
        top_k = [0 if i % 3 else 10 for i in range(n)]
        top_p = [0.8 if i % 4 == 1 else 1.0 for i in range(n)]
        min_p = [0.05 if i % 2 else 0.0 for i in range(n)]
        top_k[row], top_p[row], min_p[row] = 0, 0.95, 0.0
        others = {i: torch.Generator().manual_seed(i) for i in (3, 11, 20)}
        md = make_metadata(temperature, top_k, top_p, min_p, vocab=vocab, generators={**others, row: gen})
        tokens.append(StandardSampler()(logits, md).token_ids[row])
    return torch.stack(tokens).tolist()


def test_seeded_row_is_independent_of_the_batch():
    alone = _seeded_run(1234, in_batch=False)
    assert alone == _seeded_run(1234, in_batch=True)
    assert len(set(alone)) > 10  # really random, not a constant
    assert alone != _seeded_run(4321, in_batch=False)  # and the seed matters
