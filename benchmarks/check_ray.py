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
import sys
import tempfile
import time
from pathlib import Path

from check_tensor_parallel import compare, kill_check, run  # same checks as for mp workers


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
        ref, _, _ = run(path, args.device)
        for tp, pp in [(2, 1), (1, 2), (2, 2)]:
            if tp * pp > devices:
                continue
            start = time.perf_counter()
            got, _, _ = run(path, args.device, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                            distributed_executor_backend="ray")  # fmt: skip
            same, worst = compare(ref, got)
            ok = same and worst < 1e-4
            failures += not ok
            print(f"ray tp={tp} pp={pp} on {args.device}: ids equal {same}, max |dlogprob| {worst:.2e}, "
                  f"{time.perf_counter() - start:.1f} s -> {'ok' if ok else 'FAIL'}", flush=True)  # fmt: skip
        failures += not kill_check(path, args.device, distributed_executor_backend="ray")
    print("all ok" if not failures else f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
