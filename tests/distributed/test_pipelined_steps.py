"""Pipeline parallelism with micro-batches in flight (PP=2, CPU, gloo) against one process.

Two virtual engines, each with its own scheduler and half of the KV pool;
the engine submits one's batch while the other's is still in the pipeline.
Enough requests that both are busy: tokens and logprobs must equal the
single process's (a wrong block offset would mix the two halves of the
cache), and the executor must have had two batches in flight at once.
"""

import pytest

import framework

from .conftest import engine_settings
from .test_parallel_generation import assert_logprobs_close

PROMPTS = [f"Request {i} begins with" + " some more words" * (3 * i) for i in range(6)]  # up to 50+ tokens
GREEDY = framework.SamplingParams(temperature=0, max_tokens=10, logprobs=2)
SEEDED = framework.SamplingParams(temperature=0.9, top_p=0.9, n=2, seed=5, max_tokens=8)
LONG = framework.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(parallel_models):
    return framework.LLM(**engine_settings(parallel_models["llama"]))


@pytest.fixture(scope="module")
def pipelined(parallel_models, reference):
    """PP=2 with a small pool: 20 blocks per virtual engine (a stage holds one of the 2 layers, so its
    blocks take half the single process's bytes). One parallel engine per process: the tests share it."""
    settings = engine_settings(parallel_models["llama"], pipeline_parallel_size=2)
    llm = framework.LLM(**{**settings, "kv_cache_memory": 20 * reference.engine.runner.kv_block_bytes()})
    yield llm
    llm.engine.shutdown()


def assert_pools_free(engine):
    for ve in engine.virtual_engines:
        assert ve.kv.pool.num_free == ve.kv.pool.num_blocks and not ve.in_flight
    assert not engine.has_unfinished_requests() and engine.runner.num_in_flight == 0


def test_two_batches_in_flight_match_one_process(reference, pipelined):
    engine = pipelined.engine
    assert [ve.kv.pool.num_blocks for ve in engine.virtual_engines] == [engine.num_blocks // 2] * 2
    assert engine.virtual_engines[1].block_offset == engine.num_blocks // 2
    expected = reference.generate(PROMPTS, GREEDY, use_tqdm=False)
    expected_seeded = reference.generate(PROMPTS[:2], SEEDED, use_tqdm=False)
    got = pipelined.generate(PROMPTS, GREEDY, use_tqdm=False)
    got_seeded = pipelined.generate(PROMPTS[:2], SEEDED, use_tqdm=False)
    for ref, out in zip(expected, got):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert_logprobs_close(ref.outputs[0].logprobs, out.outputs[0].logprobs)
    for ref, out in zip(expected_seeded, got_seeded):
        assert [o.token_ids for o in out.outputs] == [o.token_ids for o in ref.outputs]
    assert engine.runner.max_in_flight == 2  # micro-batches did overlap
    assert all(ve.kv.pool.total_allocated > 0 for ve in engine.virtual_engines)  # both were busy
    assert_pools_free(engine)
    stats = engine.stats()
    assert stats.num_blocks == engine.num_blocks and stats.kv_cache_usage == 0.0
    assert stats.prefix_cache_queries == sum(ve.kv.cache.queries for ve in engine.virtual_engines) > 0


def test_abort_with_a_batch_in_flight(reference, pipelined):
    engine = pipelined.engine
    expected = reference.generate(PROMPTS[:4], LONG, use_tqdm=False)
    ids = [engine.add_request(p, LONG) for p in PROMPTS[:4]]
    assert sorted(ve.num_unfinished() for ve in engine.virtual_engines) == [2, 2]
    tokens = {rid: 0 for rid in ids}
    while min(tokens.values()) < 3:
        for out in engine.step():
            tokens[out.request_id] = len(out.outputs[0].token_ids)
    _, batch, _ = engine._in_flight[0]  # a batch is in the pipeline now; abort one of its requests
    victim = batch.groups[0].request_id
    [aborted] = engine.abort_request(victim)
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id != victim  # the batch in flight brought its token: dropped
            if out.finished:
                finals[out.request_id] = out
    assert set(finals) == set(ids) - {victim}
    for rid, ref in zip(ids, expected):
        if rid != victim:
            assert finals[rid].outputs[0].token_ids == ref.outputs[0].token_ids
    assert_pools_free(engine)


def test_preemption_and_swapping_per_virtual_engine(reference, pipelined):
    """Requests preempt each other (swap for n=2, recompute for single sequences) within their
    virtual engine's 20 blocks, and still produce the single process's tokens."""
    engine = pipelined.engine
    assert [ve.kv.pool.num_blocks for ve in engine.virtual_engines] == [20, 20]
    seeded = framework.SamplingParams(temperature=0.9, n=2, seed=11, max_tokens=60, ignore_eos=True)
    greedy = framework.SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    prompts = PROMPTS[2:6]
    expected = reference.generate(prompts[:2], greedy, use_tqdm=False)
    expected += reference.generate(prompts[2:], seeded, use_tqdm=False)
    before = engine.stats()
    # one greedy and then one seeded request per virtual engine: the newest, n=2, is preempted by swapping
    ids = [engine.add_request(p, greedy) for p in prompts[:2]] + [engine.add_request(p, seeded) for p in prompts[2:]]
    finals = {}
    while engine.has_unfinished_requests():
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    stats = engine.stats()
    assert stats.num_swap_preemptions > before.num_swap_preemptions
    assert stats.swapped_in_blocks > before.swapped_in_blocks
    for rid, ref in zip(ids, expected):
        assert [o.token_ids for o in finals[rid].outputs] == [o.token_ids for o in ref.outputs]
    assert_pools_free(engine)
