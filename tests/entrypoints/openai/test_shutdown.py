"""SIGTERM: stop accepting, let in-flight requests finish up to --shutdown-timeout, abort the rest, exit.

The server here runs the built-in demo model (no MODEL argument), which is
also what `framework serve` alone gives a user.
"""

import asyncio
import os
import time
from pathlib import Path

import httpx
import pytest

SHUTDOWN_TIMEOUT = 3.0
NUM_LONG = 16  # long streams: far more work than the grace period allows


def _children(pid: int) -> set[int]:
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.add(int(entry.name))
    return children


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def demo_server(launch, tmp_path_factory):
    env = dict(os.environ, FRAMEWORK_CACHE_DIR=str(tmp_path_factory.mktemp("cache")))
    return launch(["--max-model-len", "1024", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)], env=env)


def test_serve_without_a_model_serves_the_demo_model(demo_server):
    models = httpx.get(demo_server.url + "/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["demo-model"]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to list child processes")
def test_sigterm_during_streaming(demo_server):
    url, pid = demo_server.url, demo_server.proc.pid
    children = _children(pid)
    long_body = {"prompt": "a long story", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    short_body = {"prompt": "a short story", "max_tokens": 30, "ignore_eos": True, "stream": True}

    async def stream(http: httpx.AsyncClient, body: dict, started: asyncio.Event) -> bytes:
        received = b""
        try:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for chunk in response.aiter_bytes():
                    received += chunk
                    started.set()
        except httpx.TransportError:
            pass  # the server closed the connection: the request was aborted
        return received

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=64)) as http:
            events = [asyncio.Event() for _ in range(NUM_LONG + 1)]
            tasks = [asyncio.create_task(stream(http, long_body, e)) for e in events[:NUM_LONG]]
            tasks.append(asyncio.create_task(stream(http, short_body, events[NUM_LONG])))
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
            demo_server.terminate()
            sent = time.monotonic()
            await asyncio.sleep(0.5)
            with pytest.raises(httpx.TransportError):  # no longer accepting
                await httpx.AsyncClient(timeout=5).get(url + "/health")
            results = await asyncio.wait_for(asyncio.gather(*tasks), SHUTDOWN_TIMEOUT + 30)
            return sent, results

    sent, results = asyncio.run(main())
    demo_server.proc.wait(timeout=SHUTDOWN_TIMEOUT + 30)
    elapsed = time.monotonic() - sent
    assert elapsed < SHUTDOWN_TIMEOUT + 5, f"exit took {elapsed:.1f} s"
    assert results[-1].endswith(b"data: [DONE]\n\n")  # the short one finished in the grace period
    assert not any(r.endswith(b"data: [DONE]\n\n") for r in results[:-1])  # the long ones were cut off
    assert not any(_alive(child) for child in children | _children(pid))
