"""Tensor / pipeline parallelism on CUDA (NCCL) against one GPU, and a killed worker (GPU).

For each layout that fits the visible GPUs (TP=2, PP=2, TP=2 x PP=2), tiny
float32 models (Llama GQA, Qwen2 with one KV head) generate greedily with
logprobs, with decode CUDA graphs (the default; off on pipeline stages
unless ``FRAMEWORK_PP_CUDA_GRAPHS=1``) and with ``enforce_eager``, and
with the opt-in switches (``OPT_IN``) on; the token ids must equal the
one-GPU run's and every logprob must be within 1e-4. Then a TP=2 engine's worker is SIGKILLed while
a request runs: the request must fail within 10 s with an error naming the
rank, and no worker process may be left. Prints one line per check and
exits non-zero on a failure.

    python benchmarks/check_tensor_parallel.py [--kill-only]

A run that outlasts CHECK_TP_STACKS_AFTER_S seconds (280) prints every
thread's stack and exits.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

OPT_IN = ("FRAMEWORK_PP_CUDA_GRAPHS", "FRAMEWORK_SYMM_MEM_ALLREDUCE")  # checked here before they turn on
PROMPTS = ["Hello, my name is", "The capital of France is " * 20, [5, 9, 100, 7, 42] * 30]


def _device_settings(device: str) -> dict:
    """On the CPU (``check_ray.py --device cpu``) a small fixed KV pool instead of memory profiling."""
    return {"device": device, **({"kv_cache_memory": 1 << 24} if device == "cpu" else {})}


def run(path: Path, device: str = "cuda", **settings):
    """Greedy ids and logprobs of ``PROMPTS`` (x4), the seconds it took, and whether decode graphs were on."""
    import framework

    llm = framework.LLM(
        str(path), dtype="float32", max_model_len=512, max_num_batched_tokens=128, **_device_settings(device),
        **settings,
    )  # fmt: skip
    params = framework.SamplingParams(temperature=0, max_tokens=40, logprobs=2)
    try:
        start = time.perf_counter()
        outs = llm.generate(PROMPTS * 4, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        graphs = llm.engine.runner.graphs is not None
    finally:
        stop = time.perf_counter()
        llm.engine.shutdown()
        print(f"  shutdown took {time.perf_counter() - stop:.2f} s", flush=True)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs], seconds, graphs


def compare(ref, got) -> tuple[bool, float]:
    worst, same = 0.0, True
    for (ids_a, lps_a), (ids_b, lps_b) in zip(ref, got):
        same &= ids_a == ids_b
        for a, b in zip(lps_a, lps_b):
            for token, lp in a.items():
                if token in b:
                    worst = max(worst, abs(lp.logprob - b[token].logprob))
    return same, worst


def kill_check(path: Path, device: str = "cuda", **settings) -> bool:
    """A TP=2 engine whose rank-1 worker is SIGKILLed mid-request: the request fails naming the rank, fast."""
    import framework
    from framework.distributed import WorkerDiedError

    llm = framework.LLM(str(path), dtype="float32", max_model_len=2048, tensor_parallel_size=2,
                        **_device_settings(device), **settings)  # fmt: skip
    errors: list = []

    def generate():
        try:
            llm.generate(["Hi"] * 8, framework.SamplingParams(max_tokens=1500, ignore_eos=True), use_tqdm=False)
        except WorkerDiedError as exc:  # expected
            errors.append((time.monotonic(), exc))

    thread = threading.Thread(target=generate)
    thread.start()
    time.sleep(3)
    worker = llm.engine.runner.procs[1]
    killed = time.monotonic()
    os.kill(worker.pid, signal.SIGKILL)
    thread.join(30)
    llm.engine.shutdown()
    left = [p.pid for p in llm.engine.runner.procs.values() if p.poll() is None]
    ok = bool(errors) and "rank 1" in str(errors[0][1]) and errors[0][0] - killed < 10 and not left
    delay = errors[0][0] - killed if errors else float("nan")
    print(f"kill: error after {delay:.2f} s: {errors[0][1] if errors else None!r}; workers left {left} -> {ok}")
    return ok


def main() -> int:
    import faulthandler

    from framework.testing import make_tiny_model

    faulthandler.dump_traceback_later(float(os.environ.get("CHECK_TP_STACKS_AFTER_S", "280")), exit=True)

    gpus = torch.cuda.device_count()
    print(f"{gpus} GPUs: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    layouts = [  # (tp, pp, opt-in switches set)
        (2, 1, ()), (2, 1, ("FRAMEWORK_SYMM_MEM_ALLREDUCE",)), (1, 2, ()), (1, 2, ("FRAMEWORK_PP_CUDA_GRAPHS",)),
        (2, 2, ()), (2, 2, OPT_IN),
    ]  # fmt: skip
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            "llama-gqa": make_tiny_model("LlamaForCausalLM", Path(tmp) / "llama", num_hidden_layers=4),
            "qwen2-1kv": make_tiny_model("Qwen2ForCausalLM", Path(tmp) / "qwen2", num_key_value_heads=1),
        }
        for name, path in models.items() if "--kill-only" not in sys.argv else ():
            for eager in (False, True):
                ref, ref_s, _ = run(path, enforce_eager=eager)
                for tp, pp, switches in layouts:
                    if tp * pp > gpus or (switches and eager):
                        continue
                    for switch in OPT_IN:  # the workers inherit the environment
                        os.environ[switch] = "1" if switch in switches else "0"
                    got, seconds, graphs = run(
                        path, tensor_parallel_size=tp, pipeline_parallel_size=pp, enforce_eager=eager
                    )
                    same, worst = compare(ref, got)
                    pp_graphs = "FRAMEWORK_PP_CUDA_GRAPHS" in switches
                    ok = same and worst < 1e-4 and graphs == (not eager and (pp == 1 or pp_graphs))
                    failures += not ok
                    print(
                        f"{name} tp={tp} pp={pp} graphs={graphs} {' '.join(switches)}: ids equal {same}, "
                        f"max |dlogprob| {worst:.2e}, "
                        f"{seconds:.2f} s vs {ref_s:.2f} s on one GPU -> {'ok' if ok else 'FAIL'}",
                        flush=True,
                    )
        if gpus >= 2:
            for switch in OPT_IN:
                os.environ.pop(switch, None)
            failures += not kill_check(models["llama-gqa"])
    print("all ok" if not failures else f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
