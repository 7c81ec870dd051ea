"""Swap preemption: outputs do not depend on how requests are preempted, and every block comes back.

The oracle for the engine tests is the same workload run with a pool large
enough that nothing is preempted (and no prefix caching). The scheduler
tests run against a fake runner that keeps, for every GPU and CPU block, the
token id each slot holds, and checks before each step that every scheduled
sequence reads its own tokens: an independent model of what the KV cache
must contain.
"""

import argparse
import random

import pytest
import torch

import framework
from framework.config import EngineConfig
from framework.engine.block_pool import KVCacheManager
from framework.engine.scheduler import Scheduler
from framework.engine.sequence import SequenceStatus
from framework.engine.sequence_group import SequenceGroup
from framework.engine.stats import EngineStats
from framework.entrypoints.cli_args import add_engine_args, engine_config_from_args
from framework.entrypoints.openai.metrics import ServerMetrics
from framework.sampling_params import SamplingParams
from framework.testing import make_tiny_model

# -- the engine on a mixed workload -------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("llama"))


def mixed_workload():
    """Prompt lengths 3..100, a shared 40-token prefix, greedy with logprobs, n > 1, best_of, beams, seeded sampling."""
    rng = random.Random(7)
    system = [rng.randrange(10, 400) for _ in range(40)]
    prompts, params = [], []
    for i in range(16):
        body = [rng.randrange(10, 400) for _ in range(rng.randrange(3, 60))]
        prompts.append(system + body if i % 2 else body)
        params.append(SamplingParams(temperature=0.0, max_tokens=rng.randrange(4, 30), ignore_eos=True, logprobs=1))
    prompts += [system + [5, 6, 7], system[:20], [11, 12, 13] * 9, system + [9]]
    params += [
        SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=24, ignore_eos=True, logprobs=0),
        SamplingParams(n=2, use_beam_search=True, temperature=0, max_tokens=16),
        SamplingParams(n=2, best_of=3, temperature=0.8, seed=3, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=25, ignore_eos=True),
    ]
    return prompts, params


def tokens_of(outputs):
    return [[tuple(c.token_ids) for c in out.outputs] for out in outputs]


def logprobs_of(outputs):
    """Each completion's cumulative logprob, then each sampled token's logprob (where asked)."""
    values = []
    for out in outputs:
        for c in out.outputs:
            values.append(c.cumulative_logprob)
            values += [entry[t].logprob for t, entry in zip(c.token_ids, c.logprobs or [])]
    return values


def build(model_dir, **config):
    return framework.build({"model": str(model_dir), "max_model_len": 256, **config})


@pytest.fixture(scope="module")
def reference(model_dir):
    llm = build(model_dir, enable_prefix_caching=False)
    outputs = llm.generate(*mixed_workload(), use_tqdm=False)
    assert llm.get_stats().num_preemptions == 0
    return tokens_of(outputs), logprobs_of(outputs), llm.engine.runner.kv_block_bytes()


def assert_all_blocks_free(llm):
    engine = llm.engine
    assert engine.kv.pool.num_free == engine.num_blocks
    if engine.kv.cpu_pool is not None:
        assert engine.kv.cpu_pool.num_free == engine.num_cpu_blocks
    stats = llm.get_stats()
    assert (stats.num_running, stats.num_waiting, stats.num_swapped) == (0, 0, 0)
    assert stats.kv_cache_usage == 0 and stats.cpu_kv_cache_usage == 0


@pytest.mark.parametrize("caching", [False, True], ids=["no-cache", "prefix-cache"])
@pytest.mark.parametrize("mode", ["recompute", "swap", None], ids=["recompute", "swap", "default"])
def test_outputs_do_not_depend_on_the_preemption_mode(model_dir, reference, mode, caching):
    tokens, logprobs, block_bytes = reference
    llm = build(model_dir, kv_cache_memory=20 * block_bytes, max_num_batched_tokens=64, preemption_mode=mode,
                enable_prefix_caching=caching)  # fmt: skip
    outputs = llm.generate(*mixed_workload(), use_tqdm=False)
    assert tokens_of(outputs) == tokens
    assert logprobs_of(outputs) == pytest.approx(logprobs, abs=1e-4)
    stats = llm.get_stats()
    assert stats.num_preemptions == stats.num_swap_preemptions + stats.num_recompute_preemptions > 0
    if mode == "recompute":
        assert stats.num_swap_preemptions == 0 and stats.swapped_out_blocks == 0
    else:  # swap, and the default swaps the n > 1 and beam requests
        assert stats.num_swap_preemptions > 0
        assert stats.swapped_out_blocks == stats.swapped_in_blocks > 0
    if mode == "swap":
        assert stats.num_recompute_preemptions == 0  # the 4 GiB CPU pool never fills
    assert_all_blocks_free(llm)


def test_a_full_cpu_pool_falls_back_to_recompute(model_dir, reference):
    tokens, logprobs, block_bytes = reference
    llm = build(model_dir, kv_cache_memory=20 * block_bytes, max_num_batched_tokens=64, preemption_mode="swap",
                swap_space=3 * block_bytes / 2**30)  # fmt: skip
    assert llm.engine.num_cpu_blocks == 3
    outputs = llm.generate(*mixed_workload(), use_tqdm=False)
    assert tokens_of(outputs) == tokens
    assert logprobs_of(outputs) == pytest.approx(logprobs, abs=1e-4)
    stats = llm.get_stats()
    assert stats.num_swap_preemptions > 0 and stats.num_recompute_preemptions > 0
    assert_all_blocks_free(llm)


def test_no_swap_space_means_recompute(model_dir, reference):
    tokens, _, block_bytes = reference
    llm = build(model_dir, kv_cache_memory=20 * block_bytes, max_num_batched_tokens=64, swap_space=0)
    assert llm.engine.kv.cpu_pool is None and llm.engine.runner.cpu_kv_cache is None
    assert tokens_of(llm.generate(*mixed_workload(), use_tqdm=False)) == tokens
    stats = llm.get_stats()
    assert stats.num_recompute_preemptions > 0 and stats.num_swap_preemptions == 0
    assert_all_blocks_free(llm)


def test_the_runner_moves_blocks_between_the_caches(model_dir, reference):
    block_bytes = reference[2]
    llm = build(model_dir, kv_cache_memory=20 * block_bytes, swap_space=8 * block_bytes / 2**30)
    runner = llm.engine.runner
    gpu, cpu, dim = runner.kv_cache, runner.cpu_kv_cache, runner.block_dim + 1
    assert cpu.shape[dim] == 8 and cpu.shape[:dim] == gpu.shape[:dim] and cpu.shape[dim + 1 :] == gpu.shape[dim + 1 :]
    gpu.copy_(torch.randn(gpu.shape, generator=torch.Generator().manual_seed(0)))
    before = gpu.clone()
    runner._swap_blocks([(3, 5), (0, 1), (17, 0)], [])
    for g, c in [(3, 5), (0, 1), (17, 0)]:
        assert torch.equal(cpu.select(dim, c), before.select(dim, g))
    assert torch.equal(gpu, before)  # a swap-out leaves the device cache alone
    runner._swap_blocks([], [(5, 9), (1, 2), (0, 19)])
    expected = before.clone()
    for c, g in [(5, 9), (1, 2), (0, 19)]:
        expected.select(dim, g).copy_(cpu.select(dim, c))
    assert torch.equal(gpu, expected)


def test_swap_settings_are_validated_and_reach_the_cli():
    with pytest.raises(ValueError, match="swap_space"):
        EngineConfig(swap_space=-1)
    with pytest.raises(ValueError, match="preemption_mode"):
        EngineConfig(preemption_mode="evict")
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config_from_args(parser.parse_args(["--swap-space", "1.5", "--preemption-mode", "swap"]))
    assert (config.swap_space, config.preemption_mode) == (1.5, "swap")
    assert (EngineConfig().swap_space, EngineConfig().preemption_mode) == (4.0, None)


def test_swapped_requests_reach_the_metrics_and_the_stats_line():
    stats = EngineStats(
        num_running=1, num_waiting=0, kv_cache_usage=0.5, num_blocks=10, block_size=16, allocated_slots=80,
        used_slots=70, cached_free_blocks=0, prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=3,
        num_swapped=2, num_cpu_blocks=8, cpu_kv_cache_usage=0.25, num_swap_preemptions=2, num_recompute_preemptions=1,
    )  # fmt: skip
    metrics = ServerMetrics("m", stats=lambda: stats)
    metrics.observe([], 1, 0, 0.5)
    text = metrics.render().decode()
    assert 'framework:num_requests_swapped{model_name="m"} 2.0' in text
    assert 'framework:cpu_cache_usage_perc{model_name="m"} 0.25' in text
    line = metrics.stats_line()
    assert "Swapped: 2 reqs" in line and "Preemptions: 3 (2 by swap)" in line


# -- the scheduler against a fake runner that tracks what each slot holds --------------------------


class Width:
    """A stand-in decoding strategy: ``fanout`` sequences from the prompt."""

    def __init__(self, fanout):
        self.fanout = self.max_width = fanout
        self.num_top_logprobs, self.uses_processed_logprobs = 0, False


def request(name, prompt, fanout=1):
    group = SequenceGroup(name, None, list(prompt), SamplingParams())
    group.attach(Width(fanout))
    return group


class SlotTracker:
    """A fake model runner: ``gpu[b][i]`` / ``cpu[b][i]`` is the token id whose K/V slot i of block b holds."""

    def __init__(self, kv: KVCacheManager):
        bs = kv.block_size
        self.bs = bs
        self.gpu = [[None] * bs for _ in range(kv.pool.num_blocks)]
        self.cpu = [[None] * bs for _ in range(kv.cpu_pool.num_blocks if kv.cpu_pool else 0)]

    def execute(self, batch):
        assert not (batch.swap_out and batch.swap_in)  # the policy: a step swaps one way only
        for g, c in batch.swap_out:
            self.cpu[c] = list(self.gpu[g])
        for c, g in batch.swap_in:
            self.gpu[g] = list(self.cpu[c])
        for s, d in batch.block_copies:
            self.gpu[d] = list(self.gpu[s])
        for seq, n in zip(batch.seqs, batch.num_new_tokens):  # every new K/V is written before anyone reads
            for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                self.gpu[seq.block_ids[pos // self.bs]][pos % self.bs] = seq.token_ids[pos]
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            end = seq.num_computed_tokens + n
            held = [self.gpu[seq.block_ids[p // self.bs]][p % self.bs] for p in range(end)]
            assert held == seq.token_ids[:end], f"{seq} reads another sequence's K/V"


def advance(sched, batch, rng):
    """The engine's side of a step: computed tokens, samples, finished sequences and requests."""
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += n
    finished = []
    for group in batch.groups:
        live = group.live_seqs()
        if all(s.num_computed_tokens == s.num_tokens for s in live):
            group.sampled = True
            for seq in live:
                seq.token_ids.append(rng.randrange(50))
                if rng.random() < 0.08 or seq.num_tokens >= 60:
                    sched.kv.free(seq)
                    seq.status = SequenceStatus.FINISHED
            if not group.live_seqs():
                finished.append(group)
    sched.finish(finished)


@pytest.mark.parametrize("mode", ["recompute", "swap", None])
@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_every_sequence_reads_its_own_tokens(mode, caching, seed):
    rng = random.Random(seed)
    kv = KVCacheManager(24, 4, enable_prefix_caching=caching, num_cpu_blocks=12)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=24, preemption_mode=mode)
    tracker = SlotTracker(kv)
    prefixes = [[rng.randrange(50) for _ in range(n)] for n in (8, 13)]
    groups = [
        request(str(i), rng.choice(prefixes)[: rng.randrange(1, 14)] + [rng.randrange(50) for _ in range(rng.randrange(6))],
                fanout=rng.choice([1, 1, 2, 3]))
        for i in range(20)
    ]  # fmt: skip
    pending, steps = list(groups), 0
    while pending or sched.has_unfinished():
        for _ in range(rng.randrange(3)):
            if pending:
                sched.add(pending.pop(0))
        if rng.random() < 0.03 and sched.swapped:
            sched.abort({sched.swapped[-1].request_id})
        batch = sched.schedule()
        tracker.execute(batch)
        advance(sched, batch, rng)
        steps += 1
        assert steps < 2000
    assert kv.pool.num_free == 24 and kv.cpu_pool.num_free == 12
    assert sched.num_preemptions > 0
    assert (sched.num_swap_preemptions > 0) == (mode != "recompute")
    assert kv.num_swapped_in_blocks <= kv.num_swapped_out_blocks  # less when a swapped request was aborted


def test_shared_blocks_stay_shared_through_a_swap_round_trip():
    kv = KVCacheManager(16, 4, num_cpu_blocks=16)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    g = request("g", range(10), fanout=3)  # 3 blocks, the last partly filled
    sched.add(g)
    batch = sched.schedule()
    advance_all(batch, g)
    sched.schedule()  # each child copies the partly filled block on its first write
    advance_all(None, g)
    tables = [list(s.block_ids) for s in g.seqs]
    assert [len(set(col)) for col in zip(*tables)] == [1, 1, 3]
    sched._preempt(sched.running.pop())  # several live sequences: the default mode swaps
    out, _ = kv.take_swaps()
    assert len(out) == 5 and len({g for g, _ in out}) == 5  # each physical block once
    assert all(s.status is SequenceStatus.SWAPPED for s in g.seqs) and kv.pool.num_free == 16
    assert [kv.cpu_pool.ref_counts[b] for b in g.seqs[0].block_ids] == [3, 3, 1]
    assert g.seqs[0].num_computed_tokens == 11  # swapping keeps the computed tokens
    batch = sched.schedule()
    assert len(batch.swap_in) == 5 and not batch.swap_out and kv.cpu_pool.num_free == 16
    assert batch.num_new_tokens == [1, 1, 1]  # decodes, nothing recomputed
    after = [s.block_ids for s in g.seqs]
    assert [len(set(col)) for col in zip(*after)] == [1, 1, 3]
    assert [kv.pool.ref_counts[b] for b in after[0][:2]] == [3, 3]


def advance_all(batch, group):
    for seq in group.live_seqs():
        seq.num_computed_tokens = seq.num_tokens
        seq.token_ids.append(7)
    group.sampled = True


def test_swapped_requests_resume_oldest_first_before_any_waiting_request():
    kv = KVCacheManager(12, 4, num_cpu_blocks=12)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64, preemption_mode="swap")
    a, b, c = request("a", range(7)), request("b", range(20, 27)), request("c", range(40, 47))
    for g in (a, b, c):
        sched.add(g)
    run = sched.schedule()
    for g in (a, b, c):
        advance_all(run, g)
    sched._preempt(sched.running.pop())  # c
    sched._preempt(sched.running.pop())  # b, older: goes in front
    kv.take_swaps()
    assert list(sched.swapped) == [b, c]
    cpu_blocks = b.seqs[0].block_ids + c.seqs[0].block_ids
    late = request("late", range(60, 70))
    sched.add(late)
    batch = sched.schedule()
    assert batch.groups == [a, b, c, late] and sched.running == [a, b, c, late]  # late: once none is swapped
    assert [cpu for cpu, _ in batch.swap_in] == cpu_blocks


def test_a_swapped_request_blocks_admission_until_it_fits_and_abort_frees_cpu_blocks():
    kv = KVCacheManager(6, 4, num_cpu_blocks=6)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64, preemption_mode="swap")
    a, b = request("a", range(16)), request("b", range(20, 27))  # 4 + 2 blocks: the pool is full
    sched.add(a)
    sched.add(b)
    run = sched.schedule()
    advance_all(run, a)
    advance_all(run, b)
    batch = sched.schedule()  # a needs a 5th block for token 17: b is swapped out
    assert batch.preempted == [b] and len(batch.swap_out) == 2 and kv.cpu_pool.num_free == 4
    small = request("small", [1, 2])  # would fit, but b is older
    sched.add(small)
    advance_all(batch, a)
    assert sched.schedule().groups == [a] and list(sched.swapped) == [b]
    aborted = sched.abort({"b"})
    assert aborted == [b] and kv.cpu_pool.num_free == 6 and not sched.swapped
    advance_all(None, a)
    assert sched.schedule().groups[-1] is small


def test_blocks_for_counts_what_allocate_slots_takes():
    rng = random.Random(3)
    for _ in range(200):
        kv = KVCacheManager(64, 4)
        g = request("g", range(rng.randrange(1, 20)), fanout=rng.randrange(1, 5))
        sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=1000)
        sched.add(g)
        for _ in range(rng.randrange(1, 4)):
            batch = sched.schedule()
            advance_all(batch, g)
        plan = [(s, s.num_tokens - s.num_computed_tokens + rng.randrange(6)) for s in g.live_seqs()]
        free = kv.pool.num_free
        predicted = kv.blocks_for(plan)
        assert all(kv.allocate_slots(s, n) for s, n in plan)
        assert free - kv.pool.num_free == predicted
