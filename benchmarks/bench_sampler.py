"""Sampling cost against a decode step of the 8B shape at batch 256 (GPU), in one run.

(b) The sampler alone at N=256 rows, V=128256 (the Llama-3 vocabulary), float32
    logits rounded through bfloat16 (the model's LM-head dtype, so many exact
    ties): ``StandardSampler`` on its torch path (the sort-based code it
    replaced; the CPU path now) and on its Triton path, median over repeats,
    for top_p=0.9 and top_k=50 + top_p=0.9, with presence 0.5, frequency 0.5
    and repetition 1.1 penalties over 512 prompt + 512 generated tokens per
    row; without penalties; and on flat logits (the nucleus is most of the
    vocabulary: the kernel's worst case). Logits "llm": N(0, 2) plus 32
    tokens per row raised by U(0, 12). Both paths draw the same noise, so
    their tokens must agree (``mismatch``; the rows whose cut lies within
    float round-off of top_p may differ). ``metadata_ms``: the engine's
    ``build_sampling_metadata`` for those rows (host + device), which the
    sampler's time does not include.
(a) The decode step: our engine (eager) on the llama3-8b shape with dummy
    weights, 256 running requests with 512-token prompts, median of
    ``engine.step()`` over steady decode steps: greedy (the denominator),
    then again with top_p=0.9 + the penalties (the difference is the whole
    in-engine sampling cost, metadata included).

(c) With ``--small-n 1,2,4,8``: ``triton_sampling.filtered_sample`` alone at
    those N (V = ``--vocab``), temperature 1.0, no top-k / top-p (vLLM's
    ``bench latency`` settings), its split-vocabulary path against the
    one-program kernel: median GPU time over ``--reps`` launches (CUDA
    events, each launch queued behind a short device sleep so host launch
    time is not measured; logits and noise stay in L2, as after the LM
    head), median host time per call, each of ``SPLIT_CONFIGS``, and the
    checks that the tokens are identical (also on mixed rows: greedy,
    temperature 0.7, min-p, raw logits, repeated launches) and the counters
    left zeroed. One line per N, then one JSON line.

    python benchmarks/bench_sampler.py --json /tmp/sampler.json
    python benchmarks/bench_sampler.py --small-n 1,2,4,8,16,32,64 --skip-sampler --skip-engine
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from framework.engine.sampling_inputs import build_sampling_metadata  # noqa: E402
from framework.engine.sequence import Sequence  # noqa: E402
from framework.sampling_params import SamplingParams  # noqa: E402
from plugins.samplers import triton_sampling, triton_split_sample  # noqa: E402
from plugins.samplers.processors import apply_logits_processors  # noqa: E402
from plugins.samplers.standard import StandardSampler, exponential_noise  # noqa: E402

PENALTIES = dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1)
CASES = {  # name: (SamplingParams fields, logits kind)
    "top_p=0.9 + penalties": (dict(top_p=0.9, **PENALTIES), "llm"),
    "top_k=50 top_p=0.9 + penalties": (dict(top_k=50, top_p=0.9, **PENALTIES), "llm"),
    "top_p=0.9": (dict(top_p=0.9), "llm"),
    "top_k=50": (dict(top_k=50), "llm"),
    "temperature only": (dict(), "llm"),
    "top_p=0.9 flat logits": (dict(top_p=0.9), "flat"),
}
KERNEL_CONFIGS = [  # candidates for triton_sampling.DEFAULT_CONFIG, the current default first
    dict(triton_sampling.DEFAULT_CONFIG),
    dict(BLOCK=1024, BLOCK_E=256, BLOCK_C=4096, CAP=2048, NUM_PIVOTS=16, num_warps=8),
    dict(BLOCK=512, BLOCK_E=128, BLOCK_C=1024, CAP=2048, NUM_PIVOTS=16, num_warps=4),
    dict(BLOCK=1024, BLOCK_E=256, BLOCK_C=2048, CAP=2048, NUM_PIVOTS=8, num_warps=8),
]

SPLIT_CONFIGS = [  # candidates for triton_split_sample.SPLIT_CONFIG, the current default first
    dict(triton_split_sample.SPLIT_CONFIG),
    dict(CHUNK=1024, BLOCK=1024, num_warps=4),
    dict(CHUNK=2048, BLOCK=2048, num_warps=8),
    dict(CHUNK=4096, BLOCK=1024, num_warps=4),
    dict(CHUNK=4096, BLOCK=2048, num_warps=8),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def make_logits(kind: str, n: int, vocab: int, device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device).manual_seed(seed)
    if kind == "flat":
        x = torch.randn(n, vocab, generator=gen, device=device) * 0.5
    else:
        x = torch.randn(n, vocab, generator=gen, device=device) * 2.0
        boosted = torch.randint(0, vocab, (n, 32), generator=gen, device=device)
        x.scatter_add_(1, boosted, torch.rand(n, 32, generator=gen, device=device) * 12)
    return x.to(torch.bfloat16).float()


def make_seqs(n: int, vocab: int, params: SamplingParams, history: int, seed: int = 0) -> list[Sequence]:
    rng = random.Random(seed)
    seqs = []
    for i in range(n):
        seq = Sequence(str(i), [rng.randrange(vocab) for _ in range(history)], params)
        seq.token_ids += [rng.randrange(vocab) for _ in range(history)]
        seqs.append(seq)
    return seqs


def bench_sampler(args, device) -> dict:
    n, vocab = args.num_seqs, args.vocab
    results = {}
    logits_by_kind = {kind: make_logits(kind, n, vocab, device) for kind in ("llm", "flat")}
    if not args.skip_sweep:
        results["kernel_configs"] = sweep_configs(args, device, logits_by_kind)
        timed = [row for row in results["kernel_configs"] if isinstance(row.get("llm_p_ms"), float)]
        best = min(timed, key=lambda row: row["llm_p_ms"] + row["flat_p_ms"])
        triton_sampling.DEFAULT_CONFIG.update({k: best[k] for k in KERNEL_CONFIGS[0]})
    results["config"] = dict(triton_sampling.DEFAULT_CONFIG)
    print("kernel config", json.dumps(results["config"]), flush=True)
    for name, (fields, kind) in CASES.items():
        logits = logits_by_kind[kind]
        seqs = make_seqs(n, vocab, SamplingParams(temperature=1.0, **fields), args.history)
        md = build_sampling_metadata(seqs, vocab, device)
        row = {"metadata_ms": median_ms(lambda: build_sampling_metadata(seqs, vocab, device), device, 5, 1)}
        outs = {}
        for path, use_triton in (("torch", False), ("triton", True)):
            sampler = StandardSampler(use_triton=use_triton)
            row[f"{path}_ms"] = median_ms(lambda: sampler(logits, md), device, args.reps)
            torch.manual_seed(1)
            outs[path] = sampler(logits, md)
        row["mismatch"] = int((outs["torch"].token_ids != outs["triton"].token_ids).sum())
        row["logprob_max_diff"] = float((outs["torch"].logprobs - outs["triton"].logprobs).abs().max())
        if md.penalty_rows is not None:
            fast = apply_logits_processors(logits, md, use_triton=True)
            row["penalties_exact"] = bool(torch.equal(fast, apply_logits_processors(logits, md, use_triton=False)))
            row["penalties_torch_ms"] = median_ms(lambda: apply_logits_processors(logits, md), device, args.reps)
            row["penalties_triton_ms"] = median_ms(
                lambda: apply_logits_processors(logits, md, use_triton=True), device, args.reps
            )
        stats = torch.zeros(n, 4, device=device)
        q = exponential_noise(logits, {})
        top_k = None if md.no_top_k else md.top_k
        top_p = None if md.no_top_p else md.top_p
        row["kernel_ms"] = median_ms(
            lambda: triton_sampling.filtered_sample(
                logits, q, md.temperature, top_k, top_p, None, any_greedy=False, stats=stats),
            device, args.reps,
        )  # fmt: skip
        row["noise_ms"] = median_ms(lambda: exponential_noise(logits, {}), device, args.reps)
        row["mean_bracket_passes"] = float(stats[:, 3].mean())
        row["mean_kept"] = _mean_kept(logits, stats)
        results[name] = row
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    results["mixed rows"] = check_mixed(args, device)
    return results


def check_mixed(args, device) -> dict:
    """Rows of mixed parameters (greedy, temperature != 1, top-k, top-p, min-p, bans): both paths, same noise."""
    from framework.sampling_metadata import SamplingMetadata

    n, vocab = args.num_seqs, args.vocab
    gen = torch.Generator(device).manual_seed(3)
    logits = make_logits("llm", n, vocab, device, seed=3)
    logits.masked_fill_(torch.rand(n, vocab, generator=gen, device=device) < 0.1, float("-inf"))

    def pick(*choices, dtype=torch.float32):
        index = torch.randint(len(choices), (n,), generator=gen, device=device)
        return torch.tensor(choices, dtype=dtype, device=device)[index]

    md = SamplingMetadata(
        temperature=pick(0.0, 0.7, 1.0, 1.3), top_k=pick(vocab, 1, 20, 50, 1000, dtype=torch.int64),
        top_p=pick(1.0, 0.5, 0.9, 0.95), min_p=pick(0.0, 0.0, 0.05),
        no_top_k=False, no_top_p=False, no_min_p=False,
    )  # fmt: skip
    outs = {}
    for path, use_triton in (("torch", False), ("triton", True)):
        torch.manual_seed(2)
        outs[path] = StandardSampler(use_triton=use_triton)(logits, md)
    row = {
        "mismatch": int((outs["torch"].token_ids != outs["triton"].token_ids).sum()),
        "triton_ms": median_ms(lambda: StandardSampler(use_triton=True)(logits, md), device, args.reps),
        "torch_ms": median_ms(lambda: StandardSampler(use_triton=False)(logits, md), device, args.reps),
    }
    print("mixed rows", json.dumps(row), flush=True)
    return row


def _mean_kept(logits: torch.Tensor, stats: torch.Tensor) -> float:
    cut, n_keep = stats[:, 0:1], stats[:, 1:2]
    kept = (logits > cut).sum(dim=1, keepdim=True) + n_keep  # temperature 1: s == logits
    kept = torch.where(cut.isnan(), torch.full_like(kept, logits.shape[1]), kept)
    return float(kept.float().mean())


def sweep_configs(args, device, logits_by_kind) -> list[dict]:
    """The kernel alone (top_p=0.9, no greedy row) under each candidate launch configuration."""
    n = args.num_seqs
    temperature = torch.ones(n, device=device)
    top_p = torch.full((n,), 0.9, device=device)
    rows = []
    for cfg in KERNEL_CONFIGS:
        row = dict(cfg)
        for kind, logits in logits_by_kind.items():
            q = exponential_noise(logits, {})
            try:
                row[f"{kind}_p_ms"] = median_ms(
                    lambda: triton_sampling.filtered_sample(
                        logits, q, temperature, None, top_p, None, any_greedy=False, **cfg),
                    device, args.reps,
                )  # fmt: skip
            except Exception as exc:  # a configuration the compiler refuses
                row[f"{kind}_p_ms"] = f"failed: {type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        print("config", json.dumps(row), flush=True)
    return rows


def gpu_us(fn, reps: int) -> tuple[float, float]:
    """(median GPU microseconds by CUDA events, median host microseconds per call) of ``fn``.

    Each timed launch waits behind a ~50 us device sleep, so the events
    bracket the kernels' device time rather than the host's launch time.
    """
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    device_us, host_us = [], []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(100_000)
        start.record()
        t0 = time.perf_counter()
        fn()
        host_us.append((time.perf_counter() - t0) * 1e6)
        end.record()
        end.synchronize()
        device_us.append(start.elapsed_time(end) * 1e3)
    return statistics.median(device_us), statistics.median(host_us)


def check_split_mixed(n: int, vocab: int, device, reps: int) -> dict:
    """Split path against the one-program kernel on mixed rows, launched ``reps`` times (a race would show)."""
    from framework.ops.split_k import counters_on

    gen = torch.Generator(device).manual_seed(n)
    logits = make_logits("llm", n, vocab, device, seed=n)
    logits.masked_fill_(torch.rand(n, vocab, generator=gen, device=device) < 0.05, float("-inf"))
    raw = make_logits("llm", n, vocab, device, seed=n + 1000)
    q = exponential_noise(logits, {})
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3], device=device).repeat(n)[:n]
    min_p = torch.tensor([0.0, 0.05, 0.0], device=device).repeat(n)[:n]
    args = (logits, q, temperature, None, None, min_p)
    ref_tokens, ref_lse = triton_sampling.filtered_sample(*args, raw=raw, split=False)
    mismatch, lse_diff = 0, 0.0
    for _ in range(reps):
        tokens, lse = triton_sampling.filtered_sample(*args, raw=raw, split=True)
        mismatch += int((tokens != ref_tokens).sum())
        lse_diff = max(lse_diff, float((lse - ref_lse).abs().max()))
    counters = counters_on(device)
    return {
        "mixed_mismatch": mismatch,
        "mixed_lse_max_diff": lse_diff,
        "counters_zeroed": counters is None or not bool(counters.any()),
    }


def bench_small_n(args, device) -> dict:
    """The split path against the one-program kernel at small N (temperature 1.0, no top-k / top-p)."""
    if device.type != "cuda":
        raise RuntimeError("--small-n times CUDA kernels: no CUDA device")
    vocab, rows = args.vocab, []
    for n in (int(v) for v in args.small_n.split(",")):
        logits = make_logits("llm", n, vocab, device)
        q = exponential_noise(logits, {})
        temperature = torch.ones(n, device=device)

        def sample(split, split_config=None):
            return triton_sampling.filtered_sample(
                logits, q, temperature, None, None, None,
                any_greedy=False, split=split, split_config=split_config,
            )  # fmt: skip

        one_tokens, one_lse = sample(False)
        row = {"n": n, "vocab": vocab, "rule_splits": triton_split_sample.use_split_path(n, None, None, device)}
        row["one_program_us"], row["one_program_host_us"] = gpu_us(lambda: sample(False), args.reps)
        row["split"] = []
        for cfg in SPLIT_CONFIGS:
            tokens, lse = sample(True, cfg)
            device_us, host_us = gpu_us(lambda cfg=cfg: sample(True, cfg), args.reps)
            row["split"].append({
                **cfg, "us": device_us, "host_us": host_us, "tokens_equal": bool(torch.equal(tokens, one_tokens)),
                "lse_max_diff": float((lse - one_lse).abs().max()),
            })  # fmt: skip
        row.update(check_split_mixed(n, vocab, device, args.reps))
        default, best = row["split"][0], min(row["split"], key=lambda r: r["us"])
        print(
            f"N={n:4d} one-program {row['one_program_us']:7.2f} us  split {default['us']:7.2f} us "
            f"({row['one_program_us'] / default['us']:4.1f}x; best CHUNK={best['CHUNK']} BLOCK={best['BLOCK']} "
            f"warps={best['num_warps']}: {best['us']:.2f} us)  host {row['one_program_host_us']:.0f} / "
            f"{default['host_us']:.0f} us  tokens equal {all(r['tokens_equal'] for r in row['split'])}  "
            f"mixed mismatch {row['mixed_mismatch']}  rule splits {row['rule_splits']}",
            flush=True,
        )  # fmt: skip
        rows.append(row)
    print("small_n", json.dumps(rows), flush=True)
    return {"rows": rows}


def bench_engine(args, device) -> dict:
    """Median engine step (ms) in steady decode at ``num_seqs`` running requests: greedy, then top-p + penalties."""
    import framework
    from framework.config import EngineConfig

    model_dir = args.model_dir
    if model_dir is None:
        from dummy_model import write_dummy_model

        model_dir = str(write_dummy_model(args.shape, Path(tempfile.mkdtemp()) / args.shape))
    config = {
        "model": model_dir, "load_format": "dummy", "dtype": "bfloat16",
        "max_model_len": args.max_model_len, "max_num_seqs": args.num_seqs,
    }  # fmt: skip
    if "enforce_eager" in EngineConfig.model_fields:
        config["enforce_eager"] = True
    if device.type == "cpu":
        config["device"] = "cpu"
    start = time.perf_counter()
    llm = framework.build(config)
    engine = llm.engine
    out = {"build_s": round(time.perf_counter() - start, 1), "config": config}
    vocab = engine.model_config.vocab_size
    sampled = dict(temperature=1.0, top_p=0.9, **PENALTIES)
    phases = [  # (name, SamplingParams fields, sampler path: None = the engine's own choice)
        ("greedy", dict(temperature=0.0), None),
        ("top_p=0.9 + penalties", sampled, None),
        ("top_p=0.9 + penalties, torch sampler", sampled, False),
    ]
    rng = random.Random(0)
    for name, fields, use_triton in phases:
        if use_triton is not None:  # the runner makes a sampler per name on first use
            samplers = getattr(engine.runner, "samplers", None)
            if not isinstance(samplers, dict):
                continue
            samplers["standard"] = StandardSampler(use_triton=use_triton)
        params = SamplingParams(**fields, ignore_eos=True, max_tokens=args.decode_steps + 64)
        ids = [
            engine.add_request([rng.randrange(vocab) for _ in range(args.prompt_len)], params)
            for _ in range(args.num_seqs)
        ]
        start = time.perf_counter()
        while len(engine.step()) < args.num_seqs:  # prefill (chunked) until every request decodes
            pass
        prefill_s = time.perf_counter() - start
        times = []
        for i in range(args.decode_steps + 3):
            sync(device)
            t0 = time.perf_counter()
            got = len(engine.step())
            sync(device)
            if i >= 3:  # warm-up steps
                times.append((time.perf_counter() - t0) * 1e3)
            assert got == args.num_seqs, f"{got} requests stepped, expected {args.num_seqs}"
        engine.abort_request(ids)
        out[name] = {
            "step_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "steps": len(times), "prefill_s": round(prefill_s, 2),
        }  # fmt: skip
        print("engine", name, json.dumps(out[name]), flush=True)
    del llm, engine
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--history", type=int, default=512, help="prompt and generated tokens per row (each)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--model-dir", default=None, help="an existing model directory instead of a dummy one")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--decode-steps", type=int, default=15)
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--skip-sampler", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true", help="no sweep of kernel launch configurations")
    parser.add_argument(
        "--small-n", default=None, metavar="N,N,...",
        help="also time filtered_sample's split path against the one-program kernel at these row counts "
        "(temperature 1.0, no top-k/top-p; see (c))",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="write all results here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "args": vars(args),
    }
    parts = (
        ("small_n", args.small_n is None, bench_small_n),
        ("sampler", args.skip_sampler, bench_sampler),
        ("engine", args.skip_engine, bench_engine),
    )
    for part, skip, fn in parts:
        if skip:
            continue
        try:
            result[part] = fn(args, device)
        except Exception:
            result[part] = {"error": traceback.format_exc()[-3000:]}
            print(result[part]["error"], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print_summary(result)


def print_summary(result: dict) -> None:
    sampler, engine = result.get("sampler", {}), result.get("engine", {})
    step = engine.get("greedy", {}).get("step_ms")
    print(f"\n{result['device']}  torch {result['torch']}  {result['date']}")
    if "config" in sampler:
        print("kernel config:", json.dumps(sampler["config"]))
    if step:
        print(f"decode step (greedy, eager): {step:.2f} ms")
        for name in ("top_p=0.9 + penalties", "top_p=0.9 + penalties, torch sampler"):
            other = engine.get(name, {}).get("step_ms")
            if other:
                print(f"decode step, {name}: {other:.2f} ms (+{other - step:.2f} ms, {100 * (other - step) / step:.1f}%)")
    print(f"{'case':34s} {'torch ms':>9s} {'triton ms':>9s} {'speed-up':>8s} {'% step':>7s} {'+meta %':>7s} mism")
    for name in CASES:
        row = sampler.get(name)
        if not row:
            continue
        share = f"{100 * row['triton_ms'] / step:6.1f}%" if step else "     -"
        meta = f"{100 * (row['triton_ms'] + row['metadata_ms']) / step:6.1f}%" if step else "     -"
        print(f"{name:34s} {row['torch_ms']:9.3f} {row['triton_ms']:9.3f} {row['torch_ms'] / row['triton_ms']:7.1f}x "
              f"{share} {meta} {row['mismatch']}")  # fmt: skip


if __name__ == "__main__":
    main()
