"""Prefix caching over HTTP: the counters in /metrics, cache_salt, and POST /reset_prefix_cache behind the key.

In-process (the app over httpx's ASGI transport), like test_engine_failure.
"""

import asyncio

import httpx
import pytest

from framework.config import load_config
from framework.engine.llm_engine import LLMEngine
from framework.entrypoints.openai.api_server import build_app
from framework.entrypoints.openai.cli_args import ServerConfig

KEY = "sk-admin"
PROMPT = list(range(40, 140))  # 100 tokens: 6 full blocks of 16 can be shared, the 7th is computed
SHARED = 96
COUNTERS = ("prefix_cache_queries_total", "prefix_cache_hits_total", "num_preemptions_total")


@pytest.fixture(scope="module")
def llm_engine(tiny_model_dir):
    return LLMEngine(load_config({"model": str(tiny_model_dir), "max_model_len": 256, "enable_prefix_caching": True}))


def _run(llm_engine, test):
    async def main():
        app = build_app(llm_engine, ServerConfig(api_key=KEY, log_stats_interval=0))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            headers = {"Authorization": f"Bearer {KEY}"}
            async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers, timeout=30) as http:
                return await asyncio.wait_for(test(http, app), 60)

    return asyncio.run(main())


async def _counters(http) -> tuple[float, ...]:
    text = (await http.get("/metrics")).text
    values = {}
    for line in text.splitlines():
        if line.startswith("framework:") and 'model_name="' in line:
            name, _, value = line.rpartition(" ")
            values[name.split("{")[0].removeprefix("framework:")] = float(value)
    return tuple(values[name] for name in COUNTERS)


async def _complete(http, **extra) -> None:
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, **extra}
    response = await http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text


def test_counters_salt_and_reset(llm_engine):
    async def test(http, app):
        start = await _counters(http)

        async def delta():
            return tuple(a - b for a, b in zip(await _counters(http), start))

        await _complete(http)
        assert await delta() == (100, 0, 0)
        await _complete(http)  # the second time, six blocks come from the cache
        assert await delta() == (200, SHARED, 0)
        await _complete(http, cache_salt="tenant-a")  # another salt: nothing shared
        assert await delta() == (300, SHARED, 0)
        await _complete(http, cache_salt="tenant-a")
        assert await delta() == (400, 2 * SHARED, 0)
        bad = await http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "cache_salt": ""})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt"

        # the admin call needs the key
        async with httpx.AsyncClient(transport=http._transport, base_url="http://t") as anonymous:
            assert (await anonymous.post("/reset_prefix_cache")).status_code == 401
        assert (await http.post("/reset_prefix_cache")).status_code == 200
        await _complete(http)  # forgotten: computed again
        assert await delta() == (500, 2 * SHARED, 0)
        line = app.state.metrics.stats_line()
        assert f"Prefix cache hit rate: {100 * 2 * SHARED / 500:.1f}%" in line and "Preemptions: 0" in line
        assert "KV slots used: 0/0 allocated" in line

    _run(llm_engine, test)
    assert llm_engine.kv.pool.usage() == 0
