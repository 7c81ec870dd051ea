"""/metrics: vLLM's dashboard names under `framework:`, counting what the responses report."""

NAMES = [
    "framework:num_requests_running", "framework:num_requests_waiting", "framework:kv_cache_usage_perc",
    "framework:prompt_tokens_total", "framework:generation_tokens_total",
    "framework:time_to_first_token_seconds_count", "framework:time_per_output_token_seconds_count",
    "framework:e2e_request_latency_seconds_count", "framework:prefix_cache_queries_total",
    "framework:prefix_cache_hits_total", "framework:num_preemptions_total",
]  # fmt: skip


def _value(metrics: dict, name: str, label: str = "") -> float:
    return sum(v for k, v in metrics.items() if k.split("{")[0] == name and label in k)


def test_metrics_count_tokens_requests_and_latencies(server, client):
    before = server.metrics()
    result = client.completions.create(model="tiny", prompt="count me", max_tokens=7, extra_body={"ignore_eos": True})
    server.wait_until_idle()
    after = server.metrics()
    for name in NAMES:
        assert any(k.split("{")[0] == name for k in after), name
    delta = {name: _value(after, name) - _value(before, name) for name in NAMES}
    assert delta["framework:prompt_tokens_total"] == result.usage.prompt_tokens
    assert delta["framework:generation_tokens_total"] == result.usage.completion_tokens == 7
    assert delta["framework:time_to_first_token_seconds_count"] == 1
    assert delta["framework:e2e_request_latency_seconds_count"] == 1
    assert delta["framework:time_per_output_token_seconds_count"] == 6  # one per token after the first
    # prefix caching is on by default: the prompt is looked up (shorter than a block, it cannot hit)
    assert delta["framework:prefix_cache_queries_total"] == result.usage.prompt_tokens
    assert delta["framework:prefix_cache_hits_total"] == 0
    success = "framework:request_success_total"
    assert _value(after, success, 'finished_reason="length"') - _value(before, success, 'finished_reason="length"') == 1
    assert all('model_name="tiny"' in k for k in after if k.startswith("framework:"))


def test_metrics_text_format(server):
    import httpx

    response = httpx.get(server.url + "/metrics", timeout=10)
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE framework:time_to_first_token_seconds histogram" in response.text
    assert "# TYPE framework:num_requests_running gauge" in response.text
