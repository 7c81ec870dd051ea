"""``framework`` CLI with kernels of the decode step taken out, for what they cost end to end (timing only:
the model computes garbage).

    ABLATE=norm,silu python3 benchmarks/ablate_step.py bench latency MODEL [args ...]

``norm``: ``RMSNorm`` returns its input (and the residual unchanged): no norm kernel where the layers run it
apart from the projection after it (int4 layers; the bf16 GEMV fuses it); ``silu``: ``SiluAndMul`` returns
the gate half (a view): no SiLU-and-mul kernel where it runs apart from the down projection.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from framework.entrypoints.cli import main  # noqa: E402
from framework.layers import activation, norm  # noqa: E402

ABLATE = set(filter(None, os.environ.get("ABLATE", "").split(",")))
if ABLATE - {"norm", "silu"}:
    raise SystemExit(f"ABLATE takes norm and silu; got {sorted(ABLATE)}")
if "norm" in ABLATE:
    norm.RMSNorm.forward = lambda self, x, residual=None: x if residual is None else (x, residual)
if "silu" in ABLATE:
    activation.SiluAndMul.forward = lambda self, x: x[..., : x.shape[-1] // 2]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
