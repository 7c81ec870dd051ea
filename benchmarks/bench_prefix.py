"""Shared-prefix workload with and without automatic prefix caching (issue 7's GPU benchmark).

Every request is one shared "system prompt" of ``--prefix-len`` tokens
followed by its own ``U[--suffix-min, --suffix-max]`` random tokens, and
asks for ``--output-len`` tokens (``ignore_eos``). One engine per setting
(``--no-prefix-caching`` turns caching off), dummy weights of the given shape.

Two measurements, in this order:

1. ``single``: ``--single`` requests one after the other, each alone in the
   engine (after one warm-up request that fills the cache): time to first
   token = wall time from ``add_request`` to the step that returns its first
   token; the median is reported.
2. ``batch``: ``--num-requests`` requests added at once: output tokens/s over
   the whole run, and the median and p99 of the time to first token (from
   the common start to the step that returned each request's first token).

The engine's prefix-cache counters (queries, hits, hit rate) are printed
with the results as one JSON line.

    python benchmarks/bench_prefix.py /tmp/llama3-8b --json /tmp/prefix_on.json
    python benchmarks/bench_prefix.py /tmp/llama3-8b --no-prefix-caching --json /tmp/prefix_off.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--suffix-min", type=int, default=32)
    parser.add_argument("--suffix-max", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--single", type=int, default=10)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import framework
    from framework.sampling_params import SamplingParams

    config = {
        "model": args.model, "load_format": "dummy", "dtype": "bfloat16", "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs, "enable_prefix_caching": not args.no_prefix_caching,
    }  # fmt: skip
    if args.device:
        config["device"] = args.device
    start = time.perf_counter()
    llm = framework.build(config)
    engine = llm.engine
    build_s = time.perf_counter() - start
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    prefix = [rng.randrange(vocab) for _ in range(args.prefix_len)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)

    def prompt() -> list[int]:
        return prefix + [rng.randrange(vocab) for _ in range(rng.randint(args.suffix_min, args.suffix_max))]

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def run(prompts: list[list[int]]) -> tuple[float, list[float], int]:
        """(seconds, TTFT per request in seconds, output tokens) with every prompt added at t=0."""
        sync()
        t0 = time.perf_counter()
        ids = [engine.add_request(p, params) for p in prompts]
        first: dict[str, float] = {}
        tokens = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id not in first and out.outputs and out.outputs[0].token_ids:
                    first[out.request_id] = time.perf_counter() - t0
                if out.finished:
                    tokens += len(out.outputs[0].token_ids)
        sync()
        return time.perf_counter() - t0, [first[i] for i in ids], tokens

    run([prompt()])  # warm-up: compiles kernels and, with caching on, fills the cache with the prefix
    single = [run([prompt()])[1][0] for _ in range(args.single)]
    before = engine.stats()
    seconds, ttft, tokens = run([prompt() for _ in range(args.num_requests)])
    after = engine.stats()
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    result = {
        "prefix_caching": not args.no_prefix_caching,
        "workload": {k: getattr(args, k) for k in ("prefix_len", "suffix_min", "suffix_max", "output_len",
                                                   "num_requests", "single")},  # fmt: skip
        "build_s": round(build_s, 1),
        "single_ttft_ms_median": round(statistics.median(single) * 1e3, 2),
        "batch_seconds": round(seconds, 2),
        "batch_output_tok_s": round(tokens / seconds, 1),
        "batch_ttft_ms_median": round(statistics.median(ttft) * 1e3, 1),
        "batch_ttft_ms_p99": round(_percentile(ttft, 99) * 1e3, 1),
        "batch_prefix_cache_queries": queries,
        "batch_prefix_cache_hits": hits,
        "batch_hit_rate": round(hits / queries, 4) if queries else 0.0,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
