"""Stop rules and incremental detokenization, checked against the tokenizer itself."""

import pytest

import framework
from framework.testing import make_tiny_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_tiny_model("Qwen2ForCausalLM", tmp_path_factory.mktemp("qwen2"))
    return framework.build({"model": str(path), "max_model_len": 128})


def greedy(**kwargs):
    return framework.SamplingParams(temperature=0, **{"max_tokens": 24, "ignore_eos": True, **kwargs})


@pytest.fixture(scope="module")
def free_run(llm):
    """The unconstrained greedy continuation that the stop tests cut."""
    return llm.generate(["Tell me a story about"], greedy(), use_tqdm=False)[0].outputs[0]


def test_incremental_text_equals_decoding_all_tokens(llm, free_run):
    tok = llm.get_tokenizer()
    assert free_run.text == tok.decode(free_run.token_ids, skip_special_tokens=True)
    assert free_run.finish_reason == "length" and len(free_run.token_ids) == 24


def test_stop_token_id_ends_and_is_kept(llm, free_run):
    stop_id = free_run.token_ids[5]
    first = free_run.token_ids.index(stop_id)
    out = llm.generate(["Tell me a story about"], greedy(stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free_run.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_stop_string_cuts_the_text(llm, free_run):
    text = free_run.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.index(stop)
    out = llm.generate(["Tell me a story about"], greedy(stop=stop), use_tqdm=False)[0].outputs[0]
    assert out.text == text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate(["Tell me a story about"], greedy(stop=[stop], include_stop_str_in_output=True), use_tqdm=False)
    assert kept[0].outputs[0].text == text[: cut + len(stop)]


def test_eos_stops_unless_ignored(llm, free_run):
    eos = llm.engine.model_config.eos_token_ids
    assert eos, "generation_config.json gives the EOS id"
    # Make the model's own 4th greedy token count as EOS by declaring it so in the engine.
    llm.engine.outputs.eos_token_ids = {free_run.token_ids[3]}
    try:
        out = llm.generate(["Tell me a story about"], greedy(ignore_eos=False), use_tqdm=False)[0].outputs[0]
        assert out.token_ids == free_run.token_ids[: free_run.token_ids.index(free_run.token_ids[3]) + 1]
        assert out.finish_reason == "stop" and out.stop_reason is None
        again = llm.generate(["Tell me a story about"], greedy(), use_tqdm=False)[0].outputs[0]
        assert again.token_ids == free_run.token_ids  # ignore_eos=True
    finally:
        llm.engine.outputs.eos_token_ids = set(eos)


def test_generation_stops_at_max_model_len(llm):
    prompt = list(range(5, 125))  # 120 tokens, max_model_len 128
    out = llm.generate([prompt], greedy(max_tokens=100), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_logprobs_report_top_tokens_with_ranks(llm, free_run):
    out = llm.generate(["Tell me a story about"], greedy(logprobs=3, max_tokens=4), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and entry[token].rank == 1  # greedy picks the top token
        ranks = sorted(lp.rank for lp in entry.values())
        assert ranks == [1, 2, 3]
        values = sorted((lp.logprob for lp in entry.values()), reverse=True)
        assert values[0] <= 0 and values == sorted(values, reverse=True)
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))
