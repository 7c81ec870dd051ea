"""AsyncLLMEngine in-process: streams, aborts, bad prompts, failing steps, queue bound, shutdown."""

import asyncio

import pytest

import framework
from framework.config import load_config
from framework.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    EngineStepError,
    QueueFullError,
)
from framework.engine.llm_engine import LLMEngine

GREEDY = framework.SamplingParams(temperature=0, max_tokens=8)
LONG = framework.SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async-scheduling"])
def llm_engine(tiny_model_dir, request):
    """The engine behind every test, with and without async scheduling (the CUDA default) on this CPU."""
    config = {"model": str(tiny_model_dir), "max_model_len": 128, "async_scheduling": request.param}
    return LLMEngine(load_config(config))


def run(llm_engine, test, **kwargs):
    """Run ``test(engine)`` on a fresh AsyncLLMEngine around the shared LLMEngine, then shut it down."""

    async def main():
        engine = AsyncLLMEngine(llm_engine, **kwargs)
        engine.start()
        try:
            return await asyncio.wait_for(test(engine), 60)
        finally:
            await engine.shutdown()
            assert not llm_engine.has_unfinished_requests() and llm_engine.kv.pool.usage() == 0

    return asyncio.run(main())


async def collect(stream):
    await stream.admitted()
    return [out async for out in stream]


def test_streams_give_the_offline_outputs(llm_engine, offline_llm):
    prompts = ["Hello, my name is", "The capital of France is", "a b c"]
    expected = [o.outputs[0].text for o in offline_llm.generate(prompts, GREEDY, use_tqdm=False)]

    async def test(engine):
        streams = [engine.add_request(p, GREEDY) for p in prompts]
        results = await asyncio.gather(*(collect(s) for s in streams))
        for outs in results:
            assert outs[-1].finished and not any(o.finished for o in outs[:-1])
            lengths = [len(o.outputs[0].token_ids) for o in outs]
            assert lengths == sorted(lengths)  # cumulative
        return [outs[-1].outputs[0].text for outs in results]

    assert run(llm_engine, test) == expected


def test_close_aborts_at_once_and_frees_the_blocks(llm_engine):
    async def test(engine):
        stream = engine.add_request("a long story", LONG)
        await stream.admitted()
        first = await stream.__anext__()
        assert llm_engine.kv.pool.usage() > 0 and not first.finished
        stream.close()
        outs = [out async for out in stream]
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
        assert len(outs[-1].outputs[0].token_ids) < LONG.max_tokens
        assert llm_engine.kv.pool.usage() == 0 and not llm_engine.has_unfinished_requests()

    run(llm_engine, test)


def test_an_invalid_prompt_fails_only_its_own_request(llm_engine):
    async def test(engine):
        good = engine.add_request("Hello", GREEDY)
        too_long = engine.add_request(list(range(10, 200)), GREEDY)
        out_of_vocab = engine.add_request([10**6], GREEDY)
        with pytest.raises(ValueError, match="max_model_len"):
            await too_long.admitted()
        with pytest.raises(ValueError, match="out of range"):
            await out_of_vocab.admitted()
        assert (await collect(good))[-1].outputs[0].finish_reason == "length"

    run(llm_engine, test)


def test_a_failing_step_fails_the_requests_in_flight_and_the_engine_goes_on(llm_engine, monkeypatch):
    real_step, calls = llm_engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real_step()

    monkeypatch.setattr(llm_engine, "step", flaky_step)

    async def test(engine):
        streams = [engine.add_request(f"prompt {i}", LONG) for i in range(3)]
        for stream in streams:
            with pytest.raises(EngineStepError, match="boom"):
                await collect(stream)
        assert engine.num_step_errors == 1 and engine.is_running
        assert llm_engine.kv.pool.usage() == 0
        assert (await collect(engine.add_request("Hello", GREEDY)))[-1].finished

    run(llm_engine, test)


def test_the_queue_bound_counts_waiting_sequences(llm_engine):
    async def test(engine):
        streams = [engine.add_request(f"p{i}", GREEDY) for i in range(2)]
        with pytest.raises(QueueFullError, match="max_queued_requests=2"):
            engine.add_request("one too many", GREEDY)
        with pytest.raises(QueueFullError):
            engine.check_capacity(1)
        for stream in streams:
            await collect(stream)
        engine.check_capacity(2)  # room again

    run(llm_engine, test, max_queued_requests=2)


def test_shutdown_ends_every_stream_and_refuses_new_requests(llm_engine):
    async def test(engine):
        stream = engine.add_request("a long story", LONG)
        await stream.admitted()
        await engine.shutdown()
        outs = [out async for out in stream]
        assert outs[-1].outputs[0].finish_reason == "abort"
        with pytest.raises(EngineDeadError):
            engine.add_request("late", GREEDY)

    run(llm_engine, test)


def test_leaving_generate_early_aborts_the_request(llm_engine):
    async def test(engine):
        async for out in engine.generate("a long story", LONG):
            assert not out.finished
            break
        for _ in range(500):  # the abort lands after the current step
            if llm_engine.kv.pool.usage() == 0 and not llm_engine.has_unfinished_requests():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the request was not aborted")

    run(llm_engine, test)
