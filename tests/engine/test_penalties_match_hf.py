"""Acceptance: greedy generation under penalties, logit_bias and min_tokens equals transformers' generate.

transformers applies ``repetition_penalty`` (over prompt + generated tokens),
``sequence_bias`` (one-token sequences = logit_bias) and ``min_new_tokens``
itself; presence/frequency penalties have no built-in processor, so a
custom ``LogitsProcessor`` with OpenAI's formula over the generated tokens
stands in.
"""

import collections

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

import framework
from framework.testing import make_tiny_model

PROMPTS = ["The capital of France is", "1 2 3 4 5 6 7 8", "def fib(n):", "Once upon a time, there was"]
NEW = 24


class OpenAIPenalties(LogitsProcessor):
    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for token, count in collections.Counter(input_ids[0, self.prompt_len :].tolist()).items():
            scores[0, token] -= self.frequency * count + self.presence
        return scores


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = make_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("llama"))
    llm = framework.build({"model": str(path), "dtype": "float32", "max_model_len": 128})
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    free = run(llm)
    return llm, hf, [out.outputs[0].token_ids for out in free]


def hf_greedy(hf, prompt_ids, **kwargs):
    ids = torch.tensor([prompt_ids])
    kwargs.setdefault("min_new_tokens", NEW)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW, **kwargs)
    return out[0, ids.shape[1] :].tolist()


def run(llm, **params):
    params = framework.SamplingParams(temperature=0, max_tokens=NEW, **{"ignore_eos": True, **params})
    return llm.generate(PROMPTS, params, use_tqdm=False)


@pytest.mark.parametrize("penalty", [1.5, 0.8])
def test_repetition_penalty(setup, penalty):
    llm, hf, free = setup
    outs = run(llm, repetition_penalty=penalty)
    for out, plain in zip(outs, free):
        assert out.outputs[0].token_ids == hf_greedy(hf, out.prompt_token_ids, repetition_penalty=penalty)
    assert any(out.outputs[0].token_ids != plain for out, plain in zip(outs, free))


@pytest.mark.parametrize("presence, frequency", [(1.5, 0.0), (0.0, 1.0), (-0.5, 0.8)])
def test_presence_and_frequency_penalties(setup, presence, frequency):
    llm, hf, free = setup
    outs = run(llm, presence_penalty=presence, frequency_penalty=frequency)
    for out in outs:
        ids = out.prompt_token_ids
        processors = LogitsProcessorList([OpenAIPenalties(len(ids), presence, frequency)])
        assert out.outputs[0].token_ids == hf_greedy(hf, ids, logits_processor=processors)
    assert any(out.outputs[0].token_ids != plain for out, plain in zip(outs, free))


def test_logit_bias(setup):
    llm, hf, free = setup
    common = collections.Counter(t for tokens in free for t in tokens).most_common(2)
    bias = {common[0][0]: -100.0, common[1][0]: 4.0}  # ban the most frequent token, favour the next
    outs = run(llm, logit_bias=bias)
    for out in outs:
        sequence_bias = {(t,): b for t, b in bias.items()}
        assert out.outputs[0].token_ids == hf_greedy(hf, out.prompt_token_ids, sequence_bias=sequence_bias)
        assert common[0][0] not in out.outputs[0].token_ids


def test_min_tokens_holds_back_stop_tokens(setup):
    llm, hf, free = setup
    # a stop token the free runs produce both early (so min_tokens matters) and late
    early = {t for tokens in free for t in tokens[:8]}
    late = collections.Counter(t for tokens in free for t in tokens[8:] if t in early)
    stop = late.most_common(1)[0][0]
    outs = run(llm, min_tokens=8, stop_token_ids=[stop], ignore_eos=False)
    eos = llm.engine.model_config.eos_token_ids
    for out in outs:
        expected = hf_greedy(hf, out.prompt_token_ids, min_new_tokens=8, eos_token_id=eos + [stop])
        tokens = out.outputs[0].token_ids
        assert tokens == expected[: len(tokens)] and len(tokens) >= 8
        assert len(tokens) == len(expected) or set(expected[len(tokens) :]) <= set(eos + [stop, 2])  # transformers pads
    stopped = [out.outputs[0] for out in outs if out.outputs[0].finish_reason == "stop"]
    assert stopped and all(c.token_ids[-1] == stop and stop not in c.token_ids[:-1] for c in stopped)
