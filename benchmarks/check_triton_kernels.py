"""Check and time the Triton fast path on a CUDA GPU, in one run.

1. The kernel tests on the GPU grid (bfloat16, long contexts, more shapes;
   ``tests/kernels/test_triton_*.py`` pick it when CUDA is available).
2. Greedy generation of the tiny models (Llama, Qwen2, Mistral; float32,
   float16, bfloat16; block sizes 16 and 32; chunked prefill) through
   ``attention_backend="triton"`` with the fused ops, against the torch
   reference backend with the layers' torch code: in float32 the token ids
   must be equal; 16-bit runs report the logprob difference over the tokens
   both paths share, and how close each path stays to the float32 run of the
   same checkpoint (the tiny models' logit gaps can sit inside 16-bit noise).
3. A quick timing (``triton.testing.do_bench``, median) of decode and prefill
   attention at Llama-3-8B's attention shape, and of the fused ops, against
   the torch code on the same GPU.

    python benchmarks/check_triton_kernels.py [--skip-tests] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_tests(out_dir: Path | None, timeout: float) -> bool:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels", "--durations=8", "-rf"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, timeout=timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, text = "timeout", (exc.stdout or b"").decode() + (exc.stderr or b"").decode()
    if out_dir:
        (out_dir / "pytest_kernels.log").write_text(text)
    tail = text.strip().splitlines()[-16:]
    print(f"[tests] {' '.join(cmd[3:])}: rc={rc} in {time.perf_counter() - start:.0f} s")
    print("\n".join("    " + line for line in tail))
    return rc == 0


# -- 2. greedy equality of the tiny models ------------------------------------


def generate(path: Path, dtype: str, backend: str, fused_ops: bool, block_size: int, chunk: int, prompts):
    """[(token ids, per-token logprobs)] of greedy runs of every prompt."""
    import framework
    from framework import ops

    ops.set_enabled(fused_ops)
    llm = framework.build(
        {
            "model": str(path), "dtype": dtype, "attention_backend": backend, "block_size": block_size,
            "max_model_len": 512, "max_num_seqs": 16, "max_num_batched_tokens": chunk, "device": "cuda",
        }
    )  # fmt: skip
    assert llm.engine.runner.backend.name == backend
    params = framework.SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = []
    for o in outs:
        ids = list(o.outputs[0].token_ids)
        result.append((ids, [lp[t].logprob for t, lp in zip(ids, o.outputs[0].logprobs)]))
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    ops.set_enabled(True)
    return result


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(got, ref) -> tuple[int, float, float]:
    """(sequences with equal ids, mean common-prefix length, max |logprob difference| over common prefixes)."""
    same, prefixes, worst = 0, [], 0.0
    for (ids, lps), (ref_ids, ref_lps) in zip(got, ref):
        n = common_prefix(ids, ref_ids)
        same += ids == ref_ids
        prefixes.append(n)
        worst = max([worst] + [abs(a - b) for a, b in zip(lps[:n], ref_lps[:n])])
    return same, sum(prefixes) / len(prefixes), worst


def greedy_check() -> bool:
    """Triton backend + fused ops vs the torch backend + torch layer code, greedy, on tiny models.

    float32: the token ids must be equal. 16-bit: the tiny models' top-2 logit
    gaps often sit inside 16-bit noise, so both paths are measured against the
    float32 run of the same checkpoint (mean tokens before the first
    divergence, out of 48): the Triton path should be as close as the torch one.
    """
    from framework.testing import make_tiny_model

    rng = np.random.default_rng(0)
    # token-id prompts of mixed lengths (1 .. 300): decodes and prefills share steps
    prompts = [rng.integers(3, 200, size=int(n)).tolist() for n in (1, 5, 17, 33, 64, 100, 129, 300)]
    models = [
        ("LlamaForCausalLM", {}),  # head_dim 16, GQA 2
        ("Qwen2ForCausalLM", {}),  # q/k/v biases
        ("MistralForCausalLM", {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 1}),  # d64, MQA
        ("LlamaForCausalLM", {"hidden_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}),  # d128
    ]
    ok = True
    print("[greedy] tiny models, 8 prompts x 48 tokens; triton = triton backend + fused ops, torch = torch backend")
    print("         + torch layer code; 'vs fp32' = mean tokens before the first divergence from the float32 run")
    print(f"    {'model':<24} {'dtype':<9} {'bs':>3} {'chunk':>5}  {'ids equal':>9}  {'max|dlogp|':>10}  "
          f"{'torch vs fp32':>13} {'triton vs fp32':>14}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for index, (arch, overrides) in enumerate(models):
            name = f"{arch.removesuffix('ForCausalLM')}(d{overrides.get('hidden_size', 64) // 4})"
            for dtype in ("float32", "float16", "bfloat16"):
                path = make_tiny_model(arch, Path(tmp) / f"{index}-{dtype}", dtype=dtype, seed=index, **overrides)
                fp32 = generate(path, "float32", "torch", False, 16, 8192, prompts) if dtype != "float32" else None
                for block_size, chunk in ((16, 8192), (32, 64)):
                    ref = generate(path, dtype, "torch", False, block_size, chunk, prompts)
                    fast = generate(path, dtype, "triton", True, block_size, chunk, prompts)
                    same, _, dlogp = compare(fast, ref)
                    row = f"    {name:<24} {dtype:<9} {block_size:>3} {chunk:>5}  {same:>7}/8  {dlogp:>10.2e}  "
                    if fp32 is None:
                        ok &= same == len(ref)
                    else:
                        row += f"{compare(ref, fp32)[1]:>13.1f} {compare(fast, fp32)[1]:>14.1f}"
                    print(row)
    print(f"[greedy] float32 token ids equal everywhere: {ok}")
    return ok


# -- 3. timing ------------------------------------------------------------------


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def paged_case(seqs, *, hq=32, hk=8, d=128, block_size=16, dtype=torch.bfloat16):
    """Cache, q/k/v and BatchInputs for sequences (context, new), decodes first; random data."""
    from framework.attention import BatchInputs

    dev = "cuda"
    lengths = [c + n for c, n in seqs]
    blocks_per = [-(-n // block_size) for n in lengths]
    perm = torch.randperm(sum(blocks_per), device=dev, dtype=torch.int32)
    width = max(blocks_per)
    tables = torch.zeros(len(seqs), width, dtype=torch.int32, device=dev)
    offset = 0
    for i, n in enumerate(blocks_per):
        tables[i, :n] = perm[offset : offset + n]
        offset += n
    new = [n for _, n in seqs]
    qsl = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    seq_lens = np.array(lengths, dtype=np.int32)
    positions = torch.cat([torch.arange(c, c + n, device=dev) for c, n in seqs])
    seq_of = torch.repeat_interleave(torch.arange(len(seqs), device=dev), torch.tensor(new, device=dev))
    slots = tables[seq_of, positions // block_size].long() * block_size + positions % block_size
    nd = sum(1 for n in new if n == 1)
    batch = BatchInputs(
        query_start_loc_np=qsl, seq_lens_np=seq_lens, num_decodes=nd, max_query_len=max(new),
        max_seq_len=int(seq_lens.max()), block_size=block_size,
        query_start_loc=torch.from_numpy(qsl).to(dev), seq_lens=torch.from_numpy(seq_lens).to(dev),
        block_tables=tables, slot_mapping=slots, positions=positions,
    )  # fmt: skip
    t = int(qsl[-1])
    cache = torch.randn(2, sum(blocks_per), block_size, hk, d, device=dev, dtype=dtype)
    q = torch.randn(t, hq, d, device=dev, dtype=dtype)
    k = torch.randn(t, hk, d, device=dev, dtype=dtype)
    v = torch.randn(t, hk, d, device=dev, dtype=dtype)
    return q, k, v, cache, batch


def attention_timings(rows):
    from plugins.kernels.torch_paged import TorchPagedAttention
    from plugins.kernels.triton_paged import TritonPagedAttention

    hq, hk, d = 32, 8, 128
    cases = {
        "decode B=64 ctx=2048": [(2047, 1)] * 64,
        "decode B=256 ctx=640 (W1-like)": [(639, 1)] * 256,
        "decode B=1 ctx=640": [(639, 1)],
        "decode B=8 ctx=8192 (split-K)": [(8191, 1)] * 8,
        "decode B=1 ctx=32768 (split-K)": [(32767, 1)],
        "prefill 4 x 1024 fresh": [(0, 1024)] * 4,
        "prefill chunk 512 after 3072 cached": [(3072, 512)],
        "mixed 32 decodes ctx 1024 + 1 x 512 prefill": [(1023, 1)] * 32 + [(0, 512)],
    }
    for label, seqs in cases.items():
        q, k, v, cache, batch = paged_case(seqs, hq=hq, hk=hk, d=d)
        times = {}
        for backend_cls in (TritonPagedAttention, TorchPagedAttention):
            backend = backend_cls(hq, d, d**-0.5, hk)
            md = backend_cls.build_metadata(batch)
            times[backend_cls.name] = bench(lambda b=backend, m=md: b.forward(q, k, v, cache, m))
        kv_bytes = sum(c + n for c, n in seqs) * hk * d * 2 * 2  # K and V read once, bf16
        flops = sum(4 * hq * d * n * (c + (n + 1) / 2) for c, n in seqs)  # QK^T and PV, causal
        tt, tr = times["triton"], times["torch"]
        rows.append(
            f"    {label:<44} triton {tt * 1e3:8.1f} us  torch {tr * 1e3:9.1f} us  x{tr / tt:6.1f}   "
            f"{kv_bytes / tt / 1e6:7.0f} GB/s  {flops / tt / 1e9:6.1f} TFLOP/s"
        )
        q = k = v = cache = batch = None
        torch.cuda.empty_cache()


def ops_timings(rows):
    from framework import ops
    from framework.layers import LayerContext, RMSNorm, SiluAndMul, get_rope

    dtype, dev, t = torch.bfloat16, "cuda", 4096
    norm = RMSNorm(4096, 1e-5, LayerContext(dtype=dtype, device=torch.device(dev)))
    x, r = torch.randn(t, 4096, device=dev, dtype=dtype), torch.randn(t, 4096, device=dev, dtype=dtype)
    gate_up = torch.randn(t, 2 * 14336, device=dev, dtype=dtype)
    rope = get_rope(128, 8192, {"rope_type": "default", "rope_theta": 500000.0}, dtype=dtype, device=dev)
    qkv = torch.randn(t, (32 + 16) * 128, device=dev, dtype=dtype)
    q, k, _ = qkv.split([4096, 1024, 1024], dim=-1)
    positions = torch.randint(0, 8192, (t,), device=dev)
    act = SiluAndMul()
    cases = {
        "rmsnorm+residual 4096x4096": (lambda: norm(x, r), 4 * t * 4096 * 2),
        "silu_and_mul 4096x2x14336": (lambda: act(gate_up), 3 * t * 14336 * 2),
        "rotary q32+k8 heads x128, 4096 tok": (lambda: rope(positions, q, k), 2 * t * 5120 * 2),
    }
    for label, (fn, nbytes) in cases.items():
        fused = bench(fn)
        ops.set_enabled(False)
        eager = bench(fn)
        ops.set_enabled(True)
        rows.append(
            f"    {label:<44} triton {fused * 1e3:8.1f} us  torch {eager * 1e3:9.1f} us  x{eager / fused:6.1f}   "
            f"{nbytes / fused / 1e6:7.0f} GB/s"
        )


def guarded(label: str, fn) -> bool:
    """Run one phase; a failure is reported and the next phase still runs."""
    try:
        return bool(fn())
    except Exception:
        print(f"[{label}] FAILED:")
        traceback.print_exc(file=sys.stdout)
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-greedy", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="folder for logs")
    parser.add_argument("--test-timeout", type=float, default=330, help="seconds for the pytest run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: run the CPU tests instead (python -m pytest tests/kernels)")
        return 2
    import triton

    props = torch.cuda.get_device_properties(0)
    print(f"[device] {props.name}, sm{props.major}{props.minor}, {props.multi_processor_count} SMs; "
          f"torch {torch.__version__}, triton {triton.__version__}")  # fmt: skip
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    ok = True
    if not args.skip_tests:
        ok &= run_tests(args.out, args.test_timeout)
    if not args.skip_greedy:
        ok &= guarded("greedy", greedy_check)
    rows: list[str] = []
    ok &= guarded("attention timing", lambda: attention_timings(rows) or True)
    ok &= guarded("ops timing", lambda: ops_timings(rows) or True)
    print("[timing] median of do_bench; Llama-3-8B attention shape (32 q heads, 8 kv heads, d128, bf16, block 16)")
    print("\n".join(rows))
    if args.out:
        (args.out / "summary.json").write_text(json.dumps({"ok": ok, "timings": rows}, indent=1))
    print(f"[result] {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
