"""TP=2, PP=2 and TP=2 x PP=2 (CPU, gloo, spawned worker processes) against one process.

Greedy tokens must be equal and every logprob (sampled, top-k, prompt) within
1e-4; seeded random sampling (n=2, forked sequences) must give the same
tokens, since sampling stays on the driver with the request's generators.
Prompts are longer than ``max_num_batched_tokens``, so prefills are chunked
and steps mix prefill and decode.
"""

import pytest

import framework
from framework.engine.llm_engine import LLMEngine  # noqa: F401  (the engine the LLM wraps)

from .conftest import engine_settings

TOL = 1e-4
PROMPTS = [
    "Hello, my name is",
    "The capital of France is " * 6,  # 40+ tokens: a chunked prefill
    [3, 17, 99, 250, 7, 7, 42],
]
GREEDY = framework.SamplingParams(temperature=0, max_tokens=14, logprobs=3)
WITH_PROMPT_LOGPROBS = framework.SamplingParams(temperature=0, max_tokens=6, logprobs=2, prompt_logprobs=2)
SEEDED = framework.SamplingParams(temperature=0.9, top_p=0.9, n=2, seed=7, max_tokens=10)

CASES = {
    "tp2-llama": ("llama", {"tensor_parallel_size": 2}),
    "tp2-qwen2-1kv-head": ("qwen2_kv1", {"tensor_parallel_size": 2}),
    "pp2-llama": ("llama", {"pipeline_parallel_size": 2}),
    "tp2-pp2-qwen2-tied-3-layers": (
        "qwen2_tied",
        {"tensor_parallel_size": 2, "pipeline_parallel_size": 2},
    ),
}


def run_all(llm):
    return (
        llm.generate(PROMPTS, GREEDY, use_tqdm=False),
        llm.generate(PROMPTS[1], WITH_PROMPT_LOGPROBS, use_tqdm=False),
        llm.generate(PROMPTS[0], SEEDED, use_tqdm=False),
    )


def assert_logprobs_close(expected, actual):
    assert len(expected) == len(actual)
    for exp, act in zip(expected, actual):
        if exp is None:
            assert act is None
            continue
        assert exp.keys() == act.keys()
        for token, lp in exp.items():
            assert abs(lp.logprob - act[token].logprob) < TOL, (token, lp, act[token])
            assert lp.rank == act[token].rank


def assert_same(reference, parallel):
    (greedy_ref, prompt_ref, seeded_ref), (greedy, prompt, seeded) = reference, parallel
    for ref, out in zip(greedy_ref, greedy):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert_logprobs_close(ref.outputs[0].logprobs, out.outputs[0].logprobs)
        assert abs(out.outputs[0].cumulative_logprob - ref.outputs[0].cumulative_logprob) < 20 * TOL
    assert prompt[0].outputs[0].token_ids == prompt_ref[0].outputs[0].token_ids
    assert_logprobs_close(prompt_ref[0].prompt_logprobs, prompt[0].prompt_logprobs)
    assert [o.token_ids for o in seeded[0].outputs] == [o.token_ids for o in seeded_ref[0].outputs]


@pytest.mark.parametrize("case", list(CASES))
def test_parallel_engine_matches_one_process(case, parallel_models):
    name, parallel = CASES[case]
    path = parallel_models[name]
    reference = run_all(framework.LLM(**engine_settings(path)))
    llm = framework.LLM(**engine_settings(path, **parallel))
    executor = llm.engine.runner
    try:
        assert (
            len(executor.procs)
            == parallel.get("tensor_parallel_size", 1) * parallel.get("pipeline_parallel_size", 1) - 1
        )
        result = run_all(llm)
    finally:
        llm.engine.shutdown()
    assert_same(reference, result)
    assert all(p.returncode == 0 for p in executor.procs.values())  # clean exits after SHUTDOWN
    assert llm.engine.dead_error is None
