"""The int4 tensor-core kernel's table programs for steps of up to 8 rows, at M = 1, with explicit split-K
counts (1, 2, 3, 4, 6, and 0: the launcher's), as they are and with the ring off (interleave on): time in CUDA
graphs over enough weight copies that L2 never holds the next one, and the error against the reference.

    python3 benchmarks/int4_mma_splits.py
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


def main() -> None:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for name, (n, k) in SHAPES.items():
        q, s, z = make_layer(n, k, 128, torch.bfloat16)
        nbytes = n * k // 2 + 2 * (k // 128) * n * 2
        qws = [layout.repack(q) for _ in range(max(2, math.ceil(3 * l2 / nbytes)))]
        szp = layout.pack_scales(s, z)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = layout.reference_matmul(x, qws[0], szp, 128).float()
        base = {key: v for key, v in int4_mma.TUNED[(n, k)].items() if key != "split"}
        for extra in ({}, {"ring": False, "interleave": True}):
            for split in (1, 2, 3, 4, 6, 0):
                cfg = {**base, **extra, "split": split}
                out = int4_mma.mma_matmul(x, qws[0], szp, 128, **cfg).float()
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                us = graph_time_us([lambda qw=qw: int4_mma.mma_matmul(x, qw, szp, 128, **cfg) for qw in qws], 30)
                print(name, json.dumps(cfg, sort_keys=True), round(us, 2), f"err {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
