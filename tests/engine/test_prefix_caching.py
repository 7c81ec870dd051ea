"""Automatic prefix caching: hashes, the LRU free list, the scheduler's reuse, and outputs.

The acceptance tests at the end run a tiny model: outputs must not change
when prefix caching is on (mixed workload, with and without preemption), and
the counters must show a shared system prompt computed once.
"""

import random

import pytest

import framework
from framework.engine.block_pool import BlockPool, KVCacheManager
from framework.engine.prefix_cache import ROOT, PrefixCache, hash_block
from framework.engine.scheduler import Scheduler
from framework.engine.sequence import Sequence
from framework.engine.sequence_group import SequenceGroup
from framework.sampling_params import SamplingParams
from framework.testing import make_tiny_model

BS = 4  # block size of the model-free tests


class Width:
    """A stand-in decoding strategy: ``fanout`` sequences from the prompt, never finished."""

    def __init__(self, fanout=1):
        self.fanout = self.max_width = fanout
        self.num_top_logprobs, self.uses_processed_logprobs = 0, False


def make(num_blocks=64, budget=256, max_num_seqs=16):
    return Scheduler(KVCacheManager(num_blocks, BS, enable_prefix_caching=True), max_num_seqs, budget)


def request(name, tokens, fanout=1, **params):
    group = SequenceGroup(name, None, list(tokens), SamplingParams(**params))
    group.attach(Width(fanout))
    return group


def run_step(batch):
    """What the engine does after the model ran: advance, and append a token where one is sampled."""
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
    for group in batch.groups:
        for s in group.live_seqs():
            if s.num_computed_tokens == s.num_tokens:
                s.token_ids.append(1)
                group.sampled = True


# -- hashing -------------------------------------------------------------------------


def test_block_names_chain_over_parent_tokens_and_extra_keys():
    base = hash_block(ROOT, [1, 2, 3, 4])
    assert base == hash_block(ROOT, [1, 2, 3, 4]) and len(base) == 32
    assert hash_block(ROOT, [1, 2, 3, 5]) != base  # one token
    assert hash_block(base, [1, 2, 3, 4]) != base  # the parent
    assert hash_block(ROOT, [1, 2, 3, 4], (("cache_salt", "a"),)) != base  # an extra key
    # canonical encoding: length prefixes keep different preimages apart
    assert hash_block(ROOT, [1], (("cache_salt", "ab"),)) != hash_block(ROOT, [1], (("cache_salta", "b"),))
    assert hash_block(ROOT, [2**40]) != hash_block(ROOT, [0, 256])  # 64-bit ids, no packing ambiguity
    assert hash_block(ROOT, [1], (("cache_salt", "\ud800"),)) != base  # any str, even a lone surrogate


def test_a_hit_is_verified_against_the_stored_preimage():
    cache = PrefixCache(4)
    name = hash_block(ROOT, [1, 2, 3, 4])
    cache.insert(2, name, ROOT, [1, 2, 3, 4], ())
    assert cache.get(name, ROOT, [1, 2, 3, 4], ()) == 2
    # a forged collision: the same name with other tokens, parent or salt is a miss
    assert cache.get(name, ROOT, [9, 2, 3, 4], ()) is None
    assert cache.get(name, name, [1, 2, 3, 4], ()) is None
    assert cache.get(name, ROOT, [1, 2, 3, 4], (("cache_salt", "x"),)) is None
    cache.insert(3, name, ROOT, [1, 2, 3, 4], ())  # a duplicate stays uncached
    assert cache.by_hash[name] == 2 and not cache.is_cached(3)


# -- the free list ---------------------------------------------------------------------


def cached_pool(num_blocks):
    cache = PrefixCache(num_blocks)
    pool = BlockPool(num_blocks, cache)

    def name(block):  # any distinct entry
        cache.insert(block, bytes([block]) * 32, ROOT, [block], ())

    return pool, cache, name


def test_freed_cached_blocks_stay_free_and_are_evicted_least_recently_freed_first():
    pool, cache, name = cached_pool(6)
    blocks = pool.allocate(6)
    for b in blocks[:4]:
        name(b)
    pool.free([blocks[0]])
    pool.free([blocks[3], blocks[2]])  # freed in reverse: 2 goes first, then 3
    pool.free([blocks[1]])
    assert pool.num_free == 4 and pool.num_evictable == 4 and pool.usage() == pytest.approx(2 / 6)
    pool.free([blocks[5]])  # uncached: a plain free block, used before any eviction
    assert pool.allocate(1) == [blocks[5]] and cache.num_entries == 4
    assert pool.allocate(2) == [blocks[0], blocks[2]]  # LRU order; their names are dropped
    assert not cache.is_cached(blocks[0]) and not cache.is_cached(blocks[2]) and cache.num_entries == 2


def test_a_hit_revives_a_free_block_from_the_middle_of_the_list():
    pool, _, name = cached_pool(3)
    blocks = pool.allocate(3)
    for b in blocks:
        name(b)
    pool.free(blocks[::-1])  # LRU order: 0, 1, 2
    pool.share([blocks[1]])  # O(1) removal from the middle
    assert pool.ref_counts[blocks[1]] == 1 and pool.num_evictable == 2
    pool.share([blocks[1]])  # a second holder only raises the count
    assert pool.ref_counts[blocks[1]] == 2
    assert pool.allocate(2) == [blocks[0], blocks[2]]
    with pytest.raises(RuntimeError):
        pool.allocate(1)


# -- the KV manager and the scheduler ----------------------------------------------------------


def test_the_last_token_is_always_computed():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    first = Sequence("a", list(range(8)), SamplingParams())  # exactly two blocks
    assert kv.reuse_cached_prefix(first) == 0
    assert kv.allocate_slots(first, 8)
    kv.cache_full_blocks(first, 8)
    again = Sequence("b", list(range(8)), SamplingParams())
    assert kv.reuse_cached_prefix(again) == 4  # not 8: block 1 is computed again, into a new block
    assert again.block_ids == first.block_ids[:1] and kv.pool.ref_counts[first.block_ids[0]] == 2
    longer = Sequence("c", list(range(9)), SamplingParams())
    assert kv.reuse_cached_prefix(longer) == 8


def test_requests_admitted_in_the_same_step_share_the_blocks_named_in_it():
    sched = make()
    system = list(range(100, 110))  # 2 full blocks + 2 tokens
    a, b = request("a", system + [1, 2]), request("b", system + [3])
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.num_new_tokens == [12, 3]  # b computes only its third block
    assert b.seqs[0].block_ids[:2] == a.seqs[0].block_ids[:2]
    cache = sched.kv.cache
    assert (cache.queries, cache.hits) == (12 + 11, 8)
    assert sched.kv.pool.total_allocated == 3 + 1


def test_one_token_of_difference_in_the_first_block_shares_nothing():
    sched = make()
    system = list(range(100, 120))
    sched.add(request("a", system))
    run_step(sched.schedule())
    other = list(system)
    other[1] += 1
    sched.add(request("b", other))
    batch = sched.schedule()
    assert batch.num_new_tokens[-1] == 20 and sched.kv.cache.hits == 0


def test_the_cache_salt_separates_requests():
    sched = make()
    prompt = list(range(100, 117))
    for name, salt in [("a", None), ("b", "tenant-1"), ("c", "tenant-1"), ("d", "tenant-2"), ("e", None)]:
        sched.add(request(name, prompt, cache_salt=salt))
    batch = sched.schedule()
    # a and b compute everything; c shares b's, d nothing, e shares a's
    assert batch.num_new_tokens == [17, 17, 1, 17, 1]
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt="")


def test_freed_blocks_are_revived_and_a_preempted_request_finds_its_own_blocks():
    sched = make(num_blocks=6)
    a = request("a", range(100, 110))  # 3 blocks
    sched.add(a)
    run_step(sched.schedule())
    sched.finish([a])
    pool = sched.kv.pool
    assert pool.num_free == 6 and pool.num_evictable == 2  # its two full blocks stay cached
    b = request("b", list(range(100, 110)) + [5, 6, 7])
    sched.add(b)
    batch = sched.schedule()
    assert batch.num_new_tokens == [5] and pool.total_allocated == 3 + 2  # revived 2 blocks, allocated 2
    run_step(batch)
    sched._preempt(sched.running.pop())  # as when the pool runs short
    assert pool.num_evictable == 3
    batch = sched.schedule()  # b's prompt + its token: 14 tokens, 3 full blocks cached
    assert batch.num_new_tokens == [2] and sched.kv.cache.hits == 8 + 12


def test_a_request_that_is_not_admitted_gives_its_cached_blocks_back():
    sched = make(num_blocks=5)
    sched.add(request("a", range(100, 110)))
    run_step(sched.schedule())  # a holds 3 blocks (2 cached), 2 free
    b = request("b", list(range(100, 110)) + list(range(20)))  # shares 2 blocks, needs 6 more
    sched.add(b)
    batch = sched.schedule()
    assert batch.num_new_tokens == [1]  # only a's decode
    pool = sched.kv.pool
    assert b.seqs[0].block_ids == [] and b.seqs[0].num_computed_tokens == 0 and sched.waiting[0] is b
    assert pool.num_free == 2 and [pool.ref_counts[x] for x in sched.running[0].seqs[0].block_ids[:2]] == [1, 1]
    assert sched.kv.cache.queries == 10  # only admissions count


def test_forks_share_cached_blocks_through_reference_counts():
    sched = make()
    prompt = list(range(100, 110))
    sched.add(request("a", prompt))
    run_step(sched.schedule())
    b = request("b", prompt + [7], fanout=3)
    sched.add(b)
    batch = sched.schedule()
    assert batch.num_new_tokens[-1] == 3 and len(batch.forks) == 2
    shared = b.seqs[0].block_ids[:2]
    assert all(sched.kv.pool.ref_counts[x] == 1 + 3 for x in shared)  # a + three sequences of b
    run_step(batch)
    batch = sched.schedule()  # each of b's sequences writes token 12 in block 2: two copy on write
    assert len(batch.block_copies) == 2 and all(s.block_ids[:2] == shared for s in b.seqs)


def test_prompt_logprobs_requests_compute_their_whole_prompt():
    sched = make()
    prompt = list(range(100, 110))
    sched.add(request("a", prompt))
    run_step(sched.schedule())
    sched.add(request("b", prompt, prompt_logprobs=0))
    assert sched.schedule().num_new_tokens[-1] == 10 and sched.kv.cache.queries == 10


def test_reset_forgets_free_and_used_blocks():
    sched = make()
    prompt = list(range(100, 118))
    a = request("a", prompt)
    sched.add(a)
    run_step(sched.schedule())
    assert sched.kv.cache.num_entries == 4
    assert sched.kv.reset_prefix_cache() == 4 and sched.kv.cache.num_entries == 0
    for _ in range(3):  # a keeps running; its old blocks are not named again
        run_step(sched.schedule())
    assert sched.kv.cache.num_entries == 1  # only block 4, filled after the reset
    sched.add(request("b", prompt))
    assert sched.schedule().num_new_tokens[-1] == 18


def test_slot_accounting_counts_shared_blocks_once():
    sched = make()
    sched.add(request("a", range(100, 110), fanout=2))  # 10 tokens: 3 blocks, the last holds 2
    batch = sched.schedule()
    run_step(batch)
    seqs = [s for g in sched.running for s in g.live_seqs()]
    assert len(seqs) == 2
    allocated, used = sched.kv.slot_usage(seqs)
    assert (allocated, used) == (12, 10)


# -- the engine (tiny model) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("llama"))


def mixed_workload():
    """Shared system prompts of several lengths, duplicates, whole-block prompts, n > 1, beams, prompt logprobs."""
    rng = random.Random(1)
    systems = [[rng.randrange(10, 400) for _ in range(n)] for n in (40, 96, 150)]
    prompts, params = [], []
    for i in range(36):
        system = systems[i % 3]
        suffix = [rng.randrange(10, 400) for _ in range(rng.choice([0, 1, 7, 16, 30]))]
        prompts.append(system + suffix if suffix or i % 2 else list(system))
        params.append(SamplingParams(temperature=0.0, max_tokens=rng.randrange(4, 24), ignore_eos=True))
    prompts += [systems[0] + [5, 6], systems[1] + [7], systems[2][:64], systems[2]]
    params += [
        SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True),
        SamplingParams(n=2, use_beam_search=True, temperature=0, max_tokens=8),
        SamplingParams(temperature=0, max_tokens=5, prompt_logprobs=2, logprobs=1),
        SamplingParams(n=2, temperature=0.7, seed=3, max_tokens=10, ignore_eos=True),
    ]
    return prompts, params


def completions(outputs):
    return [[tuple(c.token_ids) for c in out.outputs] for out in outputs]


def logprobs(outputs):
    """(token ids of every prompt-logprob entry, [their logprobs, then each completion's cumulative logprob])."""
    keys, values = [], []
    for out in outputs:
        for entry in out.prompt_logprobs or []:
            keys.append(None if entry is None else sorted(entry))
            values += [] if entry is None else [entry[t].logprob for t in sorted(entry)]
        values += [c.cumulative_logprob for c in out.outputs]
    return keys, values


def assert_same_logprobs(ours, expected):
    assert ours[0] == expected[0]
    assert ours[1] == pytest.approx(expected[1], abs=1e-4)


@pytest.fixture(scope="module")
def reference(model_dir):
    llm = framework.build({"model": str(model_dir), "max_model_len": 256, "enable_prefix_caching": False})
    outputs = llm.generate(*mixed_workload(), use_tqdm=False)
    return completions(outputs), logprobs(outputs), llm.engine.runner.kv_block_bytes()


@pytest.mark.parametrize("small_pool", [False, True], ids=["roomy", "preempting"])
def test_outputs_are_identical_with_prefix_caching(model_dir, reference, small_pool):
    tokens, expected_logprobs, block_bytes = reference
    config = {"model": str(model_dir), "max_model_len": 256, "enable_prefix_caching": True}
    if small_pool:
        config.update(kv_cache_memory=30 * block_bytes, max_num_batched_tokens=64)
    llm = framework.build(config)
    first = llm.generate(*mixed_workload(), use_tqdm=False)
    second = llm.generate(*mixed_workload(), use_tqdm=False)  # now most prompts are cached
    assert completions(first) == tokens and completions(second) == tokens
    assert_same_logprobs(logprobs(first), expected_logprobs)
    assert_same_logprobs(logprobs(second), expected_logprobs)
    stats = llm.get_stats()
    assert stats.prefix_cache_hits > 0 and stats.prefix_cache_hit_rate > 0.3
    assert (stats.num_preemptions > 0) == small_pool
    assert stats.allocated_slots == stats.used_slots == 0 and stats.kv_cache_usage == 0
    assert llm.engine.kv.pool.num_free == llm.engine.num_blocks


def test_100_requests_share_a_1000_token_system_prompt_computed_once(model_dir):
    llm = framework.build({"model": str(model_dir), "max_model_len": 1100, "enable_prefix_caching": True})
    rng = random.Random(2)
    system = [rng.randrange(10, 400) for _ in range(1000)]
    prompts = [system + [rng.randrange(10, 400) for _ in range(rng.randrange(1, 20))] for _ in range(100)]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.get_stats()
    shared = 1000 // 16 * 16  # 62 full blocks; the last 8 system tokens share a block with each suffix
    assert stats.prefix_cache_queries == sum(map(len, prompts))
    assert stats.prefix_cache_hits == 99 * shared  # the first request computed the prefix; no one else did
    # one token of difference in the first block: nothing is shared
    other = list(system)
    other[3] = other[3] + 1
    llm.generate([other + [7]], params, use_tqdm=False)
    assert llm.get_stats().prefix_cache_hits == 99 * shared
    # the outputs are those of the same prompts without caching
    plain = framework.build({"model": str(model_dir), "max_model_len": 1100, "enable_prefix_caching": False})
    sample = [0, 1, 50, 99]
    expected = plain.generate([prompts[i] for i in sample], params, use_tqdm=False)
    assert completions([outputs[i] for i in sample]) == completions(expected)


def test_stats_reset_and_a_failed_step(model_dir, monkeypatch):
    llm = framework.build({"model": str(model_dir), "max_model_len": 256, "enable_prefix_caching": True})
    prompt = list(range(20, 120))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)
    stats = llm.get_stats()
    assert stats.cached_free_blocks == 6 and (stats.prefix_cache_queries, stats.prefix_cache_hits) == (100, 0)
    assert llm.reset_prefix_cache() and llm.get_stats().cached_free_blocks == 0
    llm.generate([prompt], params, use_tqdm=False)
    assert llm.get_stats().prefix_cache_hits == 0  # nothing from before the reset
    # a step that fails leaves no block named for K/V it never wrote
    engine = llm.engine
    engine.add_request(list(range(200, 300)), params, "doomed")

    def fail(batch):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "launch", fail)  # execute = fetch(launch(batch))
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    assert engine.kv.cache.num_entries == 0
    engine.abort_request("doomed")
    monkeypatch.undo()
    llm.generate([prompt], params, use_tqdm=False)
    assert llm.get_stats().prefix_cache_hits == 0


def test_stats_without_prefix_caching(model_dir):
    assert framework.EngineConfig().enable_prefix_caching  # on by default, as in vLLM v1
    llm = framework.build({"model": str(model_dir), "max_model_len": 256, "enable_prefix_caching": False})
    engine = llm.engine
    engine.add_request(list(range(20, 57)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.step()
    stats = llm.get_stats()
    assert (stats.num_running, stats.num_waiting, stats.num_preemptions) == (1, 0, 0)
    assert (stats.allocated_slots, stats.used_slots, stats.unused_slots) == (48, 37, 11)
    assert stats.kv_cache_usage == pytest.approx(3 / stats.num_blocks)
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.cached_free_blocks) == (0, 0, 0)
    assert llm.reset_prefix_cache()  # a no-op without a cache
