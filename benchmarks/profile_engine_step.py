"""Where an engine step's wall time goes, at a steady decode batch (GPU or CPU).

``--batch`` requests with ``--prompt-len``-token prompts are prefilled, then
``--steps`` pure-decode steps are timed phase by phase with host timers:

  schedule        Scheduler.schedule (block allocation included)
  prepare         input_batch.prepare_batch (numpy flattening)
  forward         the runner's model launch: graph replay or eager forward, logits
  sample          sampling metadata and sampler launches, packing
  sync+unpack     the one device-to-host copy (waits for the GPU) and splitting it
  postprocess     everything after execute: strategies, stop checks, detokenising, outputs
and the GPU time of the step's device work (CUDA events from the start of
the forward to the end of the copy). GPU idle share = 1 - GPU / wall. Then
cProfile over ``--profile-steps`` more steps lists the host functions by own
time.

    python benchmarks/profile_engine_step.py /tmp/llama3-8b --batch 256 --prompt-len 512 --steps 100
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import statistics
import time
from collections import defaultdict

import torch


def kernel_table(engine, steps: int) -> str:
    """GPU time per kernel over ``steps`` steps (CUDA-graph replays included), largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--profile-steps", type=int, default=30)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--quantization", default=None, help="e.g. gptq or awq (dummy weights packed in that format)")
    parser.add_argument(
        "--async-scheduling", action="store_true",
        help="with async scheduling (steps overlap: only wall, GPU and idle share are reported, not the phases)",
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--torch-profile", type=int, default=0, help="then N steps under torch.profiler (kernels)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    import framework
    import framework.engine.model_runner as model_runner

    llm = framework.LLM(
        args.model, load_format="dummy", dtype="bfloat16", max_model_len=args.prompt_len + 1024,
        max_num_seqs=args.batch, enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling,
        quantization=args.quantization,
    )  # fmt: skip
    engine, runner = llm.engine, llm.engine.runner
    cuda = engine.device.type == "cuda"
    times: dict[str, list[float]] = defaultdict(list)

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            times[name].append(time.perf_counter() - start)
            return out

        return wrapper

    events = []

    def forward(*a, _fn=runner._logits):
        if cuda:
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
            events.append([begin, None])
        return _fn(*a)

    def copy_to_host(packed, _fn=model_runner.start_copy_to_host):
        out = _fn(packed)
        if cuda:  # the step's last device work: its end on the stream (also when the next step is queued)
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            events[-1][1] = end
        return out

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    model_runner.prepare_batch = timed("prepare", model_runner.prepare_batch)
    runner._logits = timed("forward", forward)
    model_runner.unpack = timed("sync+unpack", model_runner.unpack)
    model_runner.start_copy_to_host = copy_to_host
    runner.execute = timed("execute", runner.execute)

    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    params = framework.SamplingParams(temperature=args.temperature, max_tokens=4096, ignore_eos=True)
    for _ in range(args.batch):
        engine.add_request([rng.randrange(10, vocab) for _ in range(args.prompt_len)], params)
    sched = engine.scheduler
    while sched.waiting or any(s.num_output_tokens == 0 for g in sched.running for s in g.seqs):
        engine.step()  # prefill every prompt first: the timed steps are pure decode
    for _ in range(5):
        engine.step()
    times.clear()
    events.clear()
    walls = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
    if cuda:
        torch.cuda.synchronize()
    gpu = [b.elapsed_time(e) / 1e3 for b, e in events if e is not None]
    med = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    wall = statistics.median(walls) * 1e3
    report = {
        "batch": args.batch, "prompt_len": args.prompt_len, "steps": args.steps,
        "cuda_graphs": runner.graphs is not None, "async_scheduling": engine.async_scheduling,
        "wall_ms": round(wall, 3), "gpu_ms": round(statistics.median(gpu) * 1e3, 3) if gpu else None,
    }  # fmt: skip
    if not engine.async_scheduling:  # the phases add up only when steps do not overlap
        report.update({
            "schedule_ms": round(med["schedule"], 3), "prepare_ms": round(med["prepare"], 3),
            "forward_ms": round(med["forward"], 3),
            "sample_ms": round(med["execute"] - med["prepare"] - med["forward"] - med["sync+unpack"], 3),
            "sync_unpack_ms": round(med["sync+unpack"], 3),
            "postprocess_ms": round(wall - med["schedule"] - med["execute"], 3),
        })  # fmt: skip
    if gpu:
        report["gpu_idle_share"] = round(1 - report["gpu_ms"] / wall, 3)
    print(json.dumps(report), flush=True)

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.profile_steps):
        engine.step()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    report["cprofile_top"] = text.getvalue()
    print(text.getvalue()[-6000:])
    if args.torch_profile and cuda:
        report["kernels"] = kernel_table(engine, args.torch_profile)
        print(report["kernels"])
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
