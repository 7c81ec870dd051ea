"""Acceptance: sampled-token and prompt logprobs (with top-k and ranks) equal transformers' log_softmax.

fp32 throughout; the oracle is one full forward pass of transformers over
prompt + output on the same files.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import framework
from framework.testing import make_tiny_model

TOP = 5
PROMPTS = ["The quick brown fox jumps over the lazy dog, and then", "Hello", "1 2 3 4 5 6 7 8 9 10 11 12 13"]


@pytest.fixture(scope="module", params=["LlamaForCausalLM", "Qwen2ForCausalLM"])
def model_dir(request, tmp_path_factory):
    return make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def reference(hf, token_ids):
    """log_softmax of transformers' logits: row p predicts token p + 1."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([token_ids])).logits[0].float(), -1)


def check_entry(entry, token, ref_row):
    """One position: the token's logprob and rank, and the top TOP tokens in order."""
    assert entry[token].logprob == pytest.approx(float(ref_row[token]), abs=1e-4)
    assert entry[token].rank == int((ref_row > ref_row[token]).sum()) + 1
    top_values, top_ids = ref_row.topk(TOP)
    top = sorted((lp for lp in entry.values() if lp.rank <= TOP), key=lambda lp: lp.rank)
    assert [lp.rank for lp in top] == list(range(1, TOP + 1))
    ours = {t: lp.logprob for t, lp in entry.items() if lp.rank <= TOP}
    assert set(ours) == set(top_ids.tolist())
    torch.testing.assert_close(torch.tensor([ours[t] for t in top_ids.tolist()]), top_values, atol=1e-4, rtol=0)


def test_sampled_logprobs_match_log_softmax(model_dir, hf):
    llm = framework.build({"model": str(model_dir), "dtype": "float32", "max_model_len": 128})
    params = framework.SamplingParams(n=2, temperature=1.3, top_p=0.9, max_tokens=12, logprobs=TOP, ignore_eos=True)
    for out in llm.generate(PROMPTS, params, use_tqdm=False):
        for completion in out.outputs:
            ref = reference(hf, out.prompt_token_ids + completion.token_ids)
            start = len(out.prompt_token_ids) - 1
            for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
                check_entry(entry, token, ref[start + i])
            assert completion.cumulative_logprob == pytest.approx(
                sum(e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs)), abs=1e-4
            )


@pytest.mark.parametrize("budget", [8192, 7])  # one step, and chunked prefill of 7 tokens a step
def test_prompt_logprobs_match_a_full_forward_pass(model_dir, hf, budget):
    llm = framework.build(
        {"model": str(model_dir), "dtype": "float32", "max_model_len": 128, "max_num_batched_tokens": budget}
    )
    params = framework.SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=TOP)
    plain = framework.SamplingParams(temperature=0, max_tokens=2)
    outs = llm.generate(PROMPTS + ["no prompt logprobs here"], [params] * len(PROMPTS) + [plain], use_tqdm=False)
    assert outs[-1].prompt_logprobs is None
    for out in outs[:-1]:
        ids = out.prompt_token_ids
        assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
        ref = reference(hf, ids)
        for p, entry in enumerate(out.prompt_logprobs[1:]):
            check_entry(entry, ids[p + 1], ref[p])
