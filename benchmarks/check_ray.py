"""``distributed_executor_backend="ray"`` on a real Ray instance, against one process.

Starts (or joins, with ``RAY_ADDRESS``) a Ray instance, then for TP=2 and
PP=2 (and TP=2 x PP=2 when 4 devices are there) a tiny Llama generates
greedily with logprobs through Ray actors; ids must equal the one-process
run's and logprobs be within 1e-4. Then a rank's actor process is SIGKILLed
mid-request: the request must fail within 10 s naming the rank. Prints one
line per check; exits non-zero on a failure. Ray's own daemons listen on
every interface, so this is a manual check, not a test.

    python benchmarks/check_ray.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = ["Hello, my name is", "The capital of France is " * 6, [5, 9, 100, 7, 42] * 8]


def run(path: Path, device: str, **settings):
    import framework

    llm = framework.LLM(str(path), dtype="float32", max_model_len=256, max_num_batched_tokens=32, device=device,
                        kv_cache_memory=1 << 22 if device == "cpu" else None, **settings)  # fmt: skip
    try:
        outs = llm.generate(PROMPTS, framework.SamplingParams(temperature=0, max_tokens=12, logprobs=2), use_tqdm=False)
    finally:
        llm.engine.shutdown()
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def worst_gap(ref, got) -> tuple[bool, float]:
    same, worst = True, 0.0
    for (ids_a, lps_a), (ids_b, lps_b) in zip(ref, got):
        same &= ids_a == ids_b
        for a, b in zip(lps_a, lps_b):
            worst = max([worst] + [abs(lp.logprob - b[t].logprob) for t, lp in a.items() if t in b])
    return same, worst


def kill_check(path: Path, device: str) -> bool:
    import framework
    from framework.distributed import WorkerDiedError

    llm = framework.LLM(str(path), dtype="float32", max_model_len=2048, device=device, tensor_parallel_size=2,
                        distributed_executor_backend="ray", kv_cache_memory=1 << 24 if device == "cpu" else None)  # fmt: skip
    errors: list = []

    def generate():
        try:
            llm.generate(["Hi"] * 4, framework.SamplingParams(max_tokens=1500, ignore_eos=True), use_tqdm=False)
        except WorkerDiedError as exc:
            errors.append((time.monotonic(), exc))

    thread = threading.Thread(target=generate)
    thread.start()
    time.sleep(2)
    killed = time.monotonic()
    os.kill(llm.engine.runner.procs[1].pid, signal.SIGKILL)
    thread.join(30)
    llm.engine.shutdown()
    ok = bool(errors) and "rank 1" in str(errors[0][1]) and errors[0][0] - killed < 10
    delay = errors[0][0] - killed if errors else float("nan")
    print(f"kill: error after {delay:.2f} s: {errors[0][1] if errors else None!r} -> {ok}", flush=True)
    return ok


def main() -> int:
    import ray
    import torch

    from framework.testing import make_tiny_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if not ray.is_initialized():
        ray.init(include_dashboard=False, num_cpus=4 if args.device == "cpu" else None)
    devices = torch.cuda.device_count() if args.device == "cuda" else 4
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model("LlamaForCausalLM", Path(tmp) / "llama", seed=1)
        ref = run(path, args.device)
        for tp, pp in [(2, 1), (1, 2), (2, 2)]:
            if tp * pp > devices:
                continue
            start = time.perf_counter()
            got = run(path, args.device, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                      distributed_executor_backend="ray")  # fmt: skip
            same, worst = worst_gap(ref, got)
            ok = same and worst < 1e-4
            failures += not ok
            print(f"ray tp={tp} pp={pp} on {args.device}: ids equal {same}, max |dlogprob| {worst:.2e}, "
                  f"{time.perf_counter() - start:.1f} s -> {'ok' if ok else 'FAIL'}", flush=True)  # fmt: skip
        failures += not kill_check(path, args.device)
    print("all ok" if not failures else f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
