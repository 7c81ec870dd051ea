"""Invalid requests: each gets its status and an OpenAI error body naming the parameter."""


import httpx
import openai
import pytest


C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]

CASES = [
    # (path, JSON body or raw bytes, status, param)
    (C, b'{"prompt": "x",', 400, None),
    (C, b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    (C, {"prompt": "x", "max_tokens": "lots"}, 400, "max_tokens"),
    (C, {"prompt": 5}, 400, "prompt"),
    (C, {"max_tokens": 3}, 400, "prompt"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    (C, {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    (CHAT, {"messages": USER, "temperature": -1}, 400, "temperature"),
    (C, {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    (C, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    (C, {"prompt": "x", "top_k": -5}, 400, "top_k"),
    (C, {"prompt": "x", "n": 1000}, 400, "n"),
    (C, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    (C, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": USER, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (C, {"prompt": "x", "stop": [""]}, 400, "stop"),
    (C, {"prompt": "x", "seed": 2**70}, 400, "seed"),
    (C, {"prompt": "word " * 300}, 400, "prompt"),
    (C, {"prompt": list(range(10, 310))}, 400, "prompt"),
    (CHAT, {"messages": [{"role": "user", "content": "word " * 300}]}, 400, "messages"),
    (C, {"prompt": []}, 400, "prompt"),
    (C, {"prompt": [100000]}, 400, "prompt"),
    (C, {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    (CHAT, {"messages": USER, "model": "gpt-4"}, 404, "model"),
    (C, {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages"),  # fmt: skip
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("/generate", {"prompt": "x", "bogus": 1}, 400, "bogus"),
    ("/generate", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/detokenize", {"tokens": [10**6]}, 400, "tokens"),
    ("/tokenize", {}, 400, "prompt"),
]


def _post(http: httpx.Client, path: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return http.post(path, content=body, headers={"Content-Type": "application/json"})
    return http.post(path, json=body)


def _assert_error(response: httpx.Response, status: int, param) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    return error


def _assert_still_serving(http: httpx.Client) -> None:
    response = http.post(C, json={"prompt": "ok", "max_tokens": 1})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path,body,status,param", CASES, ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_invalid_request_gets_an_openai_error(http, path, body, status, param):
    error = _assert_error(_post(http, path, body), status, param)
    assert error["type"] == "invalid_request_error"
    _assert_still_serving(http)


def test_the_openai_client_sees_the_error_fields(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", temperature=-1)
    assert info.value.status_code == 400 and info.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=USER)
    assert info.value.code == "model_not_found"


def test_api_key_protects_every_route_but_health_version_metrics(server):
    for path in ("/health", "/version", "/metrics"):
        assert httpx.get(server.url + path, timeout=10).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": server.api_key}):
        for method, path in (("GET", "/v1/models"), ("POST", C), ("POST", CHAT), ("POST", "/generate"),
                             ("POST", "/tokenize"), ("GET", "/openapi.json"), ("GET", "/nowhere")):  # fmt: skip
            response = httpx.request(method, server.url + path, headers=headers, json={"prompt": "x"}, timeout=10)
            error = _assert_error(response, 401, None)
            assert error["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(server.url + "/version", timeout=10).json()["version"]


def test_unknown_route_and_method_are_openai_errors(http):
    _assert_error(http.get("/v1/nowhere"), 404, None)
    _assert_error(http.get(C), 405, None)
