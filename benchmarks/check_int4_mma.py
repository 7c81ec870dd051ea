"""GPU check and sweep of the tensor-core int4 kernel (``plugins/quant/int4_mma.py``) for few rows.

1. Correctness: ``mma_matmul`` against ``reference_matmul`` (the weights
   dequantized to x's dtype, fp32 products) for bf16 and fp16, M = 1..64, group
   sizes 64 / 128 / K, odd row-block counts, split-K on and off; and the
   layout against the original codes (``unpack(repack(q)) == q``).
2. Timing at the Llama-3-8B linear shapes, in CUDA graphs over enough weight
   copies that L2 never holds the next one (as a decode step runs them):
   the sweep of (rows, slices, unroll, warps, split, ...) configs at M = 1
   (--quick: and 16; full: 1, 8, 16 and 64; --m: the rows given), against the
   other int4 kernels (``triton_int4.int4_matmul`` on their layout, tuned table: the GEMV at M = 1, tiled above) and bf16
   (``triton_gemv.gemv``, our decode GEMV, up to 8 rows, and ``F.linear``),
   with each figure's bytes and GB/s against a device-to-device copy.

    python3 benchmarks/check_int4_mma.py [--out DIR] [--quick | --extended | --inflight | --ring | --interleave]
        [--checks KEY,...]

The best config of each shape is printed (``best``) as ``mma_matmul`` keywords
with its split; ``FRAMEWORK_INT4_MMA_TUNED='{"NxK": {...}}'`` runs the engine
with them (without the split, which the launcher picks).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.check_gemv import copy_bandwidth, graph_time_us  # noqa: E402
from framework.ops import triton_gemv  # noqa: E402
from plugins.quant import int4_mma, triton_int4  # noqa: E402
from plugins.quant import int4_mma_layout as layout  # noqa: E402
from plugins.quant.int4_mma_tuned import CHECKED  # noqa: E402
from plugins.quant.int4_common import pack_rows  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
DEV = "cuda"


def make_layer(n: int, k: int, group: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.001).to(dtype)
    zeros = torch.randint(0, 16, (k // group, n), generator=gen).to(dtype)
    return q.to(DEV), scales.to(DEV), zeros.to(DEV)


def correctness(failures: list, only: str = "") -> list[dict]:
    rows = []
    pdl = torch.cuda.get_device_capability()[0] >= 9
    checked = [kw for kw in CHECKED if (pdl or not kw.get("pdl")) and (not only or any(kw.get(o) for o in only.split(",")))]
    cases = [
        (64, 128, 64), (48, 256, 128), (160, 512, 128), (80, 320, 320), (4096, 4096, 128), (1024, 14336, 128),
    ]
    for (n, k, group), dtype in itertools.product(cases, (torch.bfloat16, torch.float16)):
        q, s, z = make_layer(n, k, group, dtype)
        qw = layout.repack(q)
        szp = layout.pack_scales(s, z)
        ok_layout = torch.equal(layout.unpack(qw), q)
        s2, z2 = layout.unpack_scales(szp, dtype)
        ok_layout &= torch.equal(s2, s) and torch.equal(z2, z)
        for m in (1, 2, 3, 5, 8, 9, 16, 33, 64):
            x = torch.randn(m, k, device=DEV, dtype=dtype)
            ref = layout.reference_matmul(x, qw, szp, group).float()
            band = int4_mma._band(m)  # the tuned programs for the rows they serve; the checked ones for all
            for kw in checked + [cfg for key, cfg in int4_mma.TUNED.items() if key[2:] == band]:
                out = int4_mma.mma_matmul(x, qw, szp, group, **kw).float()
                err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
                ok = ok_layout and bool(torch.isfinite(out).all()) and err < 2e-2
                rows.append({"n": n, "k": k, "group": group, "dtype": str(dtype), "m": m, "cfg": kw,
                             "err": err, "ok": ok})  # fmt: skip
                if not ok:
                    failures.append(rows[-1])
        print(f"  {n}x{k} g{group} {dtype}: {sum(r['ok'] for r in rows)}/{len(rows)} ok so far, {time.time() - T0:.0f}s", flush=True)
    return rows


# program shapes: (16-row blocks, slices of the superblocks) a program, one tile row a warp
SHAPES_RK = ((4, 1), (2, 1), (8, 1), (1, 2), (2, 2), (4, 2), (1, 4), (2, 4), (1, 8))


def configs(mode: str):
    """mma_matmul keyword sets to time (each with ``waves``: split-K to that many waves, 0 the launcher's
    choice, -1 one split: the program writes its outputs)."""
    if mode == "extended":  # prefetch depth, the weight stream's eviction policy, PDL, on a few program shapes
        variants = ((1, "", False), (2, "", False), (2, "evict_first", False), (1, "", True))  # (depth, evict, pdl)
        grid = itertools.product(((4, 1), (2, 2), (1, 4), (1, 8)), (1, 2), variants, (0, -1))
        for (r, ks), u, (depth, evict, pdl), wave in grid:
            yield dict(rows=r, kslices=ks, unroll=u, num_warps=r * ks, depth=depth, evict=evict, pdl=pdl), wave
        return
    if mode == "ring":  # two register sets of loads in flight (ring), plain, with xjit or with a barrier
        for cfg in {json.dumps(c, sort_keys=True) for key, c in int4_mma.TUNED.items() if not key[2:]}:
            kw = json.loads(cfg)  # the table's programs for 1-8 rows, as they are: the baseline
            yield {k: v for k, v in kw.items() if k != "split"}, -1 if kw.get("split") == 1 else 0
        for (r, ks), u in itertools.product(SHAPES_RK + ((1, 16), (2, 8)), (1, 2)):
            rows = r * ks
            if rows * u > 16 or rows < 2:
                continue
            for w in sorted({rows, rows // 2} & {1, 2, 4, 8}):
                for extra in ({}, {"xjit": True}, {"barrier": True}):
                    for wave in (-1, 0) if rows <= 2 else (-1,):
                        yield dict(rows=r, kslices=ks, unroll=u, num_warps=w, ring=True, **extra), wave
        return
    if mode == "interleave":  # the table's programs and the ring's best, with and without interleaved slices
        ring = [dict(rows=1, kslices=8, unroll=2, num_warps=4, ring=True, xjit=True),
                dict(rows=1, kslices=8, unroll=2, num_warps=4, ring=True),
                dict(rows=1, kslices=8, unroll=1, num_warps=4, ring=True),
                dict(rows=2, kslices=2, unroll=2, num_warps=4, ring=True, xjit=True),
                dict(rows=1, kslices=2, unroll=1, num_warps=2, ring=True, barrier=True),
                dict(rows=1, kslices=16, unroll=1, num_warps=8, ring=True, xjit=True),
                dict(rows=1, kslices=4, unroll=1, num_warps=4, ring=True),
                dict(rows=2, kslices=4, unroll=1, num_warps=4, ring=True),
                dict(rows=1, kslices=16, unroll=1, num_warps=8),
                dict(rows=1, kslices=8, unroll=2, num_warps=4)]  # fmt: skip
        table = [json.loads(c) for c in sorted({json.dumps(c, sort_keys=True) for c in int4_mma.TUNED.values()})]
        for kw in table + [{**r, "split": 1} for r in ring]:
            wave = -1 if kw.get("split") == 1 else 0  # one split, or the launcher's
            kw = {k: v for k, v in kw.items() if k != "split"}
            for inter in (False, True) if kw.get("kslices", 1) > 1 else (False,):
                yield {**kw, **({"interleave": True} if inter else {})}, wave
        return
    if mode == "deep":  # the ring with more in flight: 32-64 superblock loads a program a step, up to 8 warps
        for cfg in {json.dumps(c, sort_keys=True) for key, c in int4_mma.TUNED.items() if not key[2:]}:
            kw = json.loads(cfg)
            yield {k: v for k, v in kw.items() if k != "split"}, -1 if kw.get("split") == 1 else 0
        for (r, ks), u in itertools.product(((1, 8), (1, 16), (2, 8), (2, 4), (4, 4), (1, 4), (4, 2)), (2, 4, 8)):
            rows = r * ks
            if not 32 <= rows * u <= 64:
                continue
            for w, extra in itertools.product(sorted({min(rows, 8), min(rows, 4)}), ({}, {"xjit": True})):
                for inter in (False, True) if ks > 1 else (False,):
                    kw = dict(rows=r, kslices=ks, unroll=u, num_warps=w, ring=True, **extra)
                    yield {**kw, **({"interleave": True} if inter else {})}, -1
        return
    if mode == "inflight":  # more weight loads in flight a thread: warps over 2 tile rows, xjit, barrier (+ depth 2)
        for (r, ks), u in itertools.product(SHAPES_RK + ((1, 16), (2, 8), (4, 4)), (1, 2, 4)):
            rows = r * ks
            if rows * u > 64 or rows < 2:
                continue
            for w in sorted({rows, max(1, rows // 2)} & {1, 2, 4, 8}):
                for xjit, depth, barrier in ((False, 1, False), (True, 1, False), (False, 1, True), (False, 2, True)):
                    if depth == 2 and u == 4 or xjit and w == rows and u < 4:
                        continue
                    kw = dict(rows=r, kslices=ks, unroll=u, num_warps=w, xjit=xjit, depth=depth, barrier=barrier)
                    yield kw, -1  # one split
        return
    waves = (0, -1, 1, 2, 4) if mode == "full" else (0, -1)
    for (r, ks), u, wave in itertools.product(SHAPES_RK, (1, 2, 4), waves):
        if r * ks * u > 32 or mode == "quick" and u == 4 and (r, ks) not in ((4, 1), (1, 4)):
            continue
        yield dict(rows=r, kslices=ks, unroll=u, num_warps=r * ks), wave
        if mode == "quick" and r * ks >= 2 and u <= 2:  # fewer warps than tile rows: more loads in flight a thread
            yield dict(rows=r, kslices=ks, unroll=u, num_warps=r * ks // 2), wave
            # and this step's activations loaded in the step: registers freed for the weights in flight
            yield dict(rows=r, kslices=ks, unroll=u, num_warps=r * ks // 2, xjit=True), wave
        if mode == "quick" and u == 4:
            yield dict(rows=r, kslices=ks, unroll=u, num_warps=r * ks, xjit=True), wave
        if mode == "quick":  # the next step's loads kept ahead of this step's mma by a barrier
            yield dict(rows=r, kslices=ks, unroll=u, num_warps=r * ks, barrier=True), wave
            if r * ks >= 2 and u <= 2:
                yield dict(rows=r, kslices=ks, unroll=u, num_warps=r * ks // 2, barrier=True), wave


def sweep(bw: float, mode: str, reps: int, ms: tuple = ()) -> list[dict]:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    out = []
    for name, (n, k) in SHAPES.items():
        group = 128
        q, s, z = make_layer(n, k, group, torch.bfloat16)
        nbytes_int4 = n * k // 2 + 2 * (k // group) * n * 2
        copies = max(2, math.ceil(3 * l2 / nbytes_int4))
        qws = [layout.repack(q) for _ in range(copies)]
        szp = layout.pack_scales(s, z)
        old_q = pack_rows(q, 4)
        olds = [old_q.clone() for _ in range(copies)]
        w16 = [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02 for _ in range(max(2, math.ceil(3 * l2 / (n * k * 2))))]
        for m in ms or {"full": (1, 8, 16, 64), "quick": (1, 16), "interleave": (1, 16)}.get(mode, (1,)):
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            row = {"shape": name, "n": n, "k": k, "m": m, "int4_bytes": nbytes_int4, "bf16_bytes": n * k * 2}
            row["old_int4_us"] = graph_time_us([lambda w=w: triton_int4.int4_matmul(x, w, s, z, group) for w in olds], reps)
            row["bf16_linear_us"] = graph_time_us([lambda w=w: F.linear(x, w) for w in w16], reps)
            row["bf16_gemv_us"] = graph_time_us([lambda w=w: triton_gemv.gemv(x, w) for w in w16], reps) if m <= triton_gemv.MAX_M else None
            best = (None, float("inf"))
            row["mma"] = {}
            for kw, wave in configs(mode):
                if m > 8 and kw["unroll"] > 2 or m > 32 and kw["unroll"] > 1:  # registers: eight column blocks a word
                    continue
                tiles = -(-(n // 16) // kw["rows"])
                step = kw["unroll"] * kw["kslices"]
                split = 0 if wave == 0 else 1 if wave == -1 else max(1, min(k // 64 // step, -(-wave * sms // tiles)))
                key = json.dumps({**kw, "split": split}, sort_keys=True)
                try:
                    us = graph_time_us(
                        [lambda qw=qw, kw=kw, split=split: int4_mma.mma_matmul(x, qw, szp, group, split=split, **kw)
                         for qw in qws],
                        reps,
                    )
                except Exception as err:  # noqa: BLE001
                    row["mma"][key] = repr(err)[:200]
                    continue
                row["mma"][key] = round(us, 2)
                if us < best[1]:
                    best = (key, us)
            row["best"] = json.loads(best[0]) if best[0] else None
            row["best_us"] = best[1]
            row["best_gbps"] = nbytes_int4 / best[1] / 1e3
            row["copy_gbps"] = bw / 1e9
            row["speedup_vs_old"] = row["old_int4_us"] / best[1]
            row["speedup_vs_bf16_gemv"] = (row["bf16_gemv_us"] or row["bf16_linear_us"]) / best[1]
            print(json.dumps({k_: v for k_, v in row.items() if k_ != "mma"}), flush=True)
            timed = sorted((us, key) for key, us in row["mma"].items() if isinstance(us, float))
            print("  fastest:", "; ".join(f"{us:.2f} {key}" for us, key in timed[:6]), flush=True)
            out.append(row)
    return out


T0 = time.time()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--m", type=int, nargs="*", default=[], help="the rows of x to time (default: the mode's)")
    ap.add_argument("--quick", action="store_true", help="fewer configs, M = 1 and 16")
    ap.add_argument("--extended", action="store_true", help="prefetch depth, eviction policy, PDL on a few program shapes (M = 1)")
    ap.add_argument("--inflight", action="store_true",
                    help="warps over two tile rows, xjit, barrier (and depth 2), M = 1")  # fmt: skip
    ap.add_argument("--ring", action="store_true", help="the ring of two register sets (plain, xjit, barrier), M = 1")
    ap.add_argument("--interleave", action="store_true", help="the table's and the ring's best programs, slices interleaved or not")
    ap.add_argument("--deep", action="store_true", help="the ring with 32-64 superblock loads a program a step, M = 1")
    ap.add_argument("--checks", default="", help="check only the CHECKED programs that set one of these keywords (KEY,KEY...; and the table's)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    import faulthandler

    faulthandler.dump_traceback_later(90, repeat=True)
    t0 = time.time()
    failures: list = []
    checks = correctness(failures, args.checks)
    print(f"correctness: {len(checks) - len(failures)}/{len(checks)} ok; worst err "
          f"{max(c['err'] for c in checks):.2e}; {time.time() - t0:.0f}s", flush=True)  # fmt: skip
    for f in failures[:10]:
        print("FAIL", f)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "checks": len(checks), "failures": failures}
    if not args.no_sweep:
        bw = copy_bandwidth()
        print(f"copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
        result["copy_gbps"] = bw / 1e9
        mode = ("extended" if args.extended else "inflight" if args.inflight else "ring" if args.ring
                else "interleave" if args.interleave else "deep" if args.deep else "quick" if args.quick else "full")  # fmt: skip
        result["sweep"] = sweep(bw, mode, args.reps, tuple(args.m))
        # the split is left to the launcher, but for one split (no workspace: a different program)
        tuned = {"x".join(map(str, (r["n"], r["k"]) + int4_mma._band(r["m"]))):
                 {k: v for k, v in r["best"].items() if k != "split" or v == 1}
                 for r in result["sweep"] if r["m"] in (1, 16, 32, 64) and r["best"]}  # fmt: skip
        result["tuned_env"] = json.dumps(tuned)
        print(f"FRAMEWORK_INT4_MMA_TUNED='{result['tuned_env']}'", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "int4_mma.json").write_text(json.dumps(result, indent=1))
    print(f"done in {time.time() - t0:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
