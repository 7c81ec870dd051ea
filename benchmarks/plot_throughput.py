"""Plot decode throughput against batch size: framework, transformers and the roofline.

Reads the JSON files of one device run (``framework bench latency
--output-json``, optionally an ``--enforce-eager`` one, ``roofline.py``'s
line and ``hf_peer.py``'s lines) and writes a PNG. The roofline curve is the
decode roofline at each batch size for the latency workload's mean context
(input_len + output_len / 2): tokens/s = B / max(bytes / bandwidth, FLOPs / rate).

    python benchmarks/plot_throughput.py --latency lat.json --eager lat_eager.json \
        --roofline roofline.json --peer hf_peer.jsonl --out throughput.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from roofline import ModelShape


def roofline_curve(shape: ModelShape, batch_sizes, context: float, flops: float, bandwidth: float) -> list[float]:
    rates = []
    for b in batch_sizes:
        step_bytes = shape.weight_bytes + b * context * shape.kv_bytes_per_token
        step_flops = 2.0 * shape.matmul_params * b + shape.attention_flops(1, context) * b
        rates.append(b / max(step_bytes / bandwidth, step_flops / flops))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=Path, required=True)
    parser.add_argument("--eager", type=Path, default=None)
    parser.add_argument("--roofline", type=Path, required=True)
    parser.add_argument("--peer", type=Path, default=None, help="hf_peer.py output (JSON lines)")
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--title", default="Llama-3-8B shape, bf16, dummy weights")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = json.loads(args.latency.read_text())
    roof = json.loads(args.roofline.read_text().strip().splitlines()[-1])
    sizes = [r["batch_size"] for r in lat["results"]]
    context = lat["input_len"] + lat["output_len"] / 2
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curve = roofline_curve(ModelShape.named(args.shape), sizes, context, roof["matmul_tflops"] * 1e12,
                           roof["copy_gb_s"] * 1e9)  # fmt: skip
    label = f"decode roofline ({roof['copy_gb_s']:.0f} GB/s, {roof['matmul_tflops']:.0f} TFLOP/s)"
    ax.plot(sizes, curve, "k--", label=label)
    ax.plot(sizes, [r["output_tokens_per_second"] for r in lat["results"]], "o-", label="framework (CUDA graphs)")
    if args.eager and args.eager.is_file():
        eager = json.loads(args.eager.read_text())["results"]
        ax.plot([r["batch_size"] for r in eager], [r["output_tokens_per_second"] for r in eager], "s:",
                label="framework (enforce_eager)")  # fmt: skip
    if args.peer and args.peer.is_file():
        rows = [json.loads(l) for l in args.peer.read_text().splitlines() if l.startswith("{")]
        static = [r for r in rows if r.get("peer") == "generate-static"]
        if static:
            ax.plot([r["batch_size"] for r in static], [r["output_tok_s"] for r in static], "^", markersize=9,
                    label="transformers generate, static cache (W1 prompts, 256 new tokens)")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("output tokens/s")
    temperature = lat.get("temperature", 0.0)  # results before the field existed were greedy
    sampling = "greedy" if temperature == 0 else f"temperature {temperature:g}"
    ax.set_title(f"{args.title}\nprompt {lat['input_len']}, output {lat['output_len']} tokens, {sampling}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
