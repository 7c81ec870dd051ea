"""Servers for the OpenAI-server tests: real `framework serve` subprocesses.

Each server listens on 127.0.0.1 on a free port, logs to a file (a pipe
nobody reads would fill up and block it), and is killed in the fixture's
finalizer whatever happens. Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from framework.testing import make_tiny_model

API_KEY = "sk-test-key"
MODEL_NAMES = ["tiny", "tiny-alias"]
MAX_MODEL_LEN = 256
STARTUP_TIMEOUT = 120.0


def pytest_configure(config):
    config.addinivalue_line("markers", "fuzz: property-based API fuzzing (bounded; deselect with -m 'not fuzz')")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One `framework serve` process."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "framework", "serve", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env or os.environ.copy())

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not become healthy in {timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def metrics(self) -> dict[str, float]:
        """``name{labels}`` -> value, from /metrics (no auth needed)."""
        values = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def gauges(self) -> tuple[float, float, float]:
        """(running, waiting, KV-cache usage) from /metrics."""
        metrics = self.metrics()
        names = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
        return tuple(sum(v for k, v in metrics.items() if k.split("{")[0] == "framework:" + n) for n in names)

    def wait_until_idle(self, timeout: float = 20.0) -> None:
        """Poll /metrics until nothing runs, waits or holds KV blocks."""
        deadline = time.monotonic() + timeout
        while (busy := self.gauges()) != (0, 0, 0):
            if time.monotonic() > deadline:
                raise AssertionError(f"not idle after {timeout} s: running, waiting, KV usage = {busy}")
            time.sleep(0.1)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        finally:
            self._log.close()


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """A function that starts a server for this module; every one is killed at teardown."""
    started: list[ServerProcess] = []

    def _launch(args: list[str], env: dict | None = None) -> ServerProcess:
        server = ServerProcess(args, tmp_path_factory.mktemp("server") / "server.log", env)
        started.append(server)
        server.wait_ready()
        return server

    try:
        yield _launch
    finally:
        for server in started:
            server.kill()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("openai-tiny"))


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory):
    """The shared server: API key, two served names, max_model_len 256."""
    args = [str(tiny_model_dir), "--max-model-len", str(MAX_MODEL_LEN), "--api-key", API_KEY,
            "--served-model-name", *MODEL_NAMES]  # fmt: skip
    srv = ServerProcess(args, tmp_path_factory.mktemp("server") / "server.log")
    srv.api_key, srv.model_names, srv.max_model_len = API_KEY, MODEL_NAMES, MAX_MODEL_LEN
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.kill()


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def offline_llm(tiny_model_dir):
    """The same model offline: the oracle for the server's greedy output."""
    import framework

    return framework.build({"model": str(tiny_model_dir), "max_model_len": MAX_MODEL_LEN})
