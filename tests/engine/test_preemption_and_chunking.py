"""Acceptance: preemption (recompute) and chunked prefill do not change outputs."""

import random

import pytest

import framework
from framework.testing import make_tiny_model

NUM_REQUESTS = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def workload():
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 400) for _ in range(rng.randrange(4, 120))] for _ in range(NUM_REQUESTS)]
    params = [
        framework.SamplingParams(temperature=0.0, max_tokens=rng.randrange(4, 40), ignore_eos=True)
        for _ in range(NUM_REQUESTS)
    ]
    return prompts, params


def run(model_dir, workload, **config):
    llm = framework.build({"model": str(model_dir), "max_model_len": 256, **config})
    outputs = llm.generate(*workload, use_tqdm=False)
    return llm, [out.outputs[0].token_ids for out in outputs]


@pytest.fixture(scope="module")
def reference(model_dir, workload):
    llm, tokens = run(model_dir, workload)
    assert llm.engine.num_preemptions == 0
    return tokens


def test_preemption_by_recompute_keeps_outputs(model_dir, workload, reference):
    probe = framework.build({"model": str(model_dir), "max_model_len": 256})
    block_bytes = probe.engine.runner.kv_block_bytes()
    # 24 blocks of 16 tokens: 384 slots for 64 requests of up to 160 tokens each.
    llm, tokens = run(model_dir, workload, kv_cache_memory=24 * block_bytes)
    assert llm.engine.num_blocks == 24
    assert llm.engine.num_preemptions > 0
    assert tokens == reference
    assert llm.engine.kv.pool.num_free == 24  # everything freed at the end


def test_chunked_prefill_keeps_outputs(model_dir, workload, reference):
    longest = max(len(p) for p in workload[0])
    llm, tokens = run(model_dir, workload, max_num_batched_tokens=32, max_num_seqs=16)
    assert 32 < longest
    assert tokens == reference
    assert llm.engine.kv.pool.num_free == llm.engine.num_blocks
