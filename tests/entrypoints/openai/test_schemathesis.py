"""Property-based fuzzing of every operation in /openapi.json: no input gets a 5xx.

Bounded: 20 examples per operation, the fuzzing phase only, a fixed seed
(about 100 requests, a few seconds). The full run (coverage phase too,
about 1,200 requests) is `schemathesis run URL/openapi.json -H
"Authorization: Bearer KEY" --checks not_a_server_error`.
"""

import subprocess
import sys

import httpx
import pytest


@pytest.mark.fuzz
def test_schemathesis_finds_no_server_error(server, tmp_path):
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
        "-H", f"Authorization: Bearer {server.api_key}",
        "--checks", "not_a_server_error", "--max-examples", "20", "--seed", "0",
        "--phases", "fuzzing", "--request-timeout", "30", "--no-shrink",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # its files go there
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "passed" in result.stdout
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    server.wait_until_idle()
