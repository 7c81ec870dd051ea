"""Parallel sampling (n, best_of) and beam search share the prompt's KV blocks.

Correctness of the sharing is checked against transformers: every token's
logprob, reported by the engine after forks and copy-on-write, must equal a
full forward pass over prompt + output.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import framework
from framework.testing import make_tiny_model

BLOCK = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return framework.build({"model": str(model_dir), "max_model_len": 1100, "block_size": BLOCK, "dtype": "float32"})


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def full_forward_logprobs(hf, prompt_ids, outputs):
    """transformers' logprob of each output token given everything before it: ``[len(outputs), length]``."""
    ids = torch.tensor([prompt_ids + out for out in outputs])  # outputs of one length: one batched forward
    with torch.no_grad():
        logits = hf(ids).logits[:, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(2, ids[:, len(prompt_ids) :, None]).squeeze(2)


def test_n8_over_a_1000_token_prompt_allocates_the_prompt_once(llm, hf):
    engine, pool = llm.engine, llm.engine.kv.pool
    prompt = [(i * 37) % 500 + 6 for i in range(1000)]
    prompt_blocks = -(-1000 // BLOCK)  # 63, the last one half full
    before = pool.total_allocated
    params = framework.SamplingParams(n=8, temperature=1.0, max_tokens=12, ignore_eos=True, logprobs=0, seed=7)
    engine.add_request(prompt, params, "r")
    engine.step()  # the whole prompt, once; 8 first tokens from its last logits row
    group = engine._groups["r"]
    assert len(group.seqs) == 8 and pool.total_allocated - before == prompt_blocks
    assert {pool.ref_counts[b] for b in group.seqs[0].block_ids} == {8}
    engine.step()  # 7 sequences copy the shared half-full block before writing; full blocks stay shared
    assert pool.total_allocated - before == prompt_blocks + 7
    assert all(pool.ref_counts[b] == 8 for b in group.seqs[0].block_ids[:-1])
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert pool.num_free == engine.num_blocks  # everything freed
    completions = outputs[0].outputs
    assert [c.index for c in completions] == list(range(8))
    assert len({tuple(c.token_ids) for c in completions}) == 8  # 8 different samples
    ours = torch.tensor([[next(iter(e.values())).logprob for e in c.logprobs] for c in completions])
    expected = full_forward_logprobs(hf, prompt, [c.token_ids for c in completions])
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_best_of_returns_the_n_most_likely_in_order(llm):
    all_five = framework.SamplingParams(n=5, temperature=1.2, max_tokens=8, seed=3, ignore_eos=True)
    best_two = framework.SamplingParams(n=2, best_of=5, temperature=1.2, max_tokens=8, seed=3, ignore_eos=True)
    five = llm.generate(["Once upon a time"], all_five, use_tqdm=False)[0].outputs
    two = llm.generate(["Once upon a time"], best_two, use_tqdm=False)[0].outputs
    ranked = sorted(five, key=lambda c: c.cumulative_logprob, reverse=True)
    assert [c.token_ids for c in two] == [c.token_ids for c in ranked[:2]]  # sequence i is seeded seed + i
    assert [c.index for c in two] == [0, 1] and two[0].cumulative_logprob >= two[1].cumulative_logprob


def test_preempted_forks_and_beams_recompute_to_the_same_output(model_dir, llm):
    work = [
        ("Once upon a time", framework.SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=30, ignore_eos=True)),
        ("The capital of France is", framework.SamplingParams(n=3, use_beam_search=True, temperature=0, max_tokens=20)),
        ("1 2 3 4 5 6", framework.SamplingParams(n=2, temperature=0.8, seed=9, max_tokens=30, ignore_eos=True)),
    ]
    prompts, params = zip(*work)
    reference = llm.generate(list(prompts), list(params), use_tqdm=False)
    block_bytes = llm.engine.runner.kv_block_bytes()
    small = framework.build({"model": str(model_dir), "max_model_len": 128, "block_size": BLOCK, "dtype": "float32",
                             "kv_cache_memory": 12 * block_bytes})  # fmt: skip
    outputs = small.generate(list(prompts), list(params), use_tqdm=False)
    assert small.engine.num_preemptions > 0
    for ref, out in zip(reference, outputs):
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in ref.outputs]
    assert small.engine.kv.pool.num_free == small.engine.num_blocks


def test_beams_share_the_prompt_blocks(llm):
    engine, pool = llm.engine, llm.engine.kv.pool
    before = pool.total_allocated
    params = framework.SamplingParams(n=4, use_beam_search=True, temperature=0, max_tokens=6)
    engine.add_request(list(range(10, 110)), params, "beams")  # 100 tokens: 7 blocks, the last partly filled
    engine.step()  # the prompt, once; its top candidates become 4 beams, all sharing its blocks
    beams = engine._groups["beams"].seqs
    assert len(beams) == 4 and pool.total_allocated - before == 7
    assert all(pool.ref_counts[b] == 4 for b in beams[0].block_ids)
    engine.step()  # 3 beams copy the partly filled block before writing into it
    assert pool.total_allocated - before == 7 + 3
    assert all(pool.ref_counts[b] == 4 for b in engine._groups["beams"].seqs[0].block_ids[:6])
    while engine.has_unfinished_requests():
        engine.step()
    assert pool.num_free == engine.num_blocks


def test_aborting_forked_requests_frees_every_block(llm):
    engine = llm.engine
    engine.add_request("Once upon a time", framework.SamplingParams(n=4, temperature=1.0, max_tokens=50), "sampled")
    beams = framework.SamplingParams(n=3, use_beam_search=True, temperature=0, max_tokens=50)
    engine.add_request("Hello there", beams, "beams")
    for _ in range(3):
        engine.step()
    outputs = {out.request_id: out for out in engine.abort_request(["sampled", "beams"])}
    assert len(outputs["sampled"].outputs) == 4 and len(outputs["beams"].outputs) == 3
    assert all(c.finish_reason == "abort" for out in outputs.values() for c in out.outputs)
    assert all(len(c.token_ids) == 3 for c in outputs["sampled"].outputs)
    assert not engine.has_unfinished_requests() and engine.kv.pool.num_free == engine.num_blocks
