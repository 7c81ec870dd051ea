"""Bad input gets a clear error, and the engine keeps working."""

import json

import pytest

import framework
from framework.testing import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return framework.build({"model": str(model_dir), "max_model_len": 64})


GREEDY = framework.SamplingParams(temperature=0, max_tokens=4)


def test_prompt_longer_than_max_model_len_names_both_numbers(llm):
    with pytest.raises(ValueError, match=r"100 tokens long.*max_model_len is 64"):
        llm.generate([[5] * 100], GREEDY, use_tqdm=False)
    # a bad prompt in a list rejects the whole call and leaves nothing queued
    with pytest.raises(ValueError):
        llm.generate([[5] * 10, [5] * 100], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(["still works"], GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_out_of_vocabulary_token_ids_are_rejected(llm):
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(ValueError, match=rf"token id {vocab} is out of range.*{vocab} tokens"):
        llm.generate([[1, vocab]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY, use_tqdm=False)


def test_max_model_len_that_cannot_fit_the_kv_pool_fails_at_start(model_dir, llm):
    block_bytes = llm.engine.runner.kv_block_bytes()
    with pytest.raises(ValueError) as err:
        framework.build({"model": str(model_dir), "max_model_len": 1024, "kv_cache_memory": 4 * block_bytes})
    message = str(err.value)
    assert "max_model_len=1024" in message and "4 blocks" in message and "64 tokens" in message
    assert "kv_cache_memory" in message and "gpu_memory_utilization" in message


def test_max_model_len_beyond_the_model_is_an_error(model_dir):
    with pytest.raises(ValueError, match="max_model_len=4096 exceeds the model's maximum length 2048"):
        framework.build({"model": str(model_dir), "max_model_len": 4096})


def test_unknown_architecture_lists_installed_ones(model_dir, tmp_path):
    for item in model_dir.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["NoSuchForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"NoSuchForCausalLM.*installed architectures:.*LlamaForCausalLM"):
        framework.build({"model": str(tmp_path)})


def test_unknown_config_key_is_an_error(model_dir):
    with pytest.raises(ValueError, match="max_num_sequences"):
        framework.build({"model": str(model_dir), "max_num_sequences": 8})


def test_missing_model_directory_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        framework.build({"model": str(tmp_path)})


@pytest.mark.parametrize(
    "kwargs, field, limit",
    [
        ({"temperature": -0.5}, "temperature", ">= 0"),
        ({"top_p": 0.0}, "top_p", r"\(0, 1\]"),
        ({"top_p": 1.5}, "top_p", r"\(0, 1\]"),
        ({"top_k": -2}, "top_k", ">= 1"),
        ({"min_p": 2.0}, "min_p", r"\[0, 1\]"),
        ({"max_tokens": 0}, "max_tokens", ">= 1"),
        ({"logprobs": -1}, "logprobs", ">= 0"),
        ({"prompt_logprobs": -1}, "prompt_logprobs", ">= 0"),
        ({"stop": [""]}, "stop", "non-empty"),
        ({"n": 0}, "n", ">= 1"),
        ({"n": 3, "best_of": 2}, "best_of", ">= n=3"),
        ({"presence_penalty": 2.5}, "presence_penalty", r"\[-2, 2\]"),
        ({"frequency_penalty": -3}, "frequency_penalty", r"\[-2, 2\]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty", "> 0"),
        ({"logit_bias": {5: 101}}, "logit_bias", r"\[-100, 100\]"),
        ({"logit_bias": {-1: 1}}, "logit_bias", ">= 0"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
        ({"min_tokens": -1}, "min_tokens", ">= 0"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens", "<= max_tokens=4"),
        ({"temperature": 0, "n": 2}, "n", "must be 1 for greedy"),
        ({"use_beam_search": True, "n": 1, "temperature": 0}, "best_of", "> 1 with use_beam_search"),
        ({"use_beam_search": True, "n": 2}, "temperature", "must be 0 with use_beam_search"),
        ({"use_beam_search": True, "n": 2, "temperature": 0, "top_k": 5}, "top_k", "-1"),
        ({"use_beam_search": True, "n": 2, "temperature": 0, "early_stopping": "x"}, "early_stopping", "'never'"),
        ({"early_stopping": True}, "early_stopping", "must be False without use_beam_search"),
        ({"length_penalty": 2.0}, "length_penalty", "must be 1.0 without use_beam_search"),
        ({"use_beam_search": True, "n": 2, "temperature": 0, "strategy": "parallel"}, "strategy", "beam_search"),
    ],
)
def test_invalid_sampling_values_name_field_and_limit(kwargs, field, limit):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} .*{limit}"):
        framework.SamplingParams(**kwargs)


def test_valid_values_are_accepted_and_normalised():
    params = framework.SamplingParams(n=2, best_of=3, logit_bias={"7": -100}, seed=1)
    assert params.logit_bias == {7: -100.0} and params.strategy_name == "parallel"
    beam = framework.SamplingParams(use_beam_search=True, n=4, temperature=0, early_stopping="never", length_penalty=2)
    assert beam.best_of == 4 and beam.strategy_name == "beam_search"
    assert framework.SamplingParams(n=3).best_of == 3


def test_limits_that_depend_on_the_engine(llm, model_dir):
    vocab = llm.engine.model_config.vocab_size
    cases = [
        (framework.SamplingParams(logprobs=21), r"SamplingParams\.logprobs must be in \[0, 20\]"),
        (framework.SamplingParams(prompt_logprobs=21), r"SamplingParams\.prompt_logprobs must be in \[0, 20\]"),
        (framework.SamplingParams(logit_bias={vocab: 1}), rf"SamplingParams\.logit_bias token id {vocab} is out of"),
        (framework.SamplingParams(stop_token_ids=[vocab + 5]), r"SamplingParams\.stop_token_ids token id"),
        (framework.SamplingParams(sampler="nope"), r"SamplingParams\.sampler 'nope' .*installed: standard"),
        (framework.SamplingParams(strategy="standard"), r"SamplingParams\.strategy 'standard' .*beam_search, parallel"),
        (framework.SamplingParams(n=300), r"SamplingParams\.best_of=300: .*needs 300 .*max_num_seqs=256"),
    ]
    for params, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate(["x"], params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    wide = framework.build({"model": str(model_dir), "max_model_len": 64, "max_logprobs": 30})
    out = wide.generate(["x"], framework.SamplingParams(logprobs=25, max_tokens=1), use_tqdm=False)[0]
    assert len(out.outputs[0].logprobs[0]) >= 25
