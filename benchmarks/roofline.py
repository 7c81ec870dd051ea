"""Roofline for a generation workload on the GPU at hand.

Both ceilings are measured in the same run:
  * matmul rate: a large bf16 GEMM (FLOP/s);
  * copy bandwidth: a large device-to-device copy, counting bytes read and
    written (bytes/s).

Roofline of a workload (a list of (prompt_len, output_len) requests run with
at most ``max_num_seqs`` in flight, new requests admitted as others finish):
  prefill time = (2 x non-embedding params x prompt tokens + attention FLOPs) / matmul rate
  decode time  = sum over decode steps of max(bytes read / bandwidth, FLOPs / matmul rate),
                 bytes read = weights + the KV cache of every running sequence.
The roofline throughput is output tokens / (prefill + decode time).

With ``--tensor-parallel-size N`` every figure is per GPU (weights, KV heads,
attention heads and FLOPs split N ways; ceilings measured on one GPU) and the
roofline leaves out communication; ``--allreduce-step-us`` (measured by
``bench_allreduce.py``) is added to the batch-1 floor.

    python benchmarks/roofline.py --shape llama3-8b --workload w1
"""

from __future__ import annotations

import argparse
import heapq
import json
import time
from dataclasses import dataclass

import torch

from dummy_model import SHAPES

from framework.bench.datasets import random_lengths


@dataclass
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2
    tp: int = 1  # tensor-parallel ranks: the figures below are per GPU

    @classmethod
    def named(cls, name: str) -> "ModelShape":
        s = SHAPES[name]
        return cls(s["hidden_size"], s["num_hidden_layers"], s["num_attention_heads"],
                   s["num_key_value_heads"], s["intermediate_size"], s["vocab_size"])  # fmt: skip

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.head_dim * (self.heads * 2 + self.kv_heads * 2)
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp) // self.tp

    @property
    def matmul_params(self) -> int:
        """Parameters multiplied per token: layers + LM head (the embedding is a lookup)."""
        return self.layer_params + self.hidden * self.vocab // self.tp

    @property
    def weight_bytes(self) -> int:
        return (self.layer_params + 2 * self.hidden * self.vocab // self.tp) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        kv_heads = max(1, self.kv_heads // self.tp)  # replicated when there are fewer KV heads than ranks
        return 2 * self.layers * kv_heads * self.head_dim * self.dtype_bytes

    def attention_flops(self, query_tokens: int, context: int) -> float:
        """QK^T and PV for ``query_tokens`` queries over ``context`` keys, all layers."""
        return 4.0 * self.layers * self.heads // self.tp * self.head_dim * query_tokens * context


def measure_ceilings(device: str = "cuda", repeats: int = 20) -> tuple[float, float]:
    """(bf16 matmul FLOP/s, copy bytes/s) measured on ``device``."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    flops = 2 * n**3 / _time(lambda: a @ b, repeats)
    src = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / _time(lambda: dst.copy_(src), repeats)
    return flops, bandwidth


def _time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def w1_requests(num: int = 1000, seed: int = 0) -> list[tuple[int, int]]:
    """W1: prompt lengths uniform in [64, 1024], output lengths uniform in [16, 512]."""
    return random_lengths(num, (64, 1024), (16, 512), seed)


def roofline(shape: ModelShape, requests: list[tuple[int, int]], max_num_seqs: int,
             flops_rate: float, bandwidth: float) -> dict:  # fmt: skip
    prompt_tokens = sum(p for p, _ in requests)
    output_tokens = sum(o for _, o in requests)
    prefill_flops = 2.0 * shape.matmul_params * prompt_tokens
    prefill_flops += sum(shape.attention_flops(p, p) / 2 for p, _ in requests)  # causal
    prefill_s = prefill_flops / flops_rate
    decode_s = _decode_time(shape, requests, max_num_seqs, flops_rate, bandwidth)
    total = prefill_s + decode_s
    return {
        "requests": len(requests),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "prefill_s": round(prefill_s, 3),
        "decode_s": round(decode_s, 3),
        "roofline_output_tok_s": round(output_tokens / total, 1),
        "batch1_floor_ms_per_token": round(shape.weight_bytes / bandwidth * 1e3, 3),
    }


def _decode_time(shape, requests, max_num_seqs, flops_rate, bandwidth) -> float:
    """Simulate continuous batching: every step, each running sequence makes one token."""
    pending = list(reversed(requests))
    running: list[tuple[int, int, int]] = []  # heap of (finish step, prompt_len, start step)
    step, total, context = 0, 0.0, 0  # context: sum of running sequences' current lengths
    while pending or running:
        while pending and len(running) < max_num_seqs:
            p, o = pending.pop()
            heapq.heappush(running, (step + o, p, step))
            context += p
        n = len(running)
        step_bytes = shape.weight_bytes + context * shape.kv_bytes_per_token
        step_flops = 2.0 * shape.matmul_params * n + shape.attention_flops(1, context / max(n, 1)) * n
        total += max(step_bytes / bandwidth, step_flops / flops_rate)
        context += n
        step += 1
        while running and running[0][0] <= step:
            finish, p, start = heapq.heappop(running)
            context -= p + (finish - start)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--workload", default="w1", choices=["w1", "batch1"])
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--allreduce-step-us", type=float, default=0.0,
                        help="measured all-reduce time of one batch-1 decode step, added to the batch-1 floor")
    args = parser.parse_args()
    flops, bandwidth = measure_ceilings()
    shape = ModelShape.named(args.shape)
    shape.tp = args.tensor_parallel_size
    result = {
        "device": torch.cuda.get_device_name(),
        "matmul_tflops": round(flops / 1e12, 1),
        "copy_gb_s": round(bandwidth / 1e9, 1),
        "weight_gb_per_gpu": round(shape.weight_bytes / 1e9, 2),
    }
    requests = w1_requests() if args.workload == "w1" else [(128, 256)]
    result.update(roofline(shape, requests, args.max_num_seqs, flops, bandwidth))
    if shape.tp > 1:
        result["tensor_parallel_size"] = shape.tp
        result["allreduce_step_us"] = args.allreduce_step_us
        result["batch1_floor_ms_per_token"] = round(
            result["batch1_floor_ms_per_token"] + args.allreduce_step_us / 1e3, 3
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
