"""Does prefetching the next weights into L2 speed up a batch-1 int4 decode layer? (GPU, sm_90+.)

A CUDA graph runs LAYERS layers of the Llama-3-8B shape's four int4 linears (``int4_mma.matmul`` with the
tuned programs, PDL as the engine launches them at one row), each followed by spin kernels standing in for
the kernels between linears (rotary + attention after qkv, RMSNorm after o and after down, SiLU-and-mul after
gate_up; durations from the batch-1 profile in docs/benchmarks.md). Every layer has its own weights, so L2
never holds a linear's weights from the replay before. Variants:

- ``none``: as the engine runs now;
- ``empty``: a prefetch kernel with nothing to fetch before each linear (its launch cost alone);
- ``W=<MB>``: before each linear, a prefetch of the bytes ``W`` ahead of it in the step's weight stream
  (the linears' words and scales in the order they run, the last layer wrapping to the first);
- ``nogap-*``: the same without the spin kernels.

Prints one JSON line per variant: microseconds a layer, and the floor (the layer's bytes at the copy rate).

    python3 benchmarks/l2_prefetch_probe.py [--layers 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.check_gemv import copy_bandwidth, graph_time_us  # noqa: E402
from framework.ops import l2_prefetch  # noqa: E402
from plugins.quant import int4_mma  # noqa: E402
from plugins.quant import int4_mma_layout as layout  # noqa: E402

# (name, N, K, the spin kernels after it in microseconds)
LINEARS = (("qkv", 6144, 4096, (2.2, 5.4)), ("o", 4096, 4096, (2.0,)), ("gate_up", 28672, 4096, (1.4,)),
           ("down", 4096, 14336, (2.0,)))  # fmt: skip


@triton.jit
def _spin(out_ptr, cycles):
    t0 = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    t = t0
    while t - t0 < cycles:
        t = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    tl.store(out_ptr, t - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--caps", type=float, nargs="*", default=[4, 16, 32])
    ap.add_argument("--chunk", type=int, default=l2_prefetch.CHUNK, help="bytes a prefetch instruction")
    ap.add_argument("--block", type=int, default=l2_prefetch.BLOCK, help="prefetches (threads) a program")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    l2_prefetch.CHUNK, l2_prefetch.BLOCK = args.chunk, args.block
    clock_hz = 1.98e9  # the H100/H200 boost clock: the spins' durations are approximate
    bw = copy_bandwidth()
    gen = torch.Generator(device="cpu").manual_seed(0)
    layers, stream = [], []  # stream: (tensor, layer, linear) in the order the step reads them
    for li in range(args.layers):
        layer = []
        for name, n, k, _ in LINEARS:
            qw = torch.randint(-(2**31), 2**31 - 1, (n // 16, k // 64, 32, 4), dtype=torch.int32, device=dev)
            s = (torch.rand(k // 128, n, generator=gen) * 0.02 + 0.001).to(torch.bfloat16)
            z = torch.randint(0, 16, (k // 128, n), generator=gen).to(torch.bfloat16)
            szp = layout.pack_scales(s, z).to(dev)
            layer.append((qw, szp))
            stream += [qw, szp]
        layers.append(layer)
    sizes = [t.numel() * t.element_size() for t in stream]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    total = sum(sizes)
    xs = {4096: torch.randn(1, 4096, device=dev, dtype=torch.bfloat16),
          14336: torch.randn(1, 14336, device=dev, dtype=torch.bfloat16)}  # fmt: skip
    sink = torch.zeros(1, dtype=torch.int64, device=dev)
    cycles = {us: int(us * 1e-6 * clock_hz) for _, _, _, gaps in LINEARS for us in gaps}

    def ranges(lo: int, hi: int) -> list:
        """Tensor byte ranges of the stream's bytes lo..hi (mod total; hi - lo < total)."""
        a = lo % total
        b = a + (hi - lo)
        pieces = [(a, b)] if b <= total else [(a, total), (0, b - total)]
        out = []
        for pa, pb in pieces:
            for t, st, sz in zip(stream, starts, sizes):
                s0, s1 = max(pa, st), min(pb, st + sz)
                if s0 < s1:
                    out.append((t, s0 - st, s1 - st))
        return out

    def launches(mode: str, window_mb: float, gaps: bool, cap_mb: float = 1e9) -> list:
        """``mode``: "none"; "empty" (a prefetch launch with nothing to fetch before each linear); "window" (before
        each linear, its bytes shifted ``window_mb`` ahead); "next" (after each linear, before the kernels
        between, the first ``cap_mb`` of the next linear's words and scales)."""
        n_lin = args.layers * len(LINEARS)
        plans = []
        for i in range(n_lin):
            lo, hi = starts[2 * i], starts[2 * i + 1] + sizes[2 * i + 1]  # linear i's words and scales
            if mode == "empty":
                plans.append(l2_prefetch.plan([], dev))
            elif mode == "window":
                w = int(window_mb * 2**20)
                plans.append(l2_prefetch.plan(ranges(lo + w, hi + w), dev))
            elif mode == "next":
                j = (i + 1) % n_lin
                lo, hi = starts[2 * j], starts[2 * j + 1] + sizes[2 * j + 1]
                plans.append(l2_prefetch.plan(ranges(lo, min(hi, lo + int(cap_mb * 2**20))), dev))
            else:
                plans.append(None)
        fns = []
        for li, layer in enumerate(layers):
            for j, ((name, n, k, gap_us), (qw, szp)) in enumerate(zip(LINEARS, layer)):
                p = plans[li * len(LINEARS) + j]
                if p is not None and mode != "next":
                    fns.append(lambda p=p: l2_prefetch.prefetch(p))
                fns.append(lambda x=xs[k], qw=qw, szp=szp: int4_mma.matmul(x, qw, szp, 128))
                if p is not None and mode == "next":
                    fns.append(lambda p=p: l2_prefetch.prefetch(p))
                if gaps:
                    for us in gap_us:
                        fns.append(lambda c=cycles[us]: _spin[(1,)](sink, c, num_warps=1))
        return fns

    variants = [("none", "none", 0, True, 1e9), ("empty", "empty", 0, True, 1e9), ("W=24MB", "window", 24, True, 1e9)]
    variants += [(f"next<={c:g}MB", "next", 0, True, c) for c in args.caps]
    variants += [("nogap-none", "none", 0, False, 1e9), ("nogap-next<=16MB", "next", 0, False, 16)]
    results = []
    per_layer_bytes = total / args.layers
    for name, mode, window, gaps, cap in variants:
        fns = launches(mode, window, gaps, cap)
        us = graph_time_us([lambda fns=fns: [f() for f in fns]], args.reps) / args.layers
        row = {"variant": name, "us_per_layer": round(us, 2), "floor_us": round(per_layer_bytes / bw * 1e6, 2),
               "gaps_us": sum(sum(g) for *_, g in LINEARS) if gaps else 0.0, "layers": args.layers,
               "copy_gbps": round(bw / 1e9, 1)}  # fmt: skip
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
