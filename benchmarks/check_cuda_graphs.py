"""Greedy outputs with and without decode CUDA graphs must be equal (GPU).

Tiny random-weight models (Llama GQA, Qwen2 with biases, Mistral MQA d64,
Llama d128) generate greedily through the Triton backend twice: with CUDA
graphs (the default, with async scheduling: each replay's input ids come
from the previous step's samples on the device), with graphs and
``async_scheduling=False``, and with ``enforce_eager=True`` and no async
scheduling (the reference; its linears take the same small-M GEMV as the
graphs, ``FRAMEWORK_TRITON_GEMV_EAGER=1``, so that both do the same
arithmetic). 20 token-id prompts of
1..300 tokens with different output lengths run with ``max_num_seqs=16``, so
the decode batch shrinks through the buckets (16, 8, 4, 2, 1) and most
replays are padded. Float32: the token ids must be equal and the logprobs
within 1e-4. 16-bit: reported (ids equal, mean common prefix, max logprob
difference), since a tiny model's top-2 gap can sit inside 16-bit noise and
a graph's fixed split-K count changes the rounding of the attention sum.

    python benchmarks/check_cuda_graphs.py
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def generate(path: Path, dtype: str, eager: bool, prompts, max_tokens, async_scheduling: bool):
    """(per-prompt (ids, logprobs), replay batch sizes, capture seconds, graph GiB)."""
    import framework

    llm = framework.build(
        {
            "model": str(path), "dtype": dtype, "max_model_len": 512, "max_num_seqs": 16,
            "max_num_batched_tokens": 512, "device": "cuda", "enforce_eager": eager,
            "async_scheduling": async_scheduling,
        }
    )  # fmt: skip
    runner = llm.engine.runner
    assert runner.backend.name == "triton"
    replays: list[int] = []
    if runner.graphs is not None:
        run = runner.graphs.run
        runner.graphs.run = lambda prepared, *ids: replays.append(len(prepared.seqs)) or run(prepared, *ids)
    params = [framework.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=0) for n in max_tokens]
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = []
    for o in outs:
        ids = list(o.outputs[0].token_ids)
        result.append((ids, [lp[t].logprob for t, lp in zip(ids, o.outputs[0].logprobs)]))
    graphs = runner.graphs
    stats = (graphs.capture_seconds, graphs.memory_bytes / 2**30) if graphs is not None else (0.0, 0.0)
    del llm, runner
    gc.collect()
    torch.cuda.empty_cache()
    return result, replays, stats


def compare(got, ref) -> tuple[int, float, float]:
    same, prefixes, worst = 0, [], 0.0
    for (ids, lps), (ref_ids, ref_lps) in zip(got, ref):
        n = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), min(len(ids), len(ref_ids)))
        same += ids == ref_ids
        prefixes.append(n)
        worst = max([worst] + [abs(a - b) for a, b in zip(lps[:n], ref_lps[:n])])
    return same, sum(prefixes) / len(prefixes), worst


def main() -> int:
    os.environ["FRAMEWORK_TRITON_GEMV_EAGER"] = "1"  # eager steps take the graphs' GEMV (same arithmetic)
    if not torch.cuda.is_available():
        print("no CUDA device: tests/engine/test_cuda_graphs.py checks the static buffers on the CPU")
        return 2
    from framework.testing import make_tiny_model

    rng = np.random.default_rng(0)
    lengths = [1, 5, 17, 33, 64, 100, 129, 300, 2, 9, 40, 77, 3, 12, 250, 31, 8, 60, 150, 20]
    prompts = [rng.integers(3, 200, size=n).tolist() for n in lengths]
    max_tokens = [int(n) for n in rng.integers(4, 64, size=len(prompts))]
    models = [
        ("LlamaForCausalLM", {}),
        ("Qwen2ForCausalLM", {}),
        ("MistralForCausalLM", {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 1}),
        ("LlamaForCausalLM", {"hidden_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}),
    ]
    ok = True
    print(f"[graphs] {len(prompts)} prompts, max_num_seqs 16; graphs (async scheduling on / off) vs eager "
          f"(enforce_eager=True, async scheduling off)")
    print(f"    {'model':<22} {'dtype':<9} {'async':<5} {'ids equal':>9} {'prefix':>7} {'max|dlogp|':>11} {'replays':>8} "
          f"{'padded':>7} {'capture':>8} {'pool':>8}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for index, (arch, overrides) in enumerate(models):
            name = f"{arch.removesuffix('ForCausalLM')}(d{overrides.get('hidden_size', 64) // 4})"
            for dtype in ("float32", "bfloat16"):
                path = make_tiny_model(arch, Path(tmp) / f"{index}-{dtype}", dtype=dtype, seed=index, **overrides)
                eager, _, _ = generate(path, dtype, True, prompts, max_tokens, False)
                for overlap in (True, False):
                    graphs, replays, (seconds, gib) = generate(path, dtype, False, prompts, max_tokens, overlap)
                    same, prefix, dlogp = compare(graphs, eager)
                    padded = sum(n not in (1, 2, 4, 8, 16) for n in replays)
                    if dtype == "float32":
                        ok &= same == len(prompts) and dlogp < 1e-4 and padded > 0
                    print(f"    {name:<22} {dtype:<9} {'on' if overlap else 'off':<5} {same:>6}/{len(prompts)} "
                          f"{prefix:>7.1f} {dlogp:>11.2e} {len(replays):>8} {padded:>7} {seconds:>7.2f}s "
                          f"{gib * 1024:>6.0f}MiB")  # fmt: skip
    print(f"[graphs] float32 ids equal and logprobs within 1e-4 everywhere: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
