"""Acceptance: beam search returns transformers' sequences, in transformers' order.

Oracle: ``generate(num_beams=k, do_sample=False, num_return_sequences=k)``
with the same ``length_penalty`` and ``early_stopping``, on the same files.
The tiny random models rarely emit EOS, so a token they emit often is made a
stop token on both sides (``stop_token_ids`` here, an extra
``eos_token_id`` there); the test checks that hypotheses really end on it as
well as on the length limit, so both ways a beam finishes are compared.
"""

import collections
import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

import framework
from framework.testing import make_tiny_model

PROMPTS = ["Hello there", "The capital of France is", "def fib(n):"]
# (length_penalty, early_stopping): the three stop rules, with length penalties of each sign
SETTINGS = [(1.0, False), (0.0, True), (2.0, "never"), (-0.5, "never")]
MAX_TOKENS = 10


@pytest.fixture(scope="module", params=["LlamaForCausalLM", "Qwen2ForCausalLM"])
def setup(request, tmp_path_factory):
    path = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    llm = framework.build({"model": str(path), "dtype": "float32", "max_model_len": 128})
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    greedy = llm.generate(PROMPTS, framework.SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    frequent = collections.Counter(t for out in greedy for t in out.outputs[0].token_ids).most_common(1)[0][0]
    return llm, hf, frequent


def hf_beams(hf, prompt_ids, k, length_penalty, early_stopping, eos):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        ref = hf.generate(
            ids, attention_mask=torch.ones_like(ids), num_beams=k, do_sample=False, num_return_sequences=k,
            max_new_tokens=MAX_TOKENS, length_penalty=length_penalty, early_stopping=early_stopping,
            eos_token_id=eos, output_scores=True, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    lengths = (ref.beam_indices >= 0).sum(dim=1).tolist()  # generated tokens of each returned beam
    start = ids.shape[1]
    return [ref.sequences[i, start : start + n].tolist() for i, n in enumerate(lengths)], ref.sequences_scores


@pytest.mark.parametrize("width", [2, 4])
def test_beam_search_matches_transformers(setup, width):
    llm, hf, stop_token = setup
    eos = llm.engine.model_config.eos_token_ids
    endings = collections.Counter()
    for (length_penalty, early_stopping), prompt in itertools.product(SETTINGS, PROMPTS):
        params = framework.SamplingParams(
            n=width, use_beam_search=True, temperature=0, length_penalty=length_penalty,
            early_stopping=early_stopping, max_tokens=MAX_TOKENS, stop_token_ids=[stop_token],
        )  # fmt: skip
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        case = (length_penalty, early_stopping, prompt)
        ref_tokens, ref_scores = hf_beams(hf, out.prompt_token_ids, width, *case[:2], eos + [stop_token])
        assert [c.token_ids for c in out.outputs] == ref_tokens, case
        assert [c.index for c in out.outputs] == list(range(width))
        scores = [c.cumulative_logprob / len(c.token_ids) ** length_penalty for c in out.outputs]
        # transformers sums in float32: about 1e-7 relative per step
        torch.testing.assert_close(torch.tensor(scores), ref_scores.float(), atol=1e-4, rtol=1e-5)
        for c in out.outputs:
            endings[c.finish_reason] += 1
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in set(eos) | {stop_token}
                assert c.stop_reason == (stop_token if c.token_ids[-1] == stop_token else None)
    assert endings["stop"] > 0 and endings["length"] > 0, endings
    assert llm.engine.kv.pool.num_free == llm.engine.num_blocks
