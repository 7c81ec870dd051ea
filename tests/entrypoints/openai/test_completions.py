"""/v1/completions and /v1/models through the official openai client, against offline LLM.generate."""

import openai
import pytest

import framework

PROMPTS = ["Hello, my name is", "The capital of France is", "a b c d e f", "Once upon a time"]


def test_models_list(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == server.model_names
    assert all(m.max_model_len == server.max_model_len and m.owned_by == "framework" for m in models)


def test_greedy_equals_offline_generate_and_usage_counts(client, offline_llm):
    params = framework.SamplingParams(temperature=0, max_tokens=12)
    offline = offline_llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, expected in zip(PROMPTS, offline):
        result = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        choice = result.choices[0]
        assert choice.text == expected.outputs[0].text
        assert choice.finish_reason == expected.outputs[0].finish_reason
        assert result.usage.prompt_tokens == len(expected.prompt_token_ids)
        assert result.usage.completion_tokens == len(expected.outputs[0].token_ids)
        assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
        assert result.model == "tiny" and result.object == "text_completion"


def test_prompt_list_and_token_ids_in_one_request(client, offline_llm):
    tokenizer = offline_llm.get_tokenizer()
    ids = [tokenizer.encode(p) for p in PROMPTS[:2]]
    offline = offline_llm.generate(PROMPTS[:2], framework.SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    for prompt in (PROMPTS[:2], ids):
        result = client.completions.create(model="tiny-alias", prompt=prompt, max_tokens=5, temperature=0)
        assert result.model == "tiny-alias"
        assert [c.index for c in result.choices] == [0, 1]
        assert [c.text for c in result.choices] == [o.outputs[0].text for o in offline]
        assert result.usage.prompt_tokens == sum(len(i) for i in ids)
    single = client.completions.create(model="tiny", prompt=ids[0], max_tokens=5, temperature=0)
    assert single.choices[0].text == offline[0].outputs[0].text


def test_max_tokens_defaults_to_16(client):
    result = client.completions.create(model="tiny", prompt="Hello", extra_body={"ignore_eos": True})
    assert result.usage.completion_tokens == 16 and result.choices[0].finish_reason == "length"


def test_streaming_equals_non_streaming_with_usage(client):
    kwargs = dict(model="tiny", prompt=PROMPTS[1], max_tokens=20, temperature=0)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_echo_returns_the_prompt_first(client):
    plain = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0)
    echoed = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "Hello" + plain.choices[0].text
    streamed = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text


def test_logprobs_match_offline(client, offline_llm):
    offline = offline_llm.generate(
        [PROMPTS[0]], framework.SamplingParams(temperature=0, max_tokens=6, logprobs=3), use_tqdm=False
    )[0].outputs[0]
    result = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3)
    lp = result.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for token_id, entry, logprob, top in zip(offline.token_ids, offline.logprobs, lp.token_logprobs, lp.top_logprobs):
        assert logprob == pytest.approx(entry[token_id].logprob, abs=1e-4)
        assert len(top) >= 3 and max(top.values()) == pytest.approx(logprob, abs=1e-4)  # greedy: the top token
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    streamed = client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3, stream=True
    )
    tokens = [t for c in streamed for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    assert tokens == lp.tokens


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text(client, stream):
    full = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=24, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop.strip()) == 3
    result = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=24, temperature=0, stop=[stop],
                                       stream=stream)  # fmt: skip
    if stream:
        chunks = [c.choices[0] for c in result]
        text, finish = "".join(c.text for c in chunks), chunks[-1].finish_reason
    else:
        text, finish = result.choices[0].text, result.choices[0].finish_reason
    assert text == full[: full.index(stop)] and finish == "stop"


def test_stop_token_ids(client, offline_llm):
    full = offline_llm.generate([PROMPTS[2]], framework.SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    stop_id = full[0].outputs[0].token_ids[3]
    result = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=10, temperature=0,
                                       extra_body={"stop_token_ids": [stop_id]})  # fmt: skip
    choice = result.choices[0]
    assert choice.finish_reason == "stop" and result.usage.completion_tokens <= 4
    assert choice.model_extra["stop_reason"] == stop_id


def test_seed_gives_the_same_sample(client):
    kwargs = dict(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=1.0, top_p=0.9)
    first = client.completions.create(**kwargs, seed=1234).choices[0].text
    assert client.completions.create(**kwargs, seed=1234).choices[0].text == first
    others = {client.completions.create(**kwargs, seed=s).choices[0].text for s in (1, 2, 3)}
    assert others != {first}


def test_sampling_extras_are_passed(client):
    kwargs = dict(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0.8, seed=5)
    a = client.completions.create(**kwargs, extra_body={"top_k": 1}).choices[0].text
    greedy = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text
    assert a == greedy  # top_k=1 is greedy
    b = client.completions.create(**kwargs, extra_body={"min_p": 1.0}).choices[0].text
    assert b == greedy  # min_p=1 keeps only the top token


def test_n_choices(client):
    result = client.completions.create(model="tiny", prompt=["a", "b"], n=2, max_tokens=5, temperature=1.0, seed=3,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    assert sorted(c.index for c in result.choices) == [0, 1, 2, 3]
    assert result.usage.completion_tokens == 4 * 5
    chunks = list(client.completions.create(model="tiny", prompt="a", n=2, max_tokens=5, stream=True))
    assert {ch.index for c in chunks for ch in c.choices} == {0, 1}


def test_logit_bias_is_applied(client, http):
    result = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0,
                                       logit_bias={"300": 100}, logprobs=0)  # fmt: skip
    expected = http.post("/detokenize", json={"tokens": [300]}).json()["prompt"]
    assert result.choices[0].logprobs.tokens == [expected] * 4


def test_min_tokens_holds_back_stop_tokens(client, offline_llm):
    first = offline_llm.generate(["Hello"], framework.SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    stop_id = first[0].outputs[0].token_ids[0]
    kwargs = dict(model="tiny", prompt="Hello", max_tokens=8, temperature=0)
    assert client.completions.create(**kwargs, extra_body={"stop_token_ids": [stop_id]}).usage.completion_tokens == 1
    held = client.completions.create(**kwargs, extra_body={"stop_token_ids": [stop_id], "min_tokens": 4})
    assert held.usage.completion_tokens >= 4


def test_best_of_returns_n_choices(client, http):
    result = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, best_of=3, seed=0)
    assert [c.index for c in result.choices] == [0]
    response = http.post("/v1/completions", json={"prompt": "Hello", "best_of": 3, "stream": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "best_of"


def test_penalties_are_accepted(client):
    for extra in ({"presence_penalty": 1.0}, {"frequency_penalty": 1.5}, {"repetition_penalty": 1.3}):
        result = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, extra_body=extra)
        assert result.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="Hello", presence_penalty=5.0)
    assert info.value.param == "presence_penalty"


def test_echo_with_logprobs_covers_the_prompt(client):
    result = client.completions.create(model="tiny", prompt="Hello there", max_tokens=3, echo=True, logprobs=1,
                                       temperature=0)  # fmt: skip
    lp = result.choices[0].logprobs
    assert len(lp.tokens) == result.usage.prompt_tokens + 3
    assert lp.token_logprobs[0] is None and all(v is not None for v in lp.token_logprobs[1:])


def test_generate_with_beam_search(http):
    response = http.post("/generate", json={"prompt": "Hello", "use_beam_search": True, "n": 2, "best_of": 2,
                                            "temperature": 0, "max_tokens": 4})  # fmt: skip
    assert response.status_code == 200, response.text
    texts = response.json()["text"]
    assert len(texts) == 2 and all(t.startswith("Hello") for t in texts)
