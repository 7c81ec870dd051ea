"""GPU check of swap preemption (run from the repository root: python benchmarks/check_swap.py).

1. The mixed workload of tests/engine/test_swap_preemption.py on CUDA (CUDA graphs on, the default):
   tokens equal to a big-pool run for preemption_mode recompute / swap / default, prefix caching on and off;
   swaps happened; every GPU and CPU block free at the end.
2. Swap bandwidth of ModelRunner._swap_blocks (pinned CPU cache) on a wider model (256 KiB blocks).
"""

import sys
import tempfile
import time

import torch

sys.path.insert(0, "tests/engine")
import framework  # noqa: E402
from framework.testing import make_tiny_model  # noqa: E402
from test_swap_preemption import logprobs_of, mixed_workload, tokens_of  # noqa: E402

print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (graphs off)")
sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
tmp = tempfile.mkdtemp()
model = make_tiny_model("LlamaForCausalLM", f"{tmp}/llama")


def build(**config):
    return framework.build({"model": str(model), "max_model_len": 256, "dtype": "float32", **config})


ref_llm = build(enable_prefix_caching=False)
ref = ref_llm.generate(*mixed_workload(), use_tqdm=False)
block_bytes = ref_llm.engine.runner.kv_block_bytes()
del ref_llm
failures = 0
for mode in ("recompute", "swap", None):
    for caching in (False, True):
        llm = build(kv_cache_memory=20 * block_bytes, max_num_batched_tokens=64, preemption_mode=mode,
                    enable_prefix_caching=caching, swap_space=0.01)  # fmt: skip
        out = llm.generate(*mixed_workload(), use_tqdm=False)
        s = llm.get_stats()
        same = tokens_of(out) == tokens_of(ref)
        worst = max(abs(a - b) for a, b in zip(logprobs_of(out), logprobs_of(ref)))
        free = llm.engine.kv.pool.num_free == llm.engine.num_blocks and llm.engine.kv.cpu_pool.num_free == llm.engine.num_cpu_blocks
        ok = same and worst < 1e-3 and free and (s.num_swap_preemptions > 0) == (mode != "recompute")
        failures += not ok
        print(f"mode={mode} caching={caching}: same tokens {same}, max |dlogprob| {worst:.2e}, all free {free}, "
              f"swap/recompute preemptions {s.num_swap_preemptions}/{s.num_recompute_preemptions}, "
              f"blocks out/in {s.swapped_out_blocks}/{s.swapped_in_blocks}, graphs {llm.engine.runner.graphs is not None}"
              f" -> {'OK' if ok else 'FAIL'}")  # fmt: skip
        del llm

wide = make_tiny_model("LlamaForCausalLM", f"{tmp}/wide", hidden_size=1024, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=8, intermediate_size=2048)  # fmt: skip
llm = framework.build({"model": str(wide), "max_model_len": 256, "dtype": "float16", "kv_cache_memory": 2 << 30,
                       "swap_space": 1.0, "enforce_eager": True})  # fmt: skip
runner = llm.engine.runner
bb = runner.kv_block_bytes()
n = min(2048, llm.engine.num_cpu_blocks, llm.engine.num_blocks)
pairs = [(i, i) for i in range(n)]
for label, out, into in (("swap-out", pairs, []), ("swap-in", [], pairs)):
    runner._swap_blocks(out, into)  # warm-up
    sync()
    t = time.perf_counter()
    for _ in range(5):
        runner._swap_blocks(out, into)
    sync()
    dt = (time.perf_counter() - t) / 5
    print(f"{label}: {n} blocks of {bb // 1024} KiB = {n * bb / 2**20:.0f} MiB in {dt * 1e3:.1f} ms: "
          f"{n * bb / dt / 1e9:.1f} GB/s")  # fmt: skip
print("FAILURES", failures)
sys.exit(1 if failures else 0)
