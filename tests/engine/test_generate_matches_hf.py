"""Acceptance: the engine's greedy tokens and logprobs equal transformers' on the same files.

The tiny models come from ``framework.testing.make_tiny_model``, which scales
the random weights so that argmax margins exceed float noise (see its
docstring); the test also checks that margin on the reference side, so a
near-tie cannot make it pass or fail by luck.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import framework
from framework.testing import make_tiny_model

ARCHITECTURES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"]
PROMPTS = [
    "Hello",
    "The capital of France is",
    "In a hole in the ground there lived a hobbit.",
    "1 2 3 4 5 6 7 8 9 10 11 12",
    "Once upon a time, in a land far, far away, there was a small village by the sea where",
    "def fib(n):",
    "A",
    "The quick brown fox jumps over the lazy dog, and then the dog wakes up and chases the fox all the way home.",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=ARCHITECTURES)
def model_dir(request, tmp_path_factory):
    return make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def engine_outputs(model_dir):
    llm = framework.build({"model": str(model_dir), "dtype": "float32", "max_num_seqs": 8})
    params = framework.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    return llm.generate(PROMPTS, params, use_tqdm=False)


def test_prompts_ran_as_one_continuous_batch_of_different_lengths(engine_outputs):
    lengths = {len(out.prompt_token_ids) for out in engine_outputs}
    assert len(lengths) >= 6
    assert [out.prompt for out in engine_outputs] == PROMPTS


def test_greedy_tokens_and_logprobs_match_transformers(model_dir, engine_outputs):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for out in engine_outputs:
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            ref = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        ref_tokens = ref.sequences[0, ids.shape[1] :].tolist()
        ref_logprobs = torch.stack([torch.log_softmax(s[0].float(), -1) for s in ref.logits])
        top2 = torch.stack(ref.logits)[:, 0].topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-4, "reference margins too small for a meaningful comparison"

        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens
        ours = torch.tensor([next(iter(lp.values())).logprob for lp in completion.logprobs])
        expected = ref_logprobs[torch.arange(NEW_TOKENS), torch.tensor(ref_tokens)]
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
        assert completion.cumulative_logprob == pytest.approx(float(expected.sum()), abs=1e-3)
        assert completion.finish_reason == "length"
