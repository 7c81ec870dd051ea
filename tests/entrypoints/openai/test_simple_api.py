"""/generate (vLLM's old simple API), /tokenize, /detokenize, /health, /version."""

import json

import framework


def test_generate_returns_prompt_plus_completion(http, offline_llm):
    expected = offline_llm.generate(["Hello there"], framework.SamplingParams(temperature=0, max_tokens=6),
                                    use_tqdm=False)[0].outputs[0].text  # fmt: skip
    body = {"prompt": "Hello there", "temperature": 0, "max_tokens": 6}
    response = http.post("/generate", json=body)
    assert response.status_code == 200 and response.json() == {"text": ["Hello there" + expected]}
    streamed = http.post("/generate", json={**body, "stream": True})
    messages = [json.loads(part) for part in streamed.content.decode().split("\0") if part]
    texts = [m["text"][0] for m in messages]
    assert texts[-1] == "Hello there" + expected and all(texts[-1].startswith(t) for t in texts)


def test_generate_takes_sampling_params_fields(http):
    body = {"prompt": "Hello there", "temperature": 0.9, "seed": 3, "max_tokens": 6, "top_k": 5, "stop": ["zz"],
            "ignore_eos": True}  # fmt: skip
    first = http.post("/generate", json=body).json()
    assert first == http.post("/generate", json=body).json()


def test_generate_reads_json_sent_as_a_form(http):
    """`curl URL/generate -d '{...}'`, as the tutorials type it, sends Content-Type
    application/x-www-form-urlencoded; vLLM's /generate reads the body as JSON anyway, and so do we."""
    body = {"prompt": "San Francisco is a", "use_beam_search": True, "n": 4, "temperature": 0, "max_tokens": 6}
    expected = http.post("/generate", json=body)
    assert expected.status_code == 200 and len(expected.json()["text"]) == 4
    for content_type in ("application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        response = http.post("/generate", content=json.dumps(body).encode(), headers=headers)
        assert response.status_code == 200 and response.json() == expected.json()
    bad = http.post("/generate", content=b"prompt=hi", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    # the OpenAI routes keep requiring JSON
    form = http.post("/v1/completions", content=json.dumps({"prompt": "hi"}).encode(),
                     headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert form.status_code == 400


def test_tokenize_and_detokenize(http, offline_llm, server):
    tokenizer = offline_llm.get_tokenizer()
    result = http.post("/tokenize", json={"prompt": "Hello there"}).json()
    assert result["tokens"] == tokenizer.encode("Hello there") and result["count"] == len(result["tokens"])
    assert result["max_model_len"] == server.max_model_len
    plain = http.post("/tokenize", json={"prompt": "Hello there", "add_special_tokens": False}).json()
    assert plain["tokens"] == tokenizer.encode("Hello there", add_special_tokens=False)
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    assert chat["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
    assert http.post("/detokenize", json={"tokens": plain["tokens"]}).json() == {"prompt": "Hello there"}


def test_health_and_version(http):
    assert http.get("/health").status_code == 200
    assert http.get("/version").json() == {"version": framework.__version__}
