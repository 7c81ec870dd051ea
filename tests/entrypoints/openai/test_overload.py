"""A low queue bound: 200 concurrent requests each end in exactly one bucket, and none hangs."""

import asyncio
import collections
import time

import httpx
import pytest


MAX_QUEUED = 4
CHAT_TEMPLATE = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"


@pytest.fixture(scope="module")
def busy_server(launch, tiny_model_dir):
    return launch([str(tiny_model_dir), "--max-model-len", "128", "--max-num-seqs", "2",
                   "--max-queued-requests", str(MAX_QUEUED), "--log-stats-interval", "0.5",
                   "--chat-template", CHAT_TEMPLATE])  # fmt: skip


def _body(i: int) -> tuple[str, dict]:
    if i % 10 == 9:
        return "/v1/completions", {"prompt": "x", "temperature": -1}  # invalid: 400
    if i % 2:
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 8,
                                        "stream": i % 4 == 1}  # fmt: skip
    return "/v1/completions", {"prompt": f"request {i}", "max_tokens": 8, "stream": i % 4 == 0}


async def _send(http: httpx.AsyncClient, i: int) -> str:
    path, body = _body(i)
    async with http.stream("POST", path, json=body) as response:
        content = await response.aread()
    if response.status_code == 503:
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "server_overloaded"
        return "rejected"
    if 400 <= response.status_code < 500:
        assert response.json()["error"]["param"] == "temperature"
        return "client error"
    assert response.status_code == 200, content
    if body.get("stream"):
        assert content.endswith(b"data: [DONE]\n\n") and b'"error"' not in content
    return "completed"


def test_200_concurrent_requests_each_end_in_one_bucket(busy_server):
    async def main():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=busy_server.url, timeout=60, limits=limits) as http:
            return await asyncio.wait_for(asyncio.gather(*(_send(http, i) for i in range(200))), 120)

    buckets = collections.Counter(asyncio.run(main()))
    assert sum(buckets.values()) == 200
    assert buckets["client error"] == 20
    assert buckets["completed"] >= MAX_QUEUED and buckets["rejected"] > 0, buckets
    busy_server.wait_until_idle()
    time.sleep(1.0)  # one more stats line
    assert "Avg generation throughput" in busy_server.log_tail(20000)
    # the server still serves after the storm
    assert httpx.post(busy_server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30).status_code == 200


def test_a_request_with_n_counts_n(busy_server):
    response = httpx.post(busy_server.url + "/v1/completions", json={"prompt": "x", "n": MAX_QUEUED + 1}, timeout=30)
    assert response.status_code == 503 and response.headers["retry-after"]
    assert httpx.post(busy_server.url + "/v1/completions", json={"prompt": "x", "n": 2}, timeout=30).status_code == 200


def test_chat_template_flag(busy_server):
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    tokens = httpx.post(busy_server.url + "/tokenize", json=body, timeout=30).json()["tokens"]
    text = httpx.post(busy_server.url + "/detokenize", json={"tokens": tokens}, timeout=30).json()["prompt"]
    assert text == "[hi][yo]"
