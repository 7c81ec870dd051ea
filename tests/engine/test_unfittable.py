"""A request whose sequences together outgrow the whole KV pool ends with "length" instead of looping.

max_model_len always fits the pool (the engine checks it at start), so one
sequence always completes; n sequences of a long request may not. Without the
guard such a request preempts itself and comes back forever (recompute), or
waits in the swap queue forever (swap), and the engine never finishes.
"""

import pytest

import framework
from framework.sampling_params import SamplingParams
from framework.testing import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def block_bytes(model_dir):
    llm = framework.build({"model": str(model_dir), "max_model_len": 256})
    return llm.engine.runner.kv_block_bytes()


@pytest.mark.parametrize("mode", ["recompute", "swap", None], ids=["recompute", "swap", "default"])
@pytest.mark.parametrize("caching", [False, True], ids=["no-cache", "prefix-cache"])
def test_a_request_too_wide_for_the_pool_finishes_with_length(model_dir, block_bytes, mode, caching):
    config = {"model": str(model_dir), "max_model_len": 256, "max_num_batched_tokens": 64,
              "kv_cache_memory": 20 * block_bytes, "preemption_mode": mode, "enable_prefix_caching": caching}
    llm = framework.build(config)
    assert llm.engine.num_blocks == 20  # 320 slots: one 256-token sequence fits, four do not
    wide = SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=200, ignore_eos=True)
    normal = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = [[5, 6, 7, 8] * 5, [9, 10, 11] * 4]
    engine = llm.engine
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, [wide, normal])]
    final = {}
    for _ in range(2000):  # bounded: without the guard the engine never finishes
        final.update({o.request_id: o for o in engine.step() if o.finished})
        if not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests(), "the engine did not finish: the wide request loops"
    out_wide, out_normal = (final[i] for i in ids)

    assert len(out_wide.outputs) == 4
    assert all(c.finish_reason == "length" for c in out_wide.outputs)
    assert all(len(c.token_ids) < 200 for c in out_wide.outputs)  # cut short: 4 x 220 tokens never fit 320 slots
    assert out_normal.outputs[0].finish_reason == "length" and len(out_normal.outputs[0].token_ids) == 40

    alone = framework.build({**config, "kv_cache_memory": None}).generate([prompts[1]], normal, use_tqdm=False)
    assert out_normal.outputs[0].token_ids == alone[0].outputs[0].token_ids  # the other request is unaffected

    assert engine.kv.pool.num_free == engine.num_blocks
    if engine.kv.cpu_pool is not None:
        assert engine.kv.cpu_pool.num_free == engine.num_cpu_blocks
    assert not engine.has_unfinished_requests()
