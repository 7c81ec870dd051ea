"""A step that raises: a stream gets an error event then [DONE], a plain request a 500; serving goes on.

In-process (the app over httpx's ASGI transport) so the engine's step can be
made to fail.
"""

import asyncio
import json

import httpx
import pytest

from framework.config import load_config
from framework.engine.llm_engine import LLMEngine
from framework.entrypoints.openai.api_server import build_app
from framework.entrypoints.openai.cli_args import ServerConfig


@pytest.fixture(scope="module")
def llm_engine(tiny_model_dir):
    return LLMEngine(load_config({"model": str(tiny_model_dir), "max_model_len": 128}))


def _fail_after(llm_engine, monkeypatch, good_steps: int) -> None:
    real_step, calls = llm_engine.step, []

    def step():
        calls.append(1)
        if len(calls) == good_steps + 1:
            raise RuntimeError("injected failure")
        return real_step()

    monkeypatch.setattr(llm_engine, "step", step)


def _run(llm_engine, test):
    async def main():
        app = build_app(llm_engine, ServerConfig(log_stats_interval=0))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as http:
                return await asyncio.wait_for(test(http), 60)

    return asyncio.run(main())


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "a story", "max_tokens": 50, "ignore_eos": True, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "ignore_eos": True,
                              "stream": True}),
])  # fmt: skip
def test_a_stream_that_fails_midway_ends_with_an_error_event_then_done(llm_engine, monkeypatch, path, body):
    _fail_after(llm_engine, monkeypatch, good_steps=3)

    async def test(http):
        response = await http.post(path, json=body)
        assert response.status_code == 200
        events = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "injected failure" in error["message"]
        assert all("error" not in json.loads(e) for e in events[:-2])
        again = await http.post("/v1/completions", json={"prompt": "still there?", "max_tokens": 3})
        assert again.status_code == 200 and (await http.get("/health")).status_code == 200

    _run(llm_engine, test)
    assert llm_engine.kv.pool.usage() == 0


def test_a_plain_request_gets_a_500_with_an_openai_body(llm_engine, monkeypatch):
    _fail_after(llm_engine, monkeypatch, good_steps=0)

    async def test(http):
        response = await http.post("/v1/completions", json={"prompt": "a story", "max_tokens": 5})
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "engine_error"
        assert (await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})).status_code == 200

    _run(llm_engine, test)
