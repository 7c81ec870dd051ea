"""The int4 decode linears against their ceilings on this GPU (M = 1, the Llama-3-8B shapes; timing only).

    python3 benchmarks/int4_ceiling.py OUT.json

For each shape, times per launch in CUDA graphs of back-to-back launches (``check_gemv.graph_time_us``):
- ``stream``: the packed weights alone, through TMA boxes and the compiler's software pipeline, xor-summed
  (no dequantization, no mma, no activations): the fastest of a small grid of box shapes, splits and pipeline
  depths. What any one-launch kernel that reads these bytes pays on this GPU.
- ``kernel``: the table's program (``int4_mma.matmul``), weights from DRAM (copies beyond L2) and resident in
  L2 (one copy, launched as often): where it is bound by its arithmetic rather than by memory.
- ``loads``: the same program with its asm cut to one add a word (``ablate_int4_mma.py``'s ``memonly``):
  the program structure's own memory ceiling, from DRAM and from L2.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.ablate_int4_mma import orig, variant  # noqa: E402
from benchmarks.check_gemv import copy_bandwidth, graph_time_us  # noqa: E402
from benchmarks.check_int4_mma import SHAPES, make_layer  # noqa: E402
from plugins.quant import int4_mma  # noqa: E402
from plugins.quant import int4_mma_layout as layout  # noqa: E402


@triton.jit
def _stream_kernel(w_desc, out_ptr, sb_per_split, R: tl.constexpr, S: tl.constexpr, STAGES: tl.constexpr):
    """Boxes ``[R, S, 128]`` of the ``[N / 16, K / 64, 128]`` int32 view of the packed weights, xor-summed."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    acc = tl.zeros([R, S, 128], dtype=tl.int32)
    for i in tl.range(0, sb_per_split, S, num_stages=STAGES):
        acc = acc ^ w_desc.load([pid_n * R, pid_k * sb_per_split + i, 0])
    tl.store(out_ptr + pid_n * tl.num_programs(1) + pid_k, tl.sum(tl.reshape(acc, [R * S * 128]), 0))


def stream(qweight: torch.Tensor, rows: int, steps: int, split: int, stages: int) -> torch.Tensor:
    nb, sbs = qweight.shape[0], qweight.shape[1]
    view = qweight.view(nb, sbs, 128)
    desc = TensorDescriptor(view, list(view.shape), list(view.stride()), [rows, steps, 128])
    per = triton.cdiv(triton.cdiv(sbs, split), steps) * steps
    tiles, splits = triton.cdiv(nb, rows), triton.cdiv(sbs, per)
    out = torch.empty(tiles * splits, dtype=torch.int32, device=qweight.device)
    _stream_kernel[(tiles, splits)](desc, out, per, R=rows, S=steps, STAGES=stages, num_warps=4)
    return out


def main(out: str) -> None:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    res: dict = {"device": torch.cuda.get_device_name(0), "copy_GBps": round(copy_bandwidth() / 1e9)}
    for name, (n, k) in SHAPES.items():
        q, s, z = make_layer(n, k, 128, torch.bfloat16)
        nbytes = n * k // 2 + (k // 128) * n * 4  # weights and scale/zero words
        cold = [layout.repack(q) for _ in range(max(2, math.ceil(3 * l2 / nbytes)))]
        szp = layout.pack_scales(s, z)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        row: dict = {"MB": round(nbytes / 1e6, 1)}
        best = None
        for (r, steps), split, stages in itertools.product(((2, 4), (4, 4), (2, 8), (4, 2)), (1, 2, 4), (3, 4, 6)):
            if steps * split > k // 64:
                continue
            launches = [functools.partial(stream, qw, r, steps, split, stages) for qw in cold]
            us = graph_time_us(launches, 30)
            if best is None or us < best[0]:
                best = (us, {"rows": r, "steps": steps, "split": split, "stages": stages})
        row["stream_us"], row["stream_program"] = round(best[0], 2), best[1]
        for kind, key in (("full", "kernel"), ("memonly", "loads")):
            int4_mma._asm = functools.cache(variant(kind))
            dram = [functools.partial(int4_mma.matmul, x, qw, szp, 128) for qw in cold]
            hot = [functools.partial(int4_mma.matmul, x, cold[0], szp, 128)] * len(cold)
            row[f"{key}_dram_us"] = round(graph_time_us(dram, 30), 2)
            row[f"{key}_l2_us"] = round(graph_time_us(hot, 30), 2)
        int4_mma._asm = functools.cache(orig)
        res[name] = row
        print(name, json.dumps(row), flush=True)
    for key in ("stream_us", "kernel_dram_us", "loads_dram_us"):
        res[f"layer_{key}"] = round(sum(res[name][key] for name in SHAPES), 2)
    print(json.dumps({k: v for k, v in res.items() if k not in SHAPES}), flush=True)
    Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
