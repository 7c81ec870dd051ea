"""Host time per engine step: scheduling + input preparation, no model.

Simulates steady-state decoding with N running sequences (each with a prompt
already in the cache) and times, per step:
  * ``Scheduler.schedule()`` (block allocation included),
  * ``prepare_batch`` (flattening into numpy arrays: ids, positions, slot
    mapping, block tables, logits indices),
  * the tensors the model runner builds from them (``torch.from_numpy`` and
    the sampling-parameter tensors) on the CPU,
  * the bookkeeping after a step (advance, append a token).

Usage: python benchmarks/bench_scheduler.py --num-seqs 256 1024 --steps 200
       (add --enable-prefix-caching to include naming each block as it fills)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from framework.engine.block_pool import KVCacheManager
from framework.engine.input_batch import prepare_batch
from framework.engine.sampling_inputs import build_sampling_metadata
from framework.engine.scheduler import Scheduler
from framework.engine.sequence_group import SequenceGroup
from framework.sampling_params import SamplingParams


class _Plain:
    """The attributes of a one-sequence decoding strategy (what the scheduler reads)."""

    fanout = max_width = 1
    num_top_logprobs = 0
    uses_processed_logprobs = False


def bench(num_seqs: int, steps: int, prompt_len: int, block_size: int, prefix_caching: bool = False) -> dict:
    blocks_per_seq = -(-(prompt_len + 64 + steps + 2) // block_size)
    kv = KVCacheManager(num_seqs * blocks_per_seq, block_size, enable_prefix_caching=prefix_caching)
    # A budget that prefills every prompt in the first step, so no sequence decodes during warm-up.
    sched = Scheduler(kv, max_num_seqs=num_seqs, max_num_batched_tokens=num_seqs * (prompt_len + 64))
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=None)
    # Distinct first tokens: with prefix caching on, no two prompts share a block.
    groups = [SequenceGroup(str(i), None, [10 + i] + [1] * (prompt_len + i % 64 - 1), params) for i in range(num_seqs)]
    for g in groups:
        g.attach(_Plain())
        sched.add(g)
    seqs = [g.seqs[0] for g in groups]
    # Warm-up: prefill everything, so the timed steps are pure decode at N sequences.
    while any(s.num_output_tokens == 0 for s in seqs):
        _advance(sched.schedule())
    times = {"schedule": [], "prepare": [], "tensors": [], "update": []}
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = sched.schedule()
        t1 = time.perf_counter()
        prepared = prepare_batch(batch, block_size)
        t2 = time.perf_counter()
        for array in (prepared.input_ids, prepared.positions, prepared.slot_mapping, prepared.block_tables):
            torch.from_numpy(array)
        build_sampling_metadata(prepared.sample_seqs, 128256, torch.device("cpu"), frozenset({2}))
        t3 = time.perf_counter()
        _advance(batch)
        t4 = time.perf_counter()
        assert len(batch) == num_seqs and batch.num_tokens == num_seqs
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[key].append(value * 1e3)
    result = {"num_seqs": num_seqs, "steps": steps}
    for key, values in times.items():
        result[f"{key}_ms"] = round(statistics.median(values), 4)
    result["total_ms"] = round(sum(result[f"{k}_ms"] for k in times), 4)
    return result


def _advance(batch) -> None:
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--enable-prefix-caching", action="store_true")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}, torch {torch.__version__}")
    for n in args.num_seqs:
        print(json.dumps(bench(n, args.steps, args.prompt_len, args.block_size, args.enable_prefix_caching)))


if __name__ == "__main__":
    main()
