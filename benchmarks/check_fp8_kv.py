"""Check the fp8 KV cache on a CUDA GPU and measure what it buys, in one run (< 4 minutes on an H200).

1. Kernels: the Triton backend on float8_e4m3fn / float8_e5m2 caches against
   the torch reference (float64 on the dequantized cache): bfloat16
   activations, GQA 32/8, head_dim 128, block sizes 16 and 32, decode splits
   1, 3, 8 and the heuristic, contexts up to 9000 tokens (crossing split,
   page and tile boundaries), arbitrary scales and saturated values. The
   stored bytes must equal ``plugins.quant.fp8_kv.quantize`` exactly and the
   relative error stay under the bfloat16 bound of the kernel tests
   (``tests/kernels/test_triton_paged.py::fp8_errors``); worst errors printed.
2. Tiny Llama end to end (bfloat16, Triton, CUDA graphs): greedy logprobs with
   an fp8 cache against the bf16 cache (max |dlogprob| over the shared prefix).
3. Llama-3-8B shape (dummy weights, bfloat16, max_model_len 8192,
   gpu_memory_utilization 0.9): KV blocks and maximum concurrency
   (``blocks * block_size / max_model_len``) with kv_cache_dtype auto vs fp8,
   and a short W1-like offline throughput run for each (``--num-prompts``).

    python benchmarks/check_fp8_kv.py [--num-prompts 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def kernel_check() -> dict:
    spec = importlib.util.spec_from_file_location("test_triton_paged", ROOT / "tests/kernels/test_triton_paged.py")
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    from plugins.kernels import triton_decode

    original = triton_decode.choose_num_splits
    worst = {}
    try:
        for case in tests.FP8_GPU_CASES:
            splits = case[6]
            triton_decode.choose_num_splits = original if splits is None else (lambda *a, s=splits: s)
            for seed, scenario in enumerate([tests.SHORT, tests.LONG]):
                errors = tests.fp8_errors(case, scenario, seed)  # asserts the stored bytes
                step, seq, err = max(errors, key=lambda e: e[2])
                bound = tests.BOUND[case[0]]
                name = f"{tests.fp8_case_id(case)}-{'long' if seed else 'short'}"
                worst[name] = err
                print(f"  {name:70s} worst rel err {err:.2e} (step {step}, seq {seq}; bound {bound:.0e})")
                assert err < bound, f"{name}: relative error {err:.2e} >= {bound:.0e}"
    finally:
        triton_decode.choose_num_splits = original
    return worst


def free(llm) -> None:
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def tiny_end_to_end() -> dict:
    import framework
    from framework.testing import make_tiny_model

    path = make_tiny_model("LlamaForCausalLM", Path(tempfile.mkdtemp()) / "tiny", initializer_range=0.05,
                           logit_scale=2.0, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                           hidden_size=256)  # fmt: skip
    prompts = ["The quick brown fox jumps over the lazy dog, and then", "Hello", "1 2 3 4 5 6 7 8 9 10 11 12"]
    params = framework.SamplingParams(temperature=0, max_tokens=48, logprobs=0, ignore_eos=True)
    runs = {}
    for kv in ("auto", "fp8", "fp8_e5m2"):
        llm = framework.build({"model": str(path), "dtype": "bfloat16", "kv_cache_dtype": kv, "max_model_len": 512,
                               "max_num_batched_tokens": 32, "attention_backend": "triton", "device": "cuda"})  # fmt: skip
        assert llm.engine.runner.use_cuda_graphs and llm.engine.runner.backend.name == "triton"
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs[kv] = [[(t, lp[t].logprob) for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
        free(llm)
    result = {}
    for kv in ("fp8", "fp8_e5m2"):
        diffs, shared = [], 0
        for ref, got in zip(runs["auto"], runs[kv]):
            for (t0, l0), (t1, l1) in zip(ref, got):
                if t0 != t1:
                    break
                diffs.append(abs(l0 - l1))
                shared += 1
        result[kv] = {"max_abs_dlogprob": max(diffs), "shared_tokens": shared, "total_tokens": 48 * len(prompts)}
        print(f"  tiny Llama bf16, {kv:8s} vs bf16 cache: max |dlogprob| {max(diffs):.3f} over {shared} shared tokens")
        assert max(diffs) < 1.0, f"{kv}: logprobs far from the bf16 cache"
    return result


def llama8b(kv: str, num_prompts: int, model_dir: Path) -> dict:
    import framework
    from framework.bench.datasets import random_requests

    start = time.perf_counter()
    llm = framework.build({"model": str(model_dir), "load_format": "dummy", "dtype": "bfloat16", "kv_cache_dtype": kv,
                           "max_model_len": 8192, "gpu_memory_utilization": 0.9, "max_num_seqs": 256})  # fmt: skip
    startup = time.perf_counter() - start
    engine = llm.engine
    blocks, block_size = engine.num_blocks, engine.config.block_size
    result = {
        "kv_cache_dtype": kv,
        "cache_dtype": str(engine.runner.kv_cache.dtype),
        "num_blocks": blocks,
        "kv_cache_gib": round(engine.runner.kv_cache.numel() * engine.runner.kv_cache.element_size() / 2**30, 2),
        "max_concurrency_at_8192": round(blocks * block_size / 8192, 2),
        "startup_s": round(startup, 1),
    }
    if num_prompts:
        requests = random_requests(num_prompts, (64, 1024), (16, 512), engine.model_config.vocab_size, seed=0)
        params = [framework.SamplingParams(temperature=1.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
        llm.generate([requests[0].prompt], framework.SamplingParams(max_tokens=4), use_tqdm=False)
        start = time.perf_counter()
        outs = llm.generate([r.prompt for r in requests], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outs)
        output_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        result.update(num_prompts=num_prompts, elapsed_s=round(elapsed, 2), tokens_per_s=round(tokens / elapsed),
                      output_tokens_per_s=round(output_tokens / elapsed))  # fmt: skip
    print("  8B", json.dumps(result))
    free(llm)
    return result


def llama8b_in_subprocess(kv: str, num_prompts: int, model_dir: Path) -> dict:
    """``llama8b`` in a fresh process, so that each engine gets the whole GPU (an engine's memory is not
    returned reliably within one process: CUDA graphs and caching allocator pools outlive ``del``)."""
    cmd = [sys.executable, __file__, "--one", kv, "--num-prompts", str(num_prompts), "--model", str(model_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("  8B ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"8B run with kv_cache_dtype={kv} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    print(lines[-1], flush=True)
    return json.loads(lines[-1][len("  8B "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one 8B engine, then exit
    parser.add_argument("--num-prompts", type=int, default=300, help="W1-like requests per throughput run (0: none)")
    parser.add_argument("--model", default="/tmp/llama3-8b", help="dummy Llama-3-8B directory (made if missing)")
    parser.add_argument("--out", default=None, help="directory for fp8_kv.json")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    if args.one:
        llama8b(args.one, args.num_prompts, Path(args.model))
        return
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    report, t0 = {}, time.perf_counter()
    print("[1] Triton kernels on fp8 caches vs the torch reference")
    report["kernels"] = kernel_check()
    print(f"[2] tiny Llama end to end ({time.perf_counter() - t0:.0f} s)")
    report["tiny"] = tiny_end_to_end()
    print(f"[3] Llama-3-8B shape: blocks, concurrency, throughput ({time.perf_counter() - t0:.0f} s)")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        from dummy_model import write_dummy_model  # benchmarks/ is on sys.path when run as a script

        write_dummy_model("llama3-8b", model_dir)
    report["llama3_8b"] = {kv: llama8b_in_subprocess(kv, args.num_prompts, model_dir) for kv in ("auto", "fp8")}
    auto, fp8 = report["llama3_8b"]["auto"], report["llama3_8b"]["fp8"]
    ratio = fp8["num_blocks"] / auto["num_blocks"]
    print(f"  fp8 / auto: {ratio:.2f}x blocks; max concurrency at 8192 tokens {auto['max_concurrency_at_8192']} -> "
          f"{fp8['max_concurrency_at_8192']}")  # fmt: skip
    assert 1.9 < ratio < 2.1, f"fp8 should double the blocks, got {ratio:.2f}x"
    print(f"done in {time.perf_counter() - t0:.0f} s")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "fp8_kv.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
