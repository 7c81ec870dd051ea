"""Many requests at once; client disconnects abort at once and free every KV block."""

import asyncio

import httpx
import openai
import pytest

TIMEOUT = 120.0


@pytest.fixture(scope="module", params=["default", "async-scheduling"])
def serving(request, server, launch, tiny_model_dir):
    """The shared server, and one with ``--async-scheduling`` (the CUDA default, off on this CPU)."""
    if request.param == "default":
        return server
    args = [str(tiny_model_dir), "--max-model-len", str(server.max_model_len), "--api-key", server.api_key,
            "--served-model-name", *server.model_names, "--async-scheduling"]  # fmt: skip
    srv = launch(args)
    assert "async scheduling on" in srv.log_tail(1 << 20)
    srv.api_key, srv.model_names, srv.max_model_len = server.api_key, server.model_names, server.max_model_len
    return srv


def _abort_count(server) -> float:
    return sum(v for k, v in server.metrics().items()
               if k.startswith("framework:request_success_total") and 'finished_reason="abort"' in k)  # fmt: skip


def test_64_concurrent_requests_streaming_and_not_all_complete(serving):
    async def one(aclient: openai.AsyncOpenAI, i: int) -> int:
        max_tokens = 4 + i % 13
        extra = {"ignore_eos": True}
        if i % 4 == 0:
            stream = await aclient.completions.create(model="tiny", prompt=f"request {i}", max_tokens=max_tokens,
                                                      stream=True, extra_body=extra)  # fmt: skip
            text = [c.choices[0].finish_reason async for c in stream if c.choices]
            assert text[-1] == "length"
        elif i % 4 == 1:
            stream = await aclient.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=max_tokens,
                stream=True, stream_options={"include_usage": True}, extra_body=extra,
            )  # fmt: skip
            chunks = [c async for c in stream]
            assert chunks[-1].usage.completion_tokens == max_tokens
        elif i % 4 == 2:
            result = await aclient.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=max_tokens,
                extra_body=extra,
            )  # fmt: skip
            assert result.usage.completion_tokens == max_tokens
        else:
            result = await aclient.completions.create(model="tiny", prompt=f"request {i}", max_tokens=max_tokens,
                                                      extra_body=extra)  # fmt: skip
            assert result.usage.completion_tokens == max_tokens
        return i

    async def main():
        aclient = openai.AsyncOpenAI(
            base_url=serving.url + "/v1", api_key=serving.api_key, max_retries=0, timeout=60
        )
        async with aclient:
            return await asyncio.wait_for(asyncio.gather(*(one(aclient, i) for i in range(64))), TIMEOUT)

    assert sorted(asyncio.run(main())) == list(range(64))
    serving.wait_until_idle()


def test_closed_streams_are_aborted_and_free_their_blocks(serving):
    before = _abort_count(serving)
    prompts = [f"a long story {i}" for i in range(16)]  # one stream, 16 engine requests: seconds of work

    async def main():
        headers = {"Authorization": f"Bearer {serving.api_key}"}
        body = {"model": "tiny", "prompt": prompts, "max_tokens": 240, "ignore_eos": True, "stream": True}
        async with httpx.AsyncClient(base_url=serving.url, headers=headers, timeout=30) as http:

            async def read_two_events_then_leave():
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    events = 0
                    async for line in response.aiter_lines():
                        events += line.startswith("data: ")
                        if events == 2:
                            return  # closes the connection mid-stream

            await asyncio.wait_for(asyncio.gather(*(read_two_events_then_leave() for _ in range(4))), TIMEOUT)

    asyncio.run(main())
    serving.wait_until_idle()
    assert _abort_count(serving) - before == 4 * len(prompts)


def test_a_non_streaming_client_that_leaves_aborts_its_request(serving):
    before = _abort_count(serving)
    prompts = [f"prompt {i}" for i in range(64)]  # ~2 s of work for the tiny model on a CPU
    body = {"model": "tiny", "prompt": prompts, "max_tokens": 250, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(serving.url + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.3),
                   headers={"Authorization": f"Bearer {serving.api_key}"})  # fmt: skip
    serving.wait_until_idle()
    assert _abort_count(serving) - before == len(prompts)
