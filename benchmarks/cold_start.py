"""Cold start of ``framework serve``: seconds from launch to ``GET /health`` = 200.

Starts ``framework serve MODEL --load-format dummy --dtype bfloat16 [any other
flags]`` with an empty Triton cache (a fresh ``TRITON_CACHE_DIR``, so kernel
compilation is counted), polls /health every 0.1 s, and reports the time with
the engine's own start-up log lines (KV-cache size, CUDA-graph capture).
With ``--bench-prompts N`` it then runs ``framework bench serve`` against the
server (W1 lengths: prompts U[64, 1024], outputs U[16, 512]) before stopping
it: all at once, or once per rate of ``--rates`` (Poisson arrivals, requests/s).

    python benchmarks/cold_start.py /tmp/llama3-8b --bench-prompts 200 --out /tmp/out
    python benchmarks/cold_start.py /tmp/llama3-8b --bench-prompts 400 --rates 8 16 32 --out /tmp/out
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--bench-prompts", type=int, default=0)
    parser.add_argument("--rates", type=float, nargs="*", default=[], help="request rates (default: all at once)")
    parser.add_argument("--vocab-size", type=int, default=128000, help="bench serve: random prompt ids are < this")
    parser.add_argument("--out", type=Path, default=Path("."))
    args, extra = parser.parse_known_args()  # unknown flags go to `framework serve`
    import httpx

    args.out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, TRITON_CACHE_DIR=tempfile.mkdtemp(prefix="triton-cold-"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "framework", "serve", args.model, "--load-format", "dummy", "--dtype", "bfloat16",
           "--port", str(port), "--log-stats-interval", "0", *extra]  # fmt: skip
    log_path = args.out / "serve.log"
    log = open(log_path, "w")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    ready = None
    try:
        while time.perf_counter() - start < args.timeout and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    ready = time.perf_counter() - start
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        result = {"command": " ".join(cmd[1:]), "ready_s": None if ready is None else round(ready, 2)}
        log.flush()
        keys = ("KV cache", "CUDA graphs", "memory profile", "loaded")
        result["log"] = [line for line in log_path.read_text().splitlines() if any(k in line for k in keys)]
        print(json.dumps(result, indent=1), flush=True)
        if ready is not None and args.bench_prompts:
            for rate in args.rates or [None]:
                name = "bench_serve.json" if rate is None else f"bench_serve_rate{rate:g}.json"
                bench = [sys.executable, "-m", "framework", "bench", "serve", "--base-url", url, "--num-prompts",
                         str(args.bench_prompts), "--vocab-size", str(args.vocab_size), "--logprobs", "0",
                         "--input-len-range", "64", "1024", "--output-len-range", "16", "512",
                         "--dataset-seed", "0", "--output-json", str(args.out / name)]  # fmt: skip
                if rate is not None:
                    bench += ["--request-rate", f"{rate:g}"]
                subprocess.run(bench, timeout=args.timeout, check=False)
        (args.out / "cold_start.json").write_text(json.dumps(result, indent=1))
        return 0 if ready is not None else 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
