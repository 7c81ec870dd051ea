"""/v1/chat/completions through the official openai client, against offline LLM.chat."""

import pytest

import framework

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "tell me a story"},
]


def test_chat_equals_offline_chat_with_usage(client, offline_llm):
    expected = offline_llm.chat(MESSAGES, framework.SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    result = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=10, temperature=0)
    choice = result.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert result.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert result.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")


def test_max_tokens_and_max_completion_tokens(client):
    by_old = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, extra_body={"ignore_eos": True})
    by_new = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=5,
                                            extra_body={"ignore_eos": True})  # fmt: skip
    assert (by_old.usage.completion_tokens, by_new.usage.completion_tokens) == (3, 5)


def test_text_parts_equal_a_string(client):
    parts = [{"type": "text", "text": "tell me"}, {"type": "text", "text": "a story"}]
    as_parts = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}],
                                              max_tokens=6, temperature=0)  # fmt: skip
    as_text = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "tell me\na story"}],
                                             max_tokens=6, temperature=0)  # fmt: skip
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens


def test_streaming_starts_with_the_role_and_equals_non_streaming(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_logprobs_with_top_logprobs(client, offline_llm):
    expected = offline_llm.chat(MESSAGES, framework.SamplingParams(temperature=0, max_tokens=5, logprobs=2),
                                use_tqdm=False)[0].outputs[0]  # fmt: skip
    result = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=2)  # fmt: skip
    content = result.choices[0].logprobs.content
    assert len(content) == 5
    for item, token_id, entry in zip(content, expected.token_ids, expected.logprobs):
        assert item.logprob == pytest.approx(entry[token_id].logprob, abs=1e-4)
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.top_logprobs[0].token == item.token  # greedy picks the best
        assert bytes(item.bytes).decode(errors="replace") == item.token
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, logprobs=True)
    assert all(item.top_logprobs == [] for item in plain.choices[0].logprobs.content)
    streamed = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                              logprobs=True, top_logprobs=2, stream=True)  # fmt: skip
    tokens = [i.token for c in streamed if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert tokens == [i.token for i in content]


def test_stop_and_seed(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=20, temperature=1.0, seed=42)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    assert client.chat.completions.create(**kwargs).choices[0].message.content == first
    stop = first[4:6]
    if stop.strip():
        cut = client.chat.completions.create(**kwargs, stop=stop).choices[0]
        assert cut.message.content == first[: first.index(stop)] and cut.finish_reason == "stop"


def test_n_choices(client):
    result = client.chat.completions.create(model="tiny", messages=MESSAGES, n=2, max_tokens=4, seed=1)
    assert [c.index for c in result.choices] == [0, 1]
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, n=2, max_tokens=4, stream=True))
    assert {ch.index for c in chunks for ch in c.choices} == {0, 1}
