"""The ``framework`` command: ``serve``, ``generate``, ``bench``, ``plugins``."""

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
