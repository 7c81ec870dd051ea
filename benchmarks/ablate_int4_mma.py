"""Ablations of the int4 tensor-core kernel's per-superblock asm, for finding where its time goes (the
results are wrong by design: timing only), and a plain run of its kernels for a profiler.

    python3 benchmarks/ablate_int4_mma.py OUT.json          # each variant of the table's M = 1 programs
    ncu --clock-control none -k regex:"mma_kernel|gemv" --section SpeedOfLight --section WarpStateStats \
        python3 benchmarks/ablate_int4_mma.py --profile     # each shape's kernel and the bf16 GEMV, 3 times

Variants: ``full`` (the kernel), ``noscale`` (no scale multiply), ``lop_only`` (no zero point and no scale),
``nomma`` (dequantize, then adds instead of the mma), ``raw`` (the packed words straight into the mma),
``memonly`` (one add a word: the loads alone).
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.check_gemv import graph_time_us  # noqa: E402
from benchmarks.check_int4_mma import SHAPES, make_layer  # noqa: E402
from plugins.quant import int4_mma  # noqa: E402
from plugins.quant import int4_mma_layout as layout  # noqa: E402

orig = int4_mma._asm.__wrapped__
DEQUANT = ("shr", "lop3", "fma", "prmt")


def variant(kind: str):
    """An ``_asm`` replacement: the kernel's asm with parts taken out (see the module docstring)."""

    def asm(bf16: bool, mb: int = 1) -> tuple[str, str]:
        text, cons = orig(bf16, mb)
        words, acc_in = 4 * mb, 4 * mb + 4
        if kind == "memonly":  # out_i = c_i + word (as f32 bits): nothing but the loads feeds the result
            body = [f"add.f32 ${i}, ${acc_in + i}, ${words + i % 4};" for i in range(4 * mb)]
            return "\n".join(["{", *body, "}"]), cons
        out, j = [], 0
        for line in text.split("\n"):
            op = line.strip()
            if kind in ("noscale", "lop_only") and op.startswith("fma.") and ", s" in op:
                continue  # the (q - z) * s
            if kind == "lop_only" and op.startswith("fma.") and "one" in op:
                continue  # the q - z
            if kind == "raw" and op.startswith(DEQUANT):
                continue
            if op.startswith("mov.b64 {b0, b1}"):  # B fragment of word j (the operand index gives j)
                j = (int(op.split("$")[1].rstrip(";")) - (8 * mb + 4)) % 4
            if kind == "raw" and "mma.sync" in line:
                w = f"${words + j}"
                line = line.replace("{a0, a1, a2, a3}", "{%s, %s, %s, %s}" % (w, w, w, w))
            if kind == "nomma" and "mma.sync" in line:
                dst = [r.strip() for r in line.split("{")[1].split("}")[0].split(",")]
                acc = [r.strip() for r in line.split("{")[-1].split("}")[0].split(",")]
                line = "\n".join(f"add.f32 {dst[i]}, {acc[i]}, a{i};" for i in range(4))
            out.append(line)
        return "\n".join(out), cons

    return asm


def profile() -> None:
    from framework.ops import triton_gemv

    for n, k in SHAPES.values():
        q, s, z = make_layer(n, k, 128, torch.bfloat16)
        qw, szp = layout.repack(q), layout.pack_scales(s, z)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            int4_mma.matmul(x, qw, szp, 128)
    w = torch.randn(28672, 4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        triton_gemv.gemv(x, w)
    torch.cuda.synchronize()


def main(out: str) -> None:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    res = {}
    for name, (n, k) in SHAPES.items():
        configs = (int4_mma.TUNED[(n, k)],)  # the table's program for steps of up to 8 rows
        q, s, z = make_layer(n, k, 128, torch.bfloat16)
        nbytes = n * k // 2 + 2 * (k // 128) * n * 2
        copies = max(2, math.ceil(3 * l2 / nbytes))
        qws = [layout.repack(q) for _ in range(copies)]
        szp = layout.pack_scales(s, z)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for kind in ("full", "noscale", "lop_only", "nomma", "raw", "memonly"):
            int4_mma._asm = functools.cache(variant(kind))
            for cfg in configs:
                launches = [lambda qw=qw, cfg=cfg: int4_mma.mma_matmul(x, qw, szp, 128, **cfg) for qw in qws]
                us = graph_time_us(launches, 30)
                key = f"{name} {kind} {json.dumps(cfg, sort_keys=True)}"
                res[key] = (round(us, 2), round(nbytes / us / 1e3))
                print(key, res[key], flush=True)
        int4_mma._asm = functools.cache(orig)
    Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    if sys.argv[1:] == ["--profile"]:
        profile()
    else:
        main(sys.argv[1])
