"""KV-cache accounting on a workload: allocated versus used slots, preemptions, prefix-cache hits.

A CPU simulation with the engine's real ``Scheduler`` and ``KVCacheManager``
and no model: every step computes what the scheduler planned, each
sequence that reaches its end samples one token, and a request finishes
after its output length. After every step (the state ``LLMEngine.stats()``
reports) it records the allocated slots (blocks in use x block size) and
the used ones (slots holding K/V; shared blocks counted once).

Default workload W1: 1,000 requests, prompt U[64, 1024], output U[16, 512]
(``framework.bench.datasets.random_lengths(1000, (64, 1024), (16, 512),
seed=0)``), all arriving at once; random prompt tokens, so nothing is shared
unless ``--shared-prefix N`` puts the same N-token system prompt first.

Usage: python benchmarks/kv_accounting.py --num-blocks 25000 8192 2048
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

from framework.bench.datasets import random_lengths
from framework.engine.block_pool import KVCacheManager
from framework.engine.scheduler import Scheduler
from framework.engine.sequence_group import SequenceGroup
from framework.sampling_params import SamplingParams


class _Plain:
    """The attributes of a one-sequence decoding strategy (what the scheduler reads)."""

    fanout = max_width = 1
    num_top_logprobs = 0
    uses_processed_logprobs = False


def simulate(args: argparse.Namespace, num_blocks: int, prefix_caching: bool) -> dict:
    kv = KVCacheManager(num_blocks, args.block_size, enable_prefix_caching=prefix_caching)
    sched = Scheduler(kv, args.max_num_seqs, args.max_num_batched_tokens)
    rng = random.Random(args.seed + 1)
    system = [rng.randrange(10, args.vocab_size) for _ in range(args.shared_prefix)]
    params = SamplingParams(max_tokens=None, ignore_eos=True)
    output_len = {}
    lengths = random_lengths(args.num_requests, (args.input_min, args.input_max), (args.output_min, args.output_max),
                             args.seed)  # fmt: skip
    for i, (prompt_len, out_len) in enumerate(lengths):
        prompt = system + [rng.randrange(10, args.vocab_size) for _ in range(max(1, prompt_len - len(system)))]
        group = SequenceGroup(str(i), None, prompt, params)
        group.attach(_Plain())
        sched.add(group)
        output_len[group.request_id] = out_len
    pool_slots = num_blocks * args.block_size
    steps, peak_alloc, at_peak_alloc, worst_unused, unused_sum, alloc_sum = 0, 0, (0, 0), 0, 0, 0
    start = time.perf_counter()
    while sched.has_unfinished():
        batch = sched.schedule()
        if not batch.seqs:
            raise RuntimeError("the scheduler made no progress (pool too small for one request?)")
        steps += 1
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        finished = []
        for group in batch.groups:
            seq = group.seqs[0]
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(7)
                group.sampled = True
                if seq.num_output_tokens >= output_len[group.request_id]:
                    finished.append(group)
        sched.finish(finished)
        allocated, used = kv.slot_usage(s for g in sched.running for s in g.live_seqs())
        unused = allocated - used
        worst_unused = max(worst_unused, unused)
        unused_sum, alloc_sum = unused_sum + unused, alloc_sum + allocated
        if allocated > peak_alloc:
            peak_alloc, at_peak_alloc = allocated, (allocated, unused)
    cache = kv.cache if kv.cache is not None and kv.cache.queries else None
    return {
        "num_blocks": num_blocks,
        "pool_slots": pool_slots,
        "prefix_caching": prefix_caching,
        "steps": steps,
        "preemptions": sched.num_preemptions,
        "peak_allocated_pct_of_pool": round(100 * at_peak_alloc[0] / pool_slots, 2),
        "unused_at_peak_pct_of_pool": round(100 * at_peak_alloc[1] / pool_slots, 3),
        "unused_at_peak_pct_of_allocated": round(100 * at_peak_alloc[1] / max(at_peak_alloc[0], 1), 3),
        "max_unused_pct_of_pool": round(100 * worst_unused / pool_slots, 3),
        "mean_unused_pct_of_allocated": round(100 * unused_sum / max(alloc_sum, 1), 3),
        "prefix_cache_hit_rate_pct": round(100 * cache.hits / cache.queries, 2) if cache is not None else None,
        "sim_seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-blocks", type=int, nargs="+", default=[25000, 8192, 2048])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--input-min", type=int, default=64)
    parser.add_argument("--input-max", type=int, default=1024)
    parser.add_argument("--output-min", type=int, default=16)
    parser.add_argument("--output-max", type=int, default=512)
    parser.add_argument("--shared-prefix", type=int, default=0, help="tokens of the system prompt all requests share")
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix-caching", choices=["on", "off", "both"], default="both")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}")
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.prefix_caching]
    for num_blocks in args.num_blocks:
        for caching in modes:
            print(json.dumps(simulate(args, num_blocks, caching)), flush=True)


if __name__ == "__main__":
    main()
