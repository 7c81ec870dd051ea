"""The Triton sampling kernel (``plugins.samplers.triton_sampling``) against the torch reference.

On the CPU the kernel runs under ``TRITON_INTERPRET=1`` (conftest.py) with
small blocks and a small CAP, so the bracket passes, the take-everything
shortcut, the sorted cut and the one-value (tied) cut all run on short rows.
The reference is ``standard._apply_top_k_top_p`` (a stable full sort) and
``standard.filtered_race``: given the same noise ``q``, the kept set of every
row must be the same set and the token the same token. The split-vocabulary
path (rows without top-k / top-p) must give the one-program kernel's tokens
exactly, ties included, on rows cut into several chunks (a ragged last one).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from framework.ops.split_k import counters_on, num_sms  # noqa: E402
from framework.sampling_metadata import SamplingMetadata  # noqa: E402
from plugins.samplers import standard, triton_sampling, triton_split_sample  # noqa: E402
from plugins.samplers.standard import StandardSampler  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Small enough for the interpreter, small CAP so rows need bracket passes.
SMALL = dict(BLOCK=128, BLOCK_E=64, BLOCK_C=256, CAP=64, NUM_PIVOTS=8, num_warps=4)
CONFIGS = [SMALL, dict(BLOCK=256, BLOCK_E=128, BLOCK_C=128, CAP=128, NUM_PIVOTS=16, num_warps=4)]


@pytest.fixture
def small_kernel(monkeypatch):
    """The sampler's kernel with the SMALL configuration (the default's CAP=2048 sort is slow to interpret)."""
    for key, value in SMALL.items():
        monkeypatch.setitem(triton_sampling.DEFAULT_CONFIG, key, value)


def logits_of(kind: str, n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, vocab, generator=gen)
    if kind == "spread":  # a long upper tail, as language-model logits have
        return x * 3
    if kind == "flat":  # the nucleus is most of the vocabulary
        return x * 0.2
    if kind == "ties":  # integer logits: many tokens share the cut value
        return (x * 2).round()
    if kind == "banned":  # min_tokens / bias bans
        return (x * 3).masked_fill(torch.rand(n, vocab, generator=gen) < 0.3, float("-inf"))
    raise ValueError(kind)


def random_params(n: int, vocab: int, gen: torch.Generator):
    def pick(choices):
        return [choices[i] for i in torch.randint(len(choices), (n,), generator=gen).tolist()]

    temperature = pick([0.0, 0.5, 1.0, 1.7])
    top_k = pick([vocab, vocab, 1, 5, 50, 300, vocab - 1])
    top_p = pick([1.0, 1.0, 0.3, 0.9, 0.999])
    min_p = pick([0.0, 0.0, 0.05])
    return temperature, top_k, top_p, min_p


def metadata(temperature, top_k, top_p, min_p) -> SamplingMetadata:
    return SamplingMetadata(
        all_random=min(temperature) >= 1e-5,
        temperature=torch.tensor(temperature, dtype=torch.float32, device=DEVICE),
        top_k=torch.tensor(top_k, dtype=torch.int64, device=DEVICE),
        top_p=torch.tensor(top_p, dtype=torch.float32, device=DEVICE),
        min_p=torch.tensor(min_p, dtype=torch.float32, device=DEVICE),
        no_top_k=False,
        no_top_p=False,
        no_min_p=False,
    )


def near_the_cut(s: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Rows where some token's exact (float64) mass before it is within ``tol`` of top_p.

    There the float32 round-off of either implementation decides on which
    side of the cut that token falls.
    """
    ranked = s.double().sort(dim=1, descending=True, stable=True).values
    positions = torch.arange(s.shape[1], device=s.device)
    probs = torch.softmax(ranked.masked_fill(positions >= top_k.unsqueeze(1), float("-inf")), dim=1)
    before = probs.cumsum(dim=1) - probs
    return ((before - top_p.double().unsqueeze(1)).abs() < tol).any(dim=1) & (top_p < 1.0)


def kept_by_kernel(s: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """The kept set the kernel's cut describes: s > v, and the first n_keep tokens with s == v."""
    cut, n_keep = stats[:, 0:1], stats[:, 1:2]
    tie = s == cut
    rank = tie.long().cumsum(dim=1) - 1
    kept = (s > cut) | (tie & (rank < n_keep))
    return kept | cut.isnan()  # no cut: everything


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # -inf - -inf in the interpreter
@pytest.mark.parametrize("config", CONFIGS, ids=["cap64", "cap128"])
@pytest.mark.parametrize("kind", ["spread", "flat", "ties", "banned"])
def test_kept_set_and_token_match_the_sorted_reference(kind, config):
    n, vocab = 40, 700
    gen = torch.Generator().manual_seed(["spread", "flat", "ties", "banned"].index(kind))
    x = logits_of(kind, n, vocab, gen).to(DEVICE)
    temperature, top_k, top_p, min_p = random_params(n, vocab, gen)
    md = metadata(temperature, top_k, top_p, min_p)
    q = torch.empty(n, vocab).exponential_(generator=gen).to(DEVICE)
    stats = torch.empty(n, 4, device=DEVICE)

    tokens, lse = triton_sampling.filtered_sample(
        x, q, md.temperature, md.top_k, md.top_p, md.min_p, stats=stats, **config
    )

    greedy = md.temperature < 1e-5
    s = x / md.temperature.masked_fill(greedy, 1.0).unsqueeze(1)
    reference = standard._apply_top_k_top_p(s, md.top_k, md.top_p).isfinite()
    finite = x.isfinite()
    ambiguous = near_the_cut(s, md.top_k, md.top_p)
    assert ambiguous.sum() <= 2
    rows = ~greedy & ~ambiguous
    assert torch.equal((kept_by_kernel(s, stats) & finite)[rows], (reference & finite)[rows])
    expected = torch.where(greedy, x.argmax(dim=-1), standard.filtered_race(x, md, q.clone()))
    assert torch.equal(tokens[~ambiguous], expected[~ambiguous])
    torch.testing.assert_close(lse, torch.logsumexp(x, dim=-1), atol=1e-5, rtol=1e-6)
    if config is SMALL and kind in ("spread", "flat"):
        assert stats[~greedy, 3].max() >= 2  # some rows needed more than one bracket pass
    if kind == "ties":
        assert (stats[~greedy, 1] < stats[~greedy, 2]).any()  # some cuts kept part of a tied value


def test_ties_at_the_cut_keep_the_lowest_ids():
    vocab = 300
    x = torch.full((3, vocab), -5.0)
    x[0, [7, 40, 41, 200, 299]] = 3.0  # top-k = 3 among five tied tokens: ids 7, 40, 41
    x[1, :] = 0.0  # uniform: top_p = 0.05 keeps ceil(0.05 * 300) = 15 tokens, ids 0..14
    x[2, [3, 9]] = 4.0  # top-k = 1 of two tied maxima
    md = metadata([1.0, 1.0, 1.0], [3, vocab, 1], [1.0, 0.05, 1.0], [0.0] * 3)
    stats = torch.empty(3, 4, device=DEVICE)
    triton_sampling.filtered_sample(
        x.to(DEVICE), torch.ones(3, vocab, device=DEVICE), md.temperature, md.top_k, md.top_p, md.min_p,
        stats=stats, **SMALL,
    )  # fmt: skip
    kept = kept_by_kernel(x.to(DEVICE), stats).cpu()
    assert kept[0].nonzero().flatten().tolist() == [7, 40, 41]
    assert kept[1].nonzero().flatten().tolist() == list(range(15))
    assert kept[2].nonzero().flatten().tolist() == [3]
    reference = standard._apply_top_k_top_p(x, md.top_k.cpu(), md.top_p.cpu()).isfinite()
    assert torch.equal(kept, reference)


@pytest.mark.parametrize("use_penalties", [False, True], ids=["plain", "penalties"])
def test_sampler_paths_agree(small_kernel, use_penalties):
    """StandardSampler with and without Triton, same random state: same tokens and logprobs."""
    n, vocab = 24, 400
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(n, vocab, generator=gen) * 2).to(DEVICE)
    md = metadata(*random_params(n, vocab, gen))
    md.max_num_logprobs = 2
    md.generators = {3: torch.Generator(DEVICE).manual_seed(11), 9: torch.Generator(DEVICE).manual_seed(12)}
    if use_penalties:
        rows = torch.arange(0, n, 2, device=DEVICE)
        md.penalty_rows = rows
        md.presence_penalty = torch.full((len(rows),), 0.5, device=DEVICE)
        md.frequency_penalty = torch.full((len(rows),), 0.25, device=DEVICE)
        md.repetition_penalty = torch.full((len(rows),), 1.3, device=DEVICE)
        md.output_token_counts = torch.randint(0, 3, (len(rows), vocab), generator=gen, dtype=torch.int32).to(DEVICE)
        md.prompt_token_mask = (torch.rand(len(rows), vocab, generator=gen) < 0.1).to(DEVICE)
    outs = []
    for use_triton in (True, False):
        for row, g in md.generators.items():
            g.manual_seed(100 + row)
        torch.manual_seed(7)
        outs.append(StandardSampler(use_triton=use_triton)(logits, md))
    fast, reference = outs
    assert torch.equal(fast.token_ids, reference.token_ids)
    torch.testing.assert_close(fast.logprobs, reference.logprobs, atol=1e-5, rtol=0)
    assert torch.equal(fast.ranks, reference.ranks)
    assert torch.equal(fast.top_token_ids, reference.top_token_ids)


def test_seeded_row_is_independent_of_the_batch(small_kernel):
    vocab, steps, row = 300, 6, 5
    step_logits = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(99)).to(DEVICE)
    sampler = StandardSampler(use_triton=True)

    def run(in_batch: bool) -> list[int]:
        gen = torch.Generator(DEVICE).manual_seed(1234)
        torch.manual_seed(1000 + in_batch)
        tokens = []
        for step in range(steps):
            n = 12 if in_batch else 1
            logits = torch.randn(n, vocab, device=DEVICE) * 2
            r = row if in_batch else 0
            logits[r] = step_logits[step]
            params = [[0.8] * n, [50] * n, [0.9] * n, [0.0] * n]
            params[0][r], params[1][r], params[2][r] = 1.0, vocab, 0.95
            md = metadata(*params)
            md.generators = {r: gen}
            tokens.append(int(sampler(logits, md).token_ids[r]))
        return tokens

    assert run(in_batch=False) == run(in_batch=True)


# The split-vocabulary path (rows without top-k / top-p): chunks of 512 (5 chunks of V=2300, the last
# one 252 long) and of 128 (18 chunks): tokens identical to the one-program kernel's and the reference's.
SPLIT_VOCAB = 2300
SPLIT_CONFIGS = [dict(CHUNK=512, BLOCK=256, num_warps=4), dict(CHUNK=128, BLOCK=128, num_warps=4)]
SPLIT_CASES = {  # name: temperatures cycled over the rows, min_p cycled (None: off), with raw logits
    "temperature": ([1.0, 0.7], None, False),
    "greedy mixed": ([0.0, 1.0, 0.7], None, False),
    "min_p": ([1.0, 0.7], [0.05, 0.3], False),
    "raw": ([0.7, 0.0, 1.0], [0.0, 0.1], True),
    "banned": ([1.0, 0.0, 0.7], None, False),
    "ties": ([1.0, 0.7, 0.0], [0.0, 0.2], False),
}
TIED_TOP = [2000, 856, 600, 1500]  # 600 and 856: one lane of one 512-chunk (and of SMALL's 128-blocks)


def split_case(case: str, n: int, gen: torch.Generator):
    """``(x, q, raw, temperature, min_p)`` on DEVICE for one of SPLIT_CASES."""
    temps, min_ps, with_raw = SPLIT_CASES[case]
    vocab = SPLIT_VOCAB
    x = torch.randn(n, vocab, generator=gen) * 3
    q = torch.empty(n, vocab).exponential_(generator=gen)
    if case == "banned":  # scattered bans, a whole chunk banned; with 5 rows the last is banned entirely
        x = x.masked_fill(torch.rand(n, vocab, generator=gen) < 0.3, float("-inf"))
        x[:, 512:1024] = float("-inf")
        if n == 5:
            x[4] = float("-inf")
    if case == "ties":  # bfloat16 values, the top one at ids in three chunks and twice in one lane
        x = x.bfloat16().float()
        x[:, TIED_TOP] = x.max() + 1
        q[torch.arange(n) != 1] = 1.0  # q == 1: the race is argmax e, tied as x is
        x[3 if n == 5 else 1 :] = 0.5  # all equal (rows 3 and 4 of 5, row 1 of 2): the first id wins
    raw = x + torch.randn(n, vocab, generator=gen) if with_raw else None
    temperature = torch.tensor([temps[i % len(temps)] for i in range(n)])
    min_p = None if min_ps is None else torch.tensor([min_ps[i % len(min_ps)] for i in range(n)])
    return tuple(None if t is None else t.to(DEVICE) for t in (x, q, raw, temperature, min_p))


@pytest.fixture
def split_calls(monkeypatch):
    """Counts the launches of the split path (a test that forces it checks it ran)."""
    calls = []
    launch = triton_split_sample.split_sample

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_split_sample, "split_sample", counted)
    return calls


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # -inf - -inf in the interpreter
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0): the lse of a row of -inf
@pytest.mark.parametrize("split_config", SPLIT_CONFIGS, ids=["chunk512", "chunk128"])
@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_split_path_matches_the_one_program_kernel_and_the_reference(case, n, split_config, split_calls):
    gen = torch.Generator().manual_seed(n * 10 + list(SPLIT_CASES).index(case))
    x, q, raw, temperature, min_p = split_case(case, n, gen)
    greedy = temperature < 1e-5
    kwargs = dict(raw=raw, any_greedy=bool(greedy.any()))
    stats_split = torch.zeros(n, 4, device=DEVICE)
    tokens, lse = triton_sampling.filtered_sample(
        x, q, temperature, None, None, min_p, stats=stats_split, split=True, split_config=split_config, **kwargs
    )
    assert split_calls == [(n, SPLIT_VOCAB)]
    stats_one = torch.zeros(n, 4, device=DEVICE)
    tokens_one, lse_one = triton_sampling.filtered_sample(
        x, q, temperature, None, None, min_p, stats=stats_one, split=False, **kwargs, **SMALL
    )
    assert len(split_calls) == 1

    assert torch.equal(tokens, tokens_one)
    torch.testing.assert_close(stats_split, stats_one, equal_nan=True, atol=0, rtol=0)
    assert stats_split[:, 0].isnan().all() and not stats_split[:, 1:].any()
    torch.testing.assert_close(lse, lse_one, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(lse, torch.logsumexp(x if raw is None else raw, dim=-1), atol=1e-5, rtol=1e-6)
    md = SamplingMetadata(
        temperature=temperature, top_k=temperature, top_p=temperature,  # top-k / top-p off: unread
        min_p=min_p if min_p is not None else torch.zeros_like(temperature), no_min_p=min_p is None,
    )  # fmt: skip
    some = x.isfinite().any(dim=1)  # the reference's softmax of a row of -inf is NaN
    expected = torch.where(greedy, x.argmax(dim=-1), standard.filtered_race(x, md, q.clone()))
    assert torch.equal(tokens[some], expected[some])
    assert not tokens[~some].any()  # as the one-program kernel: token 0
    if case == "ties":  # rows with q == 1 race e, tied as x is: the lowest tied id wins, as the argmax's
        all_equal = (x == x[:, :1]).all(dim=1).tolist()
        for row in range(n):
            if row != 1:
                assert tokens[row] == (0 if all_equal[row] else min(TIED_TOP))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("finish", ["last program", "own launch"])
def test_split_path_finishes_rows_either_way(finish, monkeypatch):
    """The last-arriving program of kernel B, or the finish kernel (no counters, as in a CUDA-graph capture)."""
    if finish == "own launch":
        monkeypatch.setattr(triton_split_sample, "arrival_counters", lambda device, needed: None)
    gen = torch.Generator().manual_seed(3)
    x, q, _, temperature, _ = split_case("greedy mixed", 5, gen)
    tokens, lse = triton_sampling.filtered_sample(
        x, q, temperature, None, None, None, split=True, split_config=SPLIT_CONFIGS[0]
    )
    tokens_one, lse_one = triton_sampling.filtered_sample(x, q, temperature, None, None, None, split=False, **SMALL)
    assert torch.equal(tokens, tokens_one)
    torch.testing.assert_close(lse, lse_one, atol=1e-5, rtol=1e-6)
    counters = counters_on(x.device)
    if finish == "last program":
        assert counters is not None and not counters.any()  # every launch leaves its counters zeroed


def test_split_path_rule():
    k, p = torch.ones(2, dtype=torch.int64), torch.ones(2)
    device = torch.device(DEVICE)
    sms = num_sms(device)
    assert triton_split_sample.use_split_path(1, None, None, device)
    assert triton_split_sample.use_split_path(sms // 2, None, None, device)
    assert not triton_split_sample.use_split_path(sms // 2 + 1, None, None, device)
    assert not triton_split_sample.use_split_path(1, k, None, device)
    assert not triton_split_sample.use_split_path(1, None, p, device)
    with pytest.raises(ValueError):
        triton_sampling.filtered_sample(
            torch.zeros(2, 8, device=DEVICE), torch.ones(2, 8, device=DEVICE), torch.ones(2, device=DEVICE),
            k.to(DEVICE), None, None, split=True,
        )  # fmt: skip


def test_sampler_takes_the_split_path_for_few_rows_without_a_cut(split_calls):
    """StandardSampler at N=3 (temperature, greedy and min-p rows): split path, tokens as the torch path's."""
    n, vocab = 3, 1500
    gen = torch.Generator().manual_seed(8)
    logits = (torch.randn(n, vocab, generator=gen) * 2).to(DEVICE)
    md = metadata([1.0, 0.0, 0.7], [vocab] * n, [1.0] * n, [0.0, 0.0, 0.1])
    md.no_top_k, md.no_top_p = True, True
    outs = []
    for use_triton in (True, False):
        torch.manual_seed(7)
        outs.append(StandardSampler(use_triton=use_triton)(logits, md))
    assert split_calls == [(n, vocab)]
    assert torch.equal(outs[0].token_ids, outs[1].token_ids)
    torch.testing.assert_close(outs[0].logprobs, outs[1].logprobs, atol=1e-5, rtol=0)
