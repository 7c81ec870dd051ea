"""A worker killed mid-generation: requests fail with a clear error within seconds, the engine
reports itself dead (``/health`` reads ``is_running``), and no worker process is left."""

import asyncio
import os
import signal
import time

import pytest

import framework
from framework.config import load_config
from framework.distributed import WorkerDiedError
from framework.engine.async_engine import AsyncLLMEngine, EngineDeadError
from framework.engine.llm_engine import LLMEngine

from .conftest import engine_settings

LONG = framework.SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


@pytest.mark.parametrize("parallel", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}], ids=["tp2", "pp2"])
def test_killed_worker_fails_requests_and_marks_the_engine_dead(parallel_models, parallel):
    """TP: the driver waits in a collective; PP: in the receive of a batch's logits, with batches in flight."""
    llm_engine = LLMEngine(load_config(engine_settings(parallel_models["llama"], **parallel)))
    worker = llm_engine.runner.procs[1]

    async def main():
        engine = AsyncLLMEngine(llm_engine)
        engine.start()
        try:
            streams = [engine.add_request("Hello, my name is", LONG) for _ in range(3)]
            await streams[0].admitted()
            first = await asyncio.wait_for(streams[0].__anext__(), 30)  # generation is under way
            assert len(first.outputs[0].token_ids) >= 1 and engine.is_running
            os.kill(worker.pid, signal.SIGKILL)
            killed = time.monotonic()
            for stream in streams:
                with pytest.raises(
                    EngineDeadError,
                    match=r"worker rank 1 \(pid \d+\) died: killed by signal 9",
                ):
                    await asyncio.wait_for(_drain(stream), 10)
            assert time.monotonic() - killed < 5
            assert not engine.is_running  # /health answers 503
            with pytest.raises(EngineDeadError, match="rank 1"):
                engine.add_request("new", LONG)
        finally:
            await engine.shutdown()  # also stops the workers of the parallel engine

    try:
        asyncio.run(main())
        assert isinstance(llm_engine.dead_error, WorkerDiedError)
        with pytest.raises(WorkerDiedError, match="rank 1"):
            llm_engine.runner.execute(None)  # every later step refuses at once
    finally:
        llm_engine.shutdown()
    assert worker.returncode == -signal.SIGKILL
    assert all(p.poll() is not None for p in llm_engine.runner.procs.values())  # no worker left behind


async def _drain(stream):
    async for _ in stream:
        pass
