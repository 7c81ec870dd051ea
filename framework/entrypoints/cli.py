"""The ``framework`` command: ``serve``, ``generate``, ``bench``, ``quantize``, ``plugins``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional

from framework.entrypoints.cli_args import add_engine_args, engine_config_from_args
from framework.entrypoints.openai.cli_args import add_server_args


def _generate(args: argparse.Namespace) -> int:
    from framework.entrypoints.llm import LLM
    from framework.sampling_params import SamplingParams

    config = engine_config_from_args(args)
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.sampling_seed,
    )
    llm = LLM(config=config)
    prompts = args.prompt or ["Hello, my name is"]
    for out in llm.generate(prompts, params, use_tqdm=False):
        completion = out.outputs[0]
        print(f"Prompt: {out.prompt!r}, Generated text: {completion.text!r} ({completion.finish_reason})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from framework.engine.llm_engine import LLMEngine
    from framework.entrypoints.openai.api_server import run_server
    from framework.entrypoints.openai.cli_args import configs_from_args

    engine_config, server_config = configs_from_args(args)
    run_server(LLMEngine(engine_config), server_config)
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from framework.registry import is_builtin, load_registries, plugin_manager

    pm = plugin_manager()
    registries = load_registries()
    report = []
    for name, plugin in sorted(pm.list_name_plugin()):
        entry = {"name": name, "module": getattr(plugin, "__name__", repr(plugin)), "builtin": is_builtin(name)}
        for kind in ("models", "attention_backends", "quantizers", "samplers"):
            registry = getattr(registries, kind)
            entry[kind] = {k: e.describe() for k, e in registry.entries.items() if e.plugin == name}
        report.append(entry)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for entry in report:
        origin = "built-in" if entry["builtin"] else "third-party"
        print(f"{entry['name']} ({origin}, {entry['module']})")
        for kind in ("models", "attention_backends", "quantizers", "samplers"):
            for key, target in entry[kind].items():
                print(f"  {kind.replace('_', ' ')[:-1]}: {key} -> {target}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from framework.registry import load_registries

    quantizers = load_registries().quantizers
    if args.method not in quantizers:
        known = ", ".join(quantizers.names()) or "none"
        raise ValueError(f"--method {args.method!r} is not an installed quantization method; installed: {known}")
    options = {
        "bits": args.bits,
        "group_size": args.group_size,
        "calibration": args.calibration,
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "device": args.device,
    }
    # GPTQ-only flags travel only when given, so methods without them keep their defaults.
    if args.desc_act:
        options["desc_act"] = True
    if args.sym is not None:
        options["sym"] = args.sym
    if args.damp_percent is not None:
        options["damp_percent"] = args.damp_percent
    report = quantizers.get(args.method).quantize_checkpoint(args.model, args.out, **options)
    print(json.dumps(report, indent=2))
    return 0


def _add_quantize(sub) -> None:
    from pathlib import Path

    q = sub.add_parser("quantize", help="quantize a Hugging Face checkpoint (GPTQ, AWQ) on calibration text")
    q.add_argument("model", type=Path, help="unquantized model directory")
    q.add_argument("out", type=Path, help="output directory for the quantized checkpoint")
    q.add_argument("--method", required=True, help="quantization method, e.g. gptq or awq")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128, help="input features per scale; -1: one group per row")
    q.add_argument("--desc-act", action="store_true", help="GPTQ act-order: columns by decreasing Hessian diagonal")
    q.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric grid (GPTQ default)")
    q.add_argument("--no-sym", dest="sym", action="store_false", help="asymmetric grid with zero points")
    q.add_argument("--damp-percent", type=float, default=None, help="GPTQ Hessian dampening (default 0.01)")
    q.add_argument("--calibration", type=Path, default=None, help="calibration text file (default: built-in text)")
    q.add_argument("--num-samples", type=int, default=128, help="calibration windows")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    q.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    q.set_defaults(func=_quantize)


def _bench(args: argparse.Namespace) -> int:
    if args.bench == "throughput":
        from framework.bench.offline import run_throughput

        run_throughput(args)
    elif args.bench == "latency":
        from framework.bench.offline import run_latency

        run_latency(args)
    else:
        from framework.bench.serve import run_serve

        summary = run_serve(args)
        return 0 if summary["completed"] else 1
    return 0


def _add_bench(sub) -> None:
    from framework.bench.offline import add_latency_args, add_throughput_args
    from framework.bench.serve import add_serve_args

    bench = sub.add_parser("bench", help="benchmarks: offline throughput and latency, or a running server")
    kinds = bench.add_subparsers(dest="bench", required=True)
    throughput = kinds.add_parser("throughput", help="offline throughput of a request set (W1 by default)")
    add_throughput_args(throughput)
    latency = kinds.add_parser("latency", help="offline latency of fixed batches, per batch size")
    add_latency_args(latency)
    serve = kinds.add_parser("serve", help="load a running server (/v1/completions, streamed)")
    add_serve_args(serve)
    bench.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="framework", description="LLM inference and serving engine")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (FastAPI + uvicorn)")
    add_engine_args(serve)
    add_server_args(serve)
    serve.set_defaults(func=_serve)

    gen = sub.add_parser("generate", help="generate text offline for one or more prompts")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    gen.set_defaults(func=_generate)

    _add_bench(sub)
    _add_quantize(sub)

    plugins = sub.add_parser("plugins", help="list installed plugins and what each registers")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=_plugins)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s] %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
