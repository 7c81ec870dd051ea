"""Async scheduling (``EngineConfig.async_scheduling``): the next decode step is launched before the host
has the current step's tokens. The oracle is the same engine without it: every output must be the same
(greedy and seeded sampling, stops of every kind, logprobs, parallel sampling, prefix-cache hits), and
the step pipeline must really run (continuations counted) and stop where the host is needed."""

from __future__ import annotations

import pytest

import framework
from framework.testing import make_tiny_model

PROMPTS = ["Tell me a story about", "The capital of", "1 2 3 4", "Once upon a time, in a land far away,"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("llama"))


def build(model_dir, async_scheduling, **overrides):
    config = {"model": str(model_dir), "max_model_len": 96, "block_size": 4, "kv_cache_memory": 1 << 22,
              "async_scheduling": async_scheduling, **overrides}  # fmt: skip
    return framework.build(config)


@pytest.fixture(scope="module")
def pair(model_dir):
    return build(model_dir, False), build(model_dir, True)


class Counter:
    """Counts the continuation steps a runner launches."""

    def __init__(self, runner):
        self.count = 0
        self._launch = runner.launch_continuation
        runner.launch_continuation = self

    def __call__(self, *args):
        self.count += 1
        return self._launch(*args)


@pytest.fixture()
def continuations(pair):
    runner = pair[1].engine.runner
    counter = Counter(runner)
    yield counter
    del runner.launch_continuation  # the bound method again


def outputs(llm, prompts, params):
    results = llm.generate(prompts, params, use_tqdm=False)
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in r.outputs] for r in results]


def test_default_is_on_for_cuda_only(model_dir):
    llm = framework.build({"model": str(model_dir), "max_model_len": 32, "kv_cache_memory": 1 << 20})
    assert llm.engine.async_scheduling is (llm.engine.device.type == "cuda")


def test_several_ranks_refuse_it_by_name(model_dir):
    with pytest.raises(ValueError, match="async_scheduling=True needs tensor_parallel_size=1"):
        build(model_dir, True, tensor_parallel_size=2)


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0, max_tokens=20, ignore_eos=True),
        dict(temperature=1.0, seed=7, max_tokens=25, ignore_eos=True),
        dict(temperature=0.8, top_p=0.9, top_k=20, seed=3, max_tokens=30, ignore_eos=True, logprobs=2),
    ],
    ids=["greedy", "seeded", "top-p-k-logprobs"],
)
def test_same_outputs_and_the_pipeline_runs(pair, continuations, params):
    sync, overlapped = pair
    # max_tokens differ per request: requests leave the pipeline at different steps
    plist = [framework.SamplingParams(**{**params, "max_tokens": params["max_tokens"] + 3 * i}) for i in range(4)]
    assert outputs(overlapped, PROMPTS, plist) == outputs(sync, PROMPTS, plist)
    assert continuations.count >= params["max_tokens"] - 2  # most decode steps were launched ahead
    if params.get("logprobs"):
        a = sync.generate(PROMPTS, plist, use_tqdm=False)
        b = overlapped.generate(PROMPTS, plist, use_tqdm=False)
        for x, y in zip(a, b):
            assert x.outputs[0].logprobs == y.outputs[0].logprobs
            assert x.outputs[0].cumulative_logprob == y.outputs[0].cumulative_logprob


def test_stops_while_a_step_is_in_flight(pair, continuations):
    """Stop tokens and stop strings end a request a step after its next step was launched: that step's
    token is dropped, and the others go on."""
    sync, overlapped = pair
    free = sync.generate(PROMPTS, framework.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                         use_tqdm=False)  # fmt: skip
    plist = []
    for i, result in enumerate(free):
        ids, text = result.outputs[0].token_ids, result.outputs[0].text
        if i % 2:
            plist.append(framework.SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[ids[6 + i]]))
        else:
            plist.append(framework.SamplingParams(temperature=0, max_tokens=24, stop=[text[len(text) // 2:][:2]]))
    expected = outputs(sync, PROMPTS, plist)
    assert outputs(overlapped, PROMPTS, plist) == expected
    assert all(o[0][2] == "stop" for o in expected)
    assert continuations.count > 0


def test_parallel_sampling_and_max_model_len(pair, continuations):
    sync, overlapped = pair
    params = framework.SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=80, ignore_eos=True)
    prompt = list(range(10, 40))  # 30 tokens: max_model_len 96 ends every sequence at 66 tokens
    got = outputs(overlapped, [prompt], params)
    assert got == outputs(sync, [prompt], params)
    assert all(len(ids) == 66 and reason == "length" for ids, _, reason, _ in got[0])
    assert continuations.count > 0


def test_penalties_keep_the_host_in_the_loop(pair, continuations):
    """A request whose sampling reads its own output (penalties) never has a step launched ahead."""
    sync, overlapped = pair
    params = framework.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.3)
    assert outputs(overlapped, PROMPTS[:2], params) == outputs(sync, PROMPTS[:2], params)
    assert continuations.count == 0


def test_new_requests_and_aborts_while_in_flight(pair):
    """Requests join and leave a running pipeline; outputs equal the synchronous engine's, no block leaks."""
    results = []
    for llm in pair:
        engine = llm.engine
        params = framework.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        engine.add_request(PROMPTS[0], params, request_id="a")
        engine.add_request(PROMPTS[1], params, request_id="b")
        done, steps = {}, 0
        while engine.has_unfinished_requests():
            steps += 1
            assert steps < 200
            if steps == 6:
                engine.add_request(PROMPTS[2], params, request_id="c")
            if steps == 9:
                for out in engine.abort_request("b"):
                    done[out.request_id] = (out.outputs[0].finish_reason, len(out.outputs[0].token_ids))
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].finish_reason)
        assert engine.kv.pool.num_free == engine.kv.pool.num_blocks  # cached blocks count as free
        results.append(done)
    sync, overlapped = results
    assert sync["a"] == overlapped["a"] and sync["c"] == overlapped["c"]
    assert sync["a"][1] == "length" and len(sync["a"][0]) == 16
    assert overlapped["b"][0] == "abort"


def test_generated_blocks_are_named_for_the_prefix_cache(pair, continuations):
    """A follow-up prompt made of a finished request's prompt and output hits as many cached blocks
    as without async scheduling: the blocks filled by steps launched ahead are named too."""
    hits = []
    for llm in pair:
        engine = llm.engine
        engine.reset_prefix_cache()
        first = llm.generate([PROMPTS[3]], framework.SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                             use_tqdm=False)[0]  # fmt: skip
        follow_up = first.prompt_token_ids + first.outputs[0].token_ids + [5, 6]
        before = engine.stats().prefix_cache_hits
        llm.generate([follow_up], framework.SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
        hits.append(engine.stats().prefix_cache_hits - before)
    assert hits[0] == hits[1] > 8 * 4  # at least the generated part's blocks (block size 4)
    assert continuations.count > 0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_a_full_pool_preempts_and_outputs_stay_the_same(model_dir, pair, mode):
    """A pool too small for every request: continuations cannot always get their blocks, and the scheduler
    preempts (by recompute or by swapping); greedy outputs still equal the synchronous engine's."""
    params = framework.SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [list(range(10 + i, 30 + i)) for i in range(6)]  # 6 x (20 + 40) tokens: 90 blocks of 4 wanted
    results, counts = [], []
    block_bytes = pair[0].engine.runner.kv_block_bytes()  # the same model and block size
    for overlapped in (False, True):
        # 40 blocks of 4 tokens: room for about two and a half requests at their longest
        llm = build(model_dir, overlapped, kv_cache_memory=40 * block_bytes, preemption_mode=mode, swap_space=0.01)
        results.append(outputs(llm, prompts, params))
        counts.append(llm.engine.num_preemptions)
        assert llm.engine.kv.pool.num_free == llm.engine.kv.pool.num_blocks
    assert results[0] == results[1]
    assert all(len(o[0][0]) == 40 for o in results[1])
    assert counts[0] > 0 and counts[1] > 0


def test_aborting_everything_drains_the_step_in_flight(pair):
    """Once every request of the step in flight is aborted, nothing is left over for a step() that may
    never come (a server shutting down): no unfinished work, every block free."""
    engine = pair[1].engine
    params = framework.SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in PROMPTS[:2]]
    for _ in range(4):  # prefill, then decodes with the next step queued
        engine.step()
    assert engine._pending is not None
    outs = engine.abort_request(ids)
    assert [o.outputs[0].finish_reason for o in outs] == ["abort", "abort"]
    assert not engine.has_unfinished_requests() and engine._pending is None
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks
