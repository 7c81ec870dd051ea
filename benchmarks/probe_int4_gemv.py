"""Where the int4 one-row GEMV loses its time (GPU probe for issue 6; prints figures, changes nothing).

At Llama-3-8B's linear shapes, M = 1, GPTQ-style int4 with group 128, bf16
activations, ``triton.testing.do_bench`` medians (L2 flushed between runs):

1. ``int4_matmul`` as the engine runs it (``plugins.quant.triton_int4``, its tuned config);
2. load-only: the same ``[K/8, N]`` int32 words streamed by programs that own
   BLOCK_N columns and a K slice, summing the words as floats (no unpacking, no
   scales): the memory side of that layout, swept over tile shapes and splits;
3. a K-major prototype: the words repacked to ``[N, K/8]`` (each output row's
   words contiguous along K, as the bf16 GEMV reads its weight), unpacked in
   registers as ``[BLOCK_N, BLOCK_KP, 8]`` against an ``x`` tile read as
   ``[BLOCK_KP, 8]``, scales and zeros ``[N, G]`` per row; checked against a
   float64 dequantize-and-multiply, swept over tile shapes and splits
   (partial sums per split; the split reduction is not timed);
4. the bf16 ``F.linear`` of the same shape and the bytes/time of each against
   a device-to-device copy (bytes read + written).

    python benchmarks/probe_int4_gemv.py
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
GROUP = 128


@triton.jit
def _load_only(qw_ptr, ws_ptr, N, KP, rows_per_split, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_KP)
    acc = tl.zeros([BLOCK_KP, BLOCK_N], dtype=tl.float32)
    r0 = pid_k * rows_per_split
    for r in range(r0, tl.minimum(r0 + rows_per_split, KP), BLOCK_KP):
        rows = r + offs_r
        w = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=(rows < KP)[:, None] & (offs_n < N)[None, :])
        acc += w.to(tl.float32)
    tl.store(ws_ptr + pid_k * N + offs_n, tl.sum(acc, axis=0), mask=offs_n < N)


@triton.jit
def _kmajor(
    x_ptr, qw_ptr, s_ptr, z_ptr, ws_ptr, N, KP, G, words_per_split,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr,
):  # fmt: skip
    """ws[split, n] = sum over this split's k of x[k] * s[n, g] * (q[n, k] - z[n, g]); qw [N, KP] int32."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, BLOCK_KP)
    offs_j = tl.arange(0, 8)
    acc = tl.zeros([BLOCK_N, BLOCK_KP, 8], dtype=tl.float32)
    w0 = pid_k * words_per_split
    for w in range(w0, tl.minimum(w0 + words_per_split, KP), BLOCK_KP):
        words = w + offs_w
        q = tl.load(qw_ptr + offs_n[:, None] * KP + words[None, :], mask=n_mask[:, None] & (words < KP)[None, :])
        nib = (q[:, :, None] >> (offs_j[None, None, :] * 4)) & 15
        qf = (nib | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        g = (words * 8) // GROUP
        s = tl.load(s_ptr + offs_n[:, None] * G + g[None, :], mask=n_mask[:, None], other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n[:, None] * G + g[None, :], mask=n_mask[:, None], other=0.0).to(tl.float32)
        xk = tl.load(x_ptr + words[:, None] * 8 + offs_j[None, :]).to(tl.float32)  # [BLOCK_KP, 8]
        acc += (qf - z[:, :, None]) * (s[:, :, None] * xk[None, :, :])
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(ws_ptr + pid_k * N + offs_n, y, mask=n_mask)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50) * 1e3  # us


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = bench(lambda: b.copy_(a))
    return 2 * a.numel() / (us * 1e-6)


def main() -> int:
    from plugins.quant import int4_configs
    from plugins.quant.triton_int4 import int4_matmul

    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy {bw / 1e12:.3f} TB/s  triton {triton.__version__}")
    report = {"copy_TBps": bw / 1e12, "shapes": {}}
    for name, (n, k) in SHAPES.items():
        kp, g = k // 8, k // GROUP
        codes = torch.randint(0, 16, (k, n), dtype=torch.int32, device="cuda")
        shifts = (torch.arange(8, device="cuda", dtype=torch.int32) * 4).view(1, 8, 1)
        qw = (codes.view(kp, 8, n) << shifts).sum(dim=1, dtype=torch.int32)  # GPTQ: [K/8, N], k = 8r + j
        scales = (torch.rand(g, n, device="cuda") * 0.02 + 0.001).to(torch.bfloat16)
        zeros = torch.full((g, n), 8.0, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        w_ref = (codes.double() - zeros.double().repeat_interleave(GROUP, 0)) * scales.double().repeat_interleave(GROUP, 0)
        ref = (x.double() @ w_ref).float()
        weight_bytes = qw.numel() * 4 + 2 * scales.numel() * 2
        row = {"weight_MB": weight_bytes / 1e6}
        # 1. the engine's kernel (zeros as the kernel expects them: GPTQ's stored zero + 1 is handled by the plugin;
        #    int4_matmul takes the zero point itself)
        out = int4_matmul(x, qw, scales, zeros, GROUP, 4)
        row["engine_err"] = float((out.float() - ref).norm() / ref.norm())
        row["engine_us"] = bench(lambda: int4_matmul(x, qw, scales, zeros, GROUP, 4))
        row["engine_cfg"] = str(int4_configs.TUNED.get((1, k, n)))
        # 2. load-only over the [K/8, N] layout
        best = None
        for bn, bkp, split in itertools.product((32, 64, 128, 256), (16, 32, 64), (1, 2, 4, 8)):
            per = triton.cdiv(triton.cdiv(kp, split), bkp) * bkp
            ws = torch.empty(split, n, device="cuda")
            grid = (triton.cdiv(n, bn), split)
            try:
                us = bench(lambda: _load_only[grid](qw, ws, n, kp, per, BLOCK_N=bn, BLOCK_KP=bkp, num_warps=4))
            except Exception as e:  # noqa: BLE001
                print(f"  load-only {bn}x{bkp} s{split}: {type(e).__name__}")
                continue
            if best is None or us < best[0]:
                best = (us, f"BN{bn} BKP{bkp} s{split}")
        row["load_only_us"], row["load_only_cfg"] = best
        # 3. K-major prototype
        qt = (codes.t().contiguous().view(n, kp, 8) << shifts.view(1, 1, 8)).sum(dim=2, dtype=torch.int32)  # [N, K/8]
        st, zt = scales.t().contiguous(), zeros.t().contiguous()
        best, worst_err = None, 0.0
        for bn, bkp, split, warps in itertools.product((4, 8, 16, 32), (16, 32, 64), (1, 2, 4, 8), (2, 4, 8)):
            per = triton.cdiv(triton.cdiv(kp, split), bkp) * bkp
            ws = torch.empty(split, n, device="cuda")
            grid = (triton.cdiv(n, bn), split)

            def run():
                _kmajor[grid](x, qt, st, zt, ws, n, kp, g, per, GROUP=GROUP, BLOCK_N=bn, BLOCK_KP=bkp,
                              num_warps=warps)  # fmt: skip

            try:
                run()
                err = float((ws.sum(0) - ref[0]).norm() / ref.norm())
                us = bench(run)
            except Exception as e:  # noqa: BLE001
                print(f"  k-major {bn}x{bkp} s{split} w{warps}: {type(e).__name__}")
                continue
            worst_err = max(worst_err, err)
            if err < 1e-3 and (best is None or us < best[0]):
                best = (us, f"BN{bn} BKP{bkp} s{split} w{warps}")
        if best:
            row["kmajor_us"], row["kmajor_cfg"] = best
        row["kmajor_worst_err"] = worst_err
        # 4. bf16
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        row["bf16_us"] = bench(lambda: F.linear(x, wb))
        for key in ("engine_us", "load_only_us", "kmajor_us"):
            if key in row:
                row[key.replace("_us", "_pct_bw")] = round(100 * weight_bytes / (row[key] * 1e-6) / bw, 1)
        print(f"{name:8} {json.dumps(row)}", flush=True)
        report["shapes"][name] = row
    print("PROBE_JSON " + json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
