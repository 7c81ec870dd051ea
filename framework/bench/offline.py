"""``framework bench throughput`` and ``framework bench latency`` (offline, one engine).

throughput: every request is added at once and the engine runs until all
finish (``LLM.generate``); requests make exactly their output length
(``ignore_eos``) with temperature 1, as vLLM's benchmark does. W1 is the
default: 1000 random-id prompts, lengths U[64, 1024], outputs U[16, 512],
seed 0.

latency: for each batch size, the same batch of ``--input-len`` prompts
generates ``--output-len`` greedy tokens, ``--num-iters`` times after a
warm-up; the median run is reported, with its decode time per output token
(first token to last, per request, from the engine's timestamps: the
prefill is left out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from framework.bench.datasets import random_requests, sharegpt_requests
from framework.entrypoints.cli_args import add_engine_args, engine_config_from_args
from framework.sampling_params import SamplingParams


def add_throughput_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    parser.add_argument("--dataset", default="random", help="'random' or a ShareGPT-format JSON file")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len-range", type=int, nargs=2, default=[64, 1024], metavar=("MIN", "MAX"))
    parser.add_argument("--output-len-range", type=int, nargs=2, default=[16, 512], metavar=("MIN", "MAX"))
    parser.add_argument("--dataset-seed", type=int, default=0)
    parser.add_argument("--output-json", default=None, help="write the results here")


def add_latency_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-iters", type=int, default=3)
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature (vLLM's latency benchmark: 1.0, top_p 1.0)"
    )
    parser.add_argument("--output-json", default=None, help="write the results here")


def run_throughput(args: argparse.Namespace) -> dict:
    from framework.entrypoints.llm import LLM

    start = time.perf_counter()
    llm = LLM(config=engine_config_from_args(args))
    startup = time.perf_counter() - start
    if args.dataset == "random":
        vocab = llm.engine.model_config.vocab_size
        requests = random_requests(args.num_prompts, tuple(args.input_len_range), tuple(args.output_len_range),
                                   vocab, args.dataset_seed)  # fmt: skip
    else:
        requests = sharegpt_requests(args.dataset, args.num_prompts, llm.get_tokenizer(),
                                     llm.engine.model_config.max_model_len, args.dataset_seed)  # fmt: skip
    params = [SamplingParams(temperature=1.0, top_p=1.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    llm.generate([requests[0].prompt], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    preemptions = llm.engine.num_preemptions
    start = time.perf_counter()
    outputs = llm.generate([r.prompt for r in requests], params)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {
        "elapsed_time": round(elapsed, 3),
        "num_requests": len(requests),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "total_num_tokens": prompt_tokens + output_tokens,
        "requests_per_second": round(len(requests) / elapsed, 3),
        "tokens_per_second": round((prompt_tokens + output_tokens) / elapsed, 1),
        "output_tokens_per_second": round(output_tokens / elapsed, 1),
        "num_preemptions": llm.engine.num_preemptions - preemptions,
        "startup_s": round(startup, 2),
        "engine": _engine_settings(llm),
    }
    print(
        f"Throughput: {result['requests_per_second']:.2f} requests/s, {result['tokens_per_second']:.2f} "
        f"total tokens/s, {result['output_tokens_per_second']:.2f} output tokens/s"
    )
    _write(args.output_json, result)
    return result


def run_latency(args: argparse.Namespace) -> dict:
    from framework.entrypoints.llm import LLM

    llm = LLM(config=engine_config_from_args(args))
    vocab = llm.engine.model_config.vocab_size
    params = SamplingParams(temperature=args.temperature, top_p=1.0, max_tokens=args.output_len, ignore_eos=True)
    rows = []
    for batch_size in args.batch_sizes:
        prompts = [r.prompt for r in random_requests(batch_size, (args.input_len,) * 2, (1, 1), vocab)]
        llm.generate(prompts, params, use_tqdm=False)  # warm-up at this batch size
        runs = []
        for _ in range(args.num_iters):
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            runs.append((time.perf_counter() - start, _decode_seconds_per_token(outputs)))
        latency, decode = sorted(runs)[len(runs) // 2]  # the median run
        row = {
            "batch_size": batch_size,
            "latency_s": round(latency, 4),
            "ms_per_output_token": round(latency / args.output_len * 1e3, 3),
            "decode_ms_per_token": round(decode * 1e3, 3),
            "output_tokens_per_second": round(batch_size * args.output_len / latency, 1),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"input_len": args.input_len, "output_len": args.output_len, "temperature": args.temperature, "results": rows,
              "engine": _engine_settings(llm)}  # fmt: skip
    _write(args.output_json, result)
    return result


def _decode_seconds_per_token(outputs) -> float:
    """Mean over requests of (last token time - first token time) / (tokens - 1)."""
    per_request = []
    for out in outputs:
        m, n = out.metrics, len(out.outputs[0].token_ids)
        if n > 1 and m.first_token_time is not None and m.finished_time is not None:
            per_request.append((m.finished_time - m.first_token_time) / (n - 1))
    return statistics.fmean(per_request) if per_request else 0.0


def _engine_settings(llm) -> dict:
    engine = llm.engine
    config = engine.config
    return {
        "model": config.model, "dtype": str(engine.model_config.dtype).removeprefix("torch."),
        "device": str(engine.device), "attention_backend": engine.runner.backend.name,
        "cuda_graphs": getattr(engine.runner, "graphs", None) is not None,
        "async_scheduling": engine.async_scheduling, "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens, "max_model_len": engine.model_config.max_model_len,
        "num_kv_blocks": engine.num_blocks, "block_size": config.block_size,
    }  # fmt: skip


def _write(path: str | None, result: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2))
