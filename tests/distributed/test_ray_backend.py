"""``distributed_executor_backend="ray"``: worker ranks as actors (CPU, gloo).

Ray's daemons listen on every interface, so these tests run the engine's Ray
code against ``fake_ray`` (real actor processes, Ray's call semantics);
``benchmarks/check_ray.py`` runs it on a real Ray instance.
"""

import os
import signal
import sys
import threading
import time
import types

import pytest
import torch

import framework
from framework.config import EngineConfig
from framework.distributed import WorkerDiedError
from framework.distributed.executor import make_executor
from framework.distributed.ray_workers import RayWorker, _driver_gpu

from . import fake_ray
from .conftest import engine_settings
from .test_messages import _model_config
from .test_parallel_generation import assert_same, run_all


@pytest.fixture
def ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setitem(fake_ray._state, "node_id", fake_ray.NODE_ID)
    return fake_ray


@pytest.mark.parametrize(
    "parallel",
    [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}],
    ids=["tp2", "pp2"],
)
def test_ray_actors_match_one_process(ray, parallel_models, parallel):
    path = parallel_models["qwen2_kv1"]
    reference = run_all(framework.LLM(**engine_settings(path)))
    llm = framework.LLM(**engine_settings(path, distributed_executor_backend="ray", **parallel))
    executor = llm.engine.runner
    try:
        assert [type(w) for w in executor.procs.values()] == [RayWorker]
        result = run_all(llm)
    finally:
        llm.engine.shutdown()
    assert_same(reference, result)
    assert [w.poll() for w in executor.procs.values()] == [0]  # the actor's loop returned after SHUTDOWN
    assert llm.engine.dead_error is None


def test_killed_actor_fails_requests_naming_the_rank(ray, parallel_models):
    llm = framework.LLM(
        **engine_settings(parallel_models["llama"], tensor_parallel_size=2, distributed_executor_backend="ray")
    )
    errors = []

    def generate():
        try:
            llm.generate(["Hi"] * 3, framework.SamplingParams(max_tokens=200, ignore_eos=True), use_tqdm=False)
        except WorkerDiedError as exc:
            errors.append((time.monotonic(), exc))

    thread = threading.Thread(target=generate)
    try:
        worker = llm.engine.runner.procs[1]
        thread.start()
        time.sleep(1.0)
        killed = time.monotonic()
        os.kill(worker.pid, signal.SIGKILL)
        thread.join(30)
        assert not thread.is_alive()
    finally:
        llm.engine.shutdown()
    assert errors, "the request did not fail"
    failed_at, error = errors[0]
    assert failed_at - killed < 5
    assert f"worker rank 1 (pid {worker.pid}) died: its Ray actor died" in str(error)
    assert worker.poll() is not None


def test_ranks_on_several_hosts_need_distributed_host(ray, parallel_models, monkeypatch):
    monkeypatch.setitem(ray._state, "node_id", "driver-host")  # the actors report fake_ray.NODE_ID
    started = []
    real_init = RayWorker.__init__

    def remember(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(RayWorker, "__init__", remember)
    with pytest.raises(ValueError, match="placed the ranks on 2 hosts: set distributed_host"):
        framework.LLM(
            **engine_settings(parallel_models["llama"], tensor_parallel_size=2, distributed_executor_backend="ray")
        )
    assert started and all(w.poll() is not None for w in started)
    for worker in started:  # no actor process left behind
        worker.actor._process.join(5)
        assert not worker.actor._process.is_alive()


def test_ray_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    config = EngineConfig(tensor_parallel_size=2, distributed_executor_backend="ray")
    with pytest.raises(ValueError, match=r"distributed_executor_backend='ray' needs Ray: pip install ray"):
        make_executor(config, _model_config(), None, torch.device("cpu"), None)


def _placed(node_id, gpu_ids):
    return types.SimpleNamespace(node_id=node_id, gpu_ids=gpu_ids, kill=lambda: None)


def test_driver_takes_a_gpu_no_actor_of_its_host_holds(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    workers = {1: _placed("here", [4]), 2: _placed("here", [6]), 3: _placed("elsewhere", [5])}
    assert _driver_gpu(workers, "here") == 1  # physical GPU 5 is cuda:1 in this process
    workers[3] = _placed("here", [5])
    with pytest.raises(ValueError, match=r"the actors hold every GPU this process sees \(\[4, 5, 6\]\)"):
        _driver_gpu(workers, "here")
