"""A spawned worker ignores SIGTERM and SIGINT: `docker stop`, systemd, `timeout` and Ctrl-C signal the
whole process group, and the driver must still be able to finish its requests and shut the worker down in
order (a worker that died first made the SHUTDOWN broadcast fail)."""

import os
import signal
import time

import framework

from .conftest import engine_settings


def test_worker_survives_group_signals_and_shuts_down_cleanly(parallel_models):
    llm = framework.LLM(**engine_settings(parallel_models["llama"], tensor_parallel_size=2))
    executor = llm.engine.runner
    params = framework.SamplingParams(temperature=0, max_tokens=4)
    try:
        before = llm.generate(["Hello, my name is"], params, use_tqdm=False)[0].outputs[0].token_ids
        (proc,) = executor.procs.values()
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None
        after = llm.generate(["Hello, my name is"], params, use_tqdm=False)[0].outputs[0].token_ids
        assert after == before and llm.engine.dead_error is None
    finally:
        start = time.monotonic()
        llm.engine.shutdown()
    assert proc.returncode == 0 and time.monotonic() - start < 5  # the SHUTDOWN message, not a kill
