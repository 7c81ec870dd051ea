"""``framework bench serve``: load a running OpenAI-compatible server, in vLLM's conventions.

Requests go to ``POST /v1/completions`` with ``stream: true`` (httpx), each
asking for exactly its output length (``max_tokens`` with ``ignore_eos``).
Arrivals: all at once with ``--request-rate inf``, else a Poisson process of
that rate (exponential gaps, seeded); ``--max-concurrency`` caps the
requests in flight.

Per request, from the client's clock:
  * TTFT: request sent -> first streamed chunk with text or tokens;
  * ITL: the gaps between later chunks (one chunk per engine step, so usually
    one token each);
  * TPOT: (E2E - TTFT) / (output tokens - 1), for requests of 2+ tokens;
  * E2E: request sent -> last byte.
Output tokens are the server's ``usage.completion_tokens``. Prompts: random
token ids (W1-like lengths by default) or the first turns of a ShareGPT file.
Random ids are drawn from ``[10, --vocab-size)``; the default keeps them
inside any tokenizer. A tokenizer that cannot decode the model's ids (dummy
weights) sends no text: pass ``--logprobs 0`` so every token is a chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from framework.bench.datasets import BenchRequest, random_requests, sharegpt_requests


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's address")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--dataset", default="random", help="'random' or a ShareGPT-format JSON file")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (ShareGPT lengths)")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len-range", type=int, nargs=2, default=[64, 1024], metavar=("MIN", "MAX"))
    parser.add_argument("--output-len-range", type=int, nargs=2, default=[16, 512], metavar=("MIN", "MAX"))
    parser.add_argument("--vocab-size", type=int, default=256, help="random prompt ids are < this")
    parser.add_argument("--max-model-len", type=int, default=4096, help="ShareGPT: skip longer conversations")
    parser.add_argument("--dataset-seed", type=int, default=0)
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests/s (Poisson arrivals); inf: all at once")  # fmt: skip
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--logprobs", type=int, default=None, help="ask for logprobs (0: one chunk per token)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--output-json", default=None, help="write the results here")


@dataclass
class RequestResult:
    ok: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def run_serve(args: argparse.Namespace) -> dict:
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one log line per request
    requests = _requests(args)
    return asyncio.run(_benchmark(args, requests))


def _requests(args: argparse.Namespace) -> list[BenchRequest]:
    if args.dataset == "random":
        return random_requests(args.num_prompts, tuple(args.input_len_range), tuple(args.output_len_range),
                               args.vocab_size, args.dataset_seed)  # fmt: skip
    if args.tokenizer is None:
        raise ValueError("a ShareGPT dataset needs --tokenizer (to count prompt and reply tokens)")
    from framework.tokenizer import load_tokenizer

    return sharegpt_requests(args.dataset, args.num_prompts, load_tokenizer(args.tokenizer), args.max_model_len,
                             args.dataset_seed)  # fmt: skip


async def _benchmark(args: argparse.Namespace, requests: list[BenchRequest]) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=timeout, limits=limits) as client:
        model = args.model or await _first_model(client)
        gaps = _arrival_gaps(len(requests), args.request_rate, args.seed)
        limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        start = time.perf_counter()
        tasks = []
        for request, gap in zip(requests, gaps):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(_limited(limit, client, model, request, args)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    summary = summarize(results, duration)
    summary.update(
        base_url=args.base_url, model=model, dataset=args.dataset, num_prompts=len(requests),
        request_rate=args.request_rate, max_concurrency=args.max_concurrency,
    )  # fmt: skip
    _print(summary)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


async def _first_model(client) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def _arrival_gaps(num: int, rate: float, seed: int) -> list[float]:
    """Seconds to wait before each request: 0 for all with an infinite rate, else exponential gaps."""
    if rate == float("inf"):
        return [0.0] * num
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(num)]


async def _limited(limit: Optional[asyncio.Semaphore], client, model: str, request: BenchRequest, args):
    if limit is None:
        return await _send(client, model, request, args)
    async with limit:
        return await _send(client, model, request, args)


async def _send(client, model: str, request: BenchRequest, args) -> RequestResult:
    body = {
        "model": model, "prompt": request.prompt, "max_tokens": request.output_len, "ignore_eos": True,
        "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    if args.logprobs is not None:
        body["logprobs"] = args.logprobs
    result = RequestResult(prompt_len=request.prompt_len)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message", chunk["error"]))
                    return result
                now = time.perf_counter()
                if chunk.get("choices"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_len = chunk["usage"]["prompt_tokens"]
        result.e2e = time.perf_counter() - start
        result.ok = result.ttft > 0.0
        if not result.ok:
            result.error = "no token was streamed"
    except Exception as exc:  # a failed request is counted, never fatal
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _stats(values: list[float], name: str) -> dict:
    """mean / median / p99 of seconds, in milliseconds."""
    if not values:
        return {f"mean_{name}_ms": None, f"median_{name}_ms": None, f"p99_{name}_ms": None}
    return {
        f"mean_{name}_ms": round(statistics.fmean(values) * 1e3, 3),
        f"median_{name}_ms": round(statistics.median(values) * 1e3, 3),
        f"p99_{name}_ms": round(float(np.percentile(values, 99)) * 1e3, 3),
    }


def summarize(results: list[RequestResult], duration: float) -> dict:
    """The report of one run (vLLM's field names, times in milliseconds)."""
    done = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    summary = {
        "duration_s": round(duration, 3),
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": round(len(done) / duration, 3),
        "output_throughput": round(output_tokens / duration, 1),
        "total_token_throughput": round((input_tokens + output_tokens) / duration, 1),
    }
    summary.update(_stats([r.ttft for r in done], "ttft"))
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    summary.update(_stats(tpot, "tpot"))
    summary.update(_stats([gap for r in done for gap in r.itl], "itl"))
    summary.update(_stats([r.e2e for r in done], "e2el"))
    summary["errors"] = sorted({r.error for r in results if not r.ok})[:5]
    return summary


def _print(summary: dict) -> None:
    print(f"{' Serving benchmark result ':=^60}")
    for key, value in summary.items():
        if key != "errors":
            print(f"{key:<40} {value}")
    for error in summary["errors"]:
        print(f"error: {error}")
