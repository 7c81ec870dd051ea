"""``framework bench throughput|latency|serve`` on a tiny model (CPU): each runs and reports its fields.

throughput and latency run in-process through the CLI entry point; serve
loads a real ``framework serve`` subprocess started here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from framework.entrypoints.cli import main
from framework.testing import make_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("bench") / "m")


def test_bench_throughput(model, tmp_path):
    out = tmp_path / "t.json"
    rc = main(["bench", "throughput", str(model), "--num-prompts", "6", "--input-len-range", "4", "12",
               "--output-len-range", "2", "6", "--max-model-len", "64", "--output-json", str(out)])  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["num_requests"] == 6
    assert 6 * 4 <= result["prompt_tokens"] <= 6 * 12 and 6 * 2 <= result["output_tokens"] <= 6 * 6
    assert result["total_num_tokens"] == result["prompt_tokens"] + result["output_tokens"]
    assert result["output_tokens_per_second"] > 0 and result["requests_per_second"] > 0
    assert result["engine"]["device"] == "cpu" and result["engine"]["cuda_graphs"] is False


def test_bench_latency(model, tmp_path):
    out = tmp_path / "l.json"
    rc = main(["bench", "latency", str(model), "--batch-sizes", "1", "3", "--input-len", "8", "--output-len", "4",
               "--num-iters", "1", "--max-model-len", "64", "--output-json", str(out)])  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert (result["input_len"], result["output_len"]) == (8, 4)
    assert [r["batch_size"] for r in result["results"]] == [1, 3]
    for row in result["results"]:
        assert row["latency_s"] > 0 and 0 < row["decode_ms_per_token"] < row["latency_s"] * 1e3
        assert row["output_tokens_per_second"] == pytest.approx(row["batch_size"] * 4 / row["latency_s"], rel=0.05)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("serve") / "server.log", "w")
    cmd = [sys.executable, "-m", "framework", "serve", str(model), "--max-model-len", "128", "--port", str(port),
           "--served-model-name", "tiny", "--api-key", "sk-bench", "--log-stats-interval", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "the server exited"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=30)
        log.close()


@pytest.mark.parametrize("rate", ["inf", "50"])
def test_bench_serve(server, tmp_path, rate):
    out = tmp_path / "s.json"
    rc = main(["bench", "serve", "--base-url", server, "--api-key", "sk-bench", "--num-prompts", "8",
               "--input-len-range", "4", "16", "--output-len-range", "3", "8", "--request-rate", rate,
               "--max-concurrency", "4", "--output-json", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert rc == 0 and result["failed"] == 0, result["errors"]
    assert result["model"] == "tiny" and result["completed"] == 8
    assert 8 * 3 <= result["total_output_tokens"] <= 8 * 8 and 8 * 4 <= result["total_input_tokens"] <= 8 * 16
    for key in ("request_throughput", "output_throughput", "total_token_throughput"):
        assert result[key] > 0
    for metric in ("ttft", "tpot", "itl", "e2el"):
        mean, median, p99 = (result[f"{s}_{metric}_ms"] for s in ("mean", "median", "p99"))
        assert 0 < median <= p99 and mean > 0
    assert result["mean_ttft_ms"] < result["mean_e2el_ms"]


def test_bench_serve_counts_failures(server, tmp_path):
    out = tmp_path / "f.json"
    rc = main(["bench", "serve", "--base-url", server, "--api-key", "wrong", "--model", "tiny", "--num-prompts", "2",
               "--input-len-range", "4", "4", "--output-len-range", "2", "2", "--output-json", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert rc == 1 and result["completed"] == 0 and result["failed"] == 2
    assert any("401" in e for e in result["errors"])
