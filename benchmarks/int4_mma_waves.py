"""The int4 tensor-core kernel's time against how its programs fill the GPU: for program shapes and splits
at M = 1 and 16 on the Llama-3-8B shapes, the time, the registers a thread, the programs a multiprocessor
holds (registers and warps only) and the waves the grid takes (timing only; check_int4_mma.py checks).

    python3 benchmarks/int4_mma_waves.py OUT.json
"""

from __future__ import annotations

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

# (rows, kslices, unroll, num_warps)
PROGRAMS = [(1, 4, 4, 4), (1, 4, 2, 4), (2, 2, 2, 4), (4, 1, 2, 4), (1, 8, 2, 8), (2, 4, 2, 8), (4, 2, 2, 8),
            (1, 2, 2, 2), (1, 2, 1, 2)]  # fmt: skip
SPLITS = (1, 2, 3, 4, 6, 8)


def compiled() -> dict:
    """Every compiled variant of the kernel so far, by cache key."""
    return {key: kernel for caches in int4_mma._mma_kernel.device_caches.values() for key, kernel in caches[0].items()}


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    sms, l2 = props.multi_processor_count, props.L2_cache_size
    regs: dict = {}
    rows_out = []
    for name, (n, k) in SHAPES.items():
        q, s, z = make_layer(n, k, 128, torch.bfloat16)
        nbytes = n * k // 2 + 2 * (k // 128) * n * 2
        qws = [layout.repack(q) for _ in range(max(2, math.ceil(3 * l2 / nbytes)))]  # more than L2 holds
        szp = layout.pack_scales(s, z)
        sbs = k // 64
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for r, ks, u, w in PROGRAMS:
                if m > 8 and u > 2:
                    continue
                for split in SPLITS:
                    if split * u * ks > sbs:
                        continue
                    kw = {"rows": r, "kslices": ks, "unroll": u, "num_warps": w, "split": split}
                    before = set(compiled())
                    us = graph_time_us(
                        [lambda qw=qw, x=x, szp=szp, kw=kw: int4_mma.mma_matmul(x, qw, szp, 128, **kw) for qw in qws],
                        20,
                    )
                    new = [kernel for key, kernel in compiled().items() if key not in before]
                    if new:
                        regs[(r, ks, u, w, m > 8, split == 1)] = new[0].n_regs
                    n_regs = regs.get((r, ks, u, w, m > 8, split == 1))
                    tiles = math.ceil(n // 16 / r)
                    per = math.ceil(math.ceil(sbs / split) / (u * ks)) * u * ks  # as mma_matmul splits
                    programs = tiles * math.ceil(sbs / per)
                    per_sm = min(64 // w, 65536 // (n_regs * 32 * w)) if n_regs else None
                    row = dict(shape=name, m=m, **kw, us=round(us, 2), n_regs=n_regs, per_sm=per_sm, programs=programs,
                               waves=round(programs / (per_sm * sms), 2) if per_sm else None)  # fmt: skip
                    rows_out.append(row)
                    print(json.dumps(row), flush=True)
    Path(sys.argv[1]).write_text(json.dumps(rows_out, indent=1))


if __name__ == "__main__":
    main()
