"""A third-party sampler and decoding strategy, registered through ``register_samplers``, chosen per request.

The test plugin registers:
* ``least_likely``: a ``Sampler`` that always takes the least likely token;
* ``second_choice``: a ``DecodingStrategy`` that forks its prompt sequence at
  the first step, gives the fork the second most likely first token, and then
  lets both continue greedily with the standard stop rules.
Both run in one batch with ordinary requests, which must not notice.
"""

from __future__ import annotations

import pytest

import framework
from framework import registry
from framework.interfaces import DecodingStrategy, Sampler
from framework.sampling_metadata import SamplerOutput
from framework.testing import make_tiny_model


class LeastLikely(Sampler):
    name = "least_likely"

    def __call__(self, logits, metadata):
        token_ids = logits.argmin(dim=-1)
        lse = logits.logsumexp(dim=-1, keepdim=True)
        chosen = logits.gather(1, token_ids.unsqueeze(1))
        out = SamplerOutput(token_ids=token_ids, logprobs=(chosen - lse).squeeze(1))
        if metadata.max_num_logprobs:
            out.ranks = (logits > chosen).sum(dim=-1) + 1
            values, out.top_token_ids = logits.topk(metadata.max_num_logprobs, dim=-1)
            out.top_logprobs = values - lse
        return out


class SecondChoice(DecodingStrategy):
    name = "second_choice"
    max_width = 2
    num_top_logprobs = 2

    def step(self, samples):
        if len(self.ops.seqs) == 1:  # first sample: the second most likely token goes to a fork
            (sample,) = samples
            fork = self.ops.fork(sample.seq)
            (first, first_lp), (second, second_lp) = sample.top[:2]
            self.ops.append(sample.seq, first, first_lp, sample=sample)
            self.ops.append(fork, second, second_lp)
            return
        for sample in samples:
            self.ops.append(sample.seq, sample.token_id, sample.logprob, sample=sample)

    def is_finished(self):
        return all(seq.is_finished for seq in self.ops.seqs)

    def outputs(self):
        return list(self.ops.seqs)


class TestPlugin:
    @framework.hookimpl
    def register_samplers(self, register):
        register("least_likely", LeastLikely)
        register("second_choice", SecondChoice)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("llama"))
    pm = registry.plugin_manager()
    plugin = TestPlugin()
    pm.register(plugin, name="test-decoding")
    try:
        llm = framework.build({"model": str(path), "dtype": "float32", "max_model_len": 128})
    finally:
        pm.unregister(plugin)  # the engine keeps what it loaded; nothing leaks into other tests
    entries = llm.engine.registries.samplers.entries
    assert entries["least_likely"].plugin == entries["second_choice"].plugin == "test-decoding"
    return llm


def greedy(**kwargs):
    return framework.SamplingParams(**{"temperature": 0, "max_tokens": 10, "ignore_eos": True, **kwargs})


def test_a_plugin_sampler_is_chosen_per_request(llm):
    prompts = ["Hello there", "The capital of France is"]
    alone = llm.generate(prompts, greedy(), use_tqdm=False)
    mixed = llm.generate(prompts, [greedy(sampler="least_likely", logprobs=1), greedy()], use_tqdm=False)
    vocab = llm.engine.model_config.vocab_size
    odd = mixed[0].outputs[0]
    assert all(entry[token].rank == vocab for token, entry in zip(odd.token_ids, odd.logprobs))
    assert mixed[1].outputs[0].token_ids == alone[1].outputs[0].token_ids  # the standard row is untouched


def test_a_plugin_strategy_forks_sequences(llm):
    prompt = "Once upon a time"
    plain = llm.generate([prompt], greedy(logprobs=2), use_tqdm=False)[0]
    out = llm.generate([prompt, "Hello"], [greedy(strategy="second_choice"), greedy()], use_tqdm=False)[0]
    first, second = out.outputs
    assert first.token_ids == plain.outputs[0].token_ids
    runner_up = sorted(plain.outputs[0].logprobs[0].items(), key=lambda kv: kv[1].rank)[1][0]
    assert second.token_ids[0] == runner_up
    # the fork continues exactly as a fresh request for prompt + that token would
    resumed = llm.generate([plain.prompt_token_ids + [runner_up]], greedy(max_tokens=9), use_tqdm=False)[0]
    assert second.token_ids[1:] == resumed.outputs[0].token_ids
    assert llm.engine.kv.pool.num_free == llm.engine.num_blocks
    with pytest.raises(ValueError, match="SamplingParams.strategy 'least_likely' is not an installed strategy"):
        llm.generate(["x"], greedy(strategy="least_likely"), use_tqdm=False)
