"""Check and time the Triton small-M GEMV (framework.ops.triton_gemv) at Llama-3-8B's linear shapes.

For each shape (qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down
14336->4096, lm_head 4096->128256) and M in 1, 2, 4, 8 (bf16):

1. every candidate config (a small sweep: the fma and tensor-core loops,
   block sizes, split-K) is checked against float32 ``x @ W^T`` (relative
   Frobenius error < 8e-3, every element within 4 bf16 ulps of ``|x| @ |W|^T``,
   the output NaN-poisoned first) and timed, as is ``F.linear``;
2. the fused MLP tail ``gemv_silu_mul(gate_up, W_down)`` against
   ``silu_and_mul`` (the Triton op) followed by ``F.linear`` or the best GEMV;
3. the fused norm ``gemv_rmsnorm(x, residual, w_norm, eps, W)`` at the
   decoder layer's two norm + projection pairs (input_layernorm + qkv,
   post_attention_layernorm + gate_up; M in --norm-ms, default 1) against
   ``triton_rmsnorm.rms_norm`` followed by ``gemv`` (the layers' configs):
   the new residual must equal the unfused one bit for bit and the output
   meet the bounds above; the default config and a sweep are timed, and a
   ``NORM_TUNED`` table printed. ``--norm-only`` runs this section alone.

Timing: CUDA graphs (as the engine's decode step runs), each replay running
the op over enough copies of the weight (>= 3x L2, rotated) that no read is
served from L2; the median over replays, per launch. Bandwidth is weight bytes
over time, against a measured 1 GiB device-to-device copy (bytes read plus
written). Last: a table, the per-token sum over 32 layers + lm_head for
F.linear and for the best GEMV (against the copy floor), a ``TUNED`` table to
paste into framework/ops/gemv_configs.py, and one JSON line.

    python benchmarks/check_gemv.py [--ms 1,2,4,8] [--reps 15] [--norm-ms 1] [--norm-only] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, when run as a script
from framework.ops import gemv_configs, triton_activation, triton_gemv, triton_rmsnorm  # noqa: E402

Config = gemv_configs.Config
HIDDEN, INTER, VOCAB, LAYERS = 4096, 14336, 128256, 32
SHAPES = {  # name -> (N, K, times per token)
    "qkv": (6144, HIDDEN, LAYERS),
    "o": (HIDDEN, HIDDEN, LAYERS),
    "gate_up": (2 * INTER, HIDDEN, LAYERS),
    "down": (HIDDEN, INTER, LAYERS),
    "lm_head": (VOCAB, HIDDEN, 1),
}
DTYPE = torch.bfloat16
DEVICE = "cuda"
REL, ULP = 8e-3, 2.0**-7


def candidates(m: int, n: int, k: int, sms: int) -> list[Config]:
    """The sweep for one (M, N, K): heuristic first, then fma tiles sized to M, then tensor-core tiles."""
    fma = {
        1: [(8, 512, 4), (16, 256, 4), (4, 1024, 4), (8, 1024, 8), (16, 512, 8)],
        2: [(8, 256, 4), (4, 512, 4), (8, 512, 8)],
        4: [(4, 256, 4), (8, 256, 8)],
        8: [(4, 256, 8)],
    }[triton_next_pow2(m)]
    dot = [(64, 128, 4, 4), (64, 256, 4, 3), (32, 256, 4, 4), (16, 256, 4, 4), (128, 128, 8, 3)]
    out = [gemv_configs.heuristic_config(m, n, k, torch.device(DEVICE))]
    for bn, bk, warps in fma:
        for split in sorted({1, gemv_configs.auto_split(n, k, bn, bk, sms), gemv_configs.auto_split(n, k, bn, bk, sms, 4.0)}):
            out.append(Config(False, bn, bk, split, warps, 3))
    for bn, bk, warps, stages in dot:
        for split in sorted({1, gemv_configs.auto_split(n, k, bn, bk, sms), gemv_configs.auto_split(n, k, bn, bk, sms, 4.0)}):
            out.append(Config(True, bn, bk, split, warps, stages))
    return list(dict.fromkeys(out))


def triton_next_pow2(m: int) -> int:
    return 1 << (m - 1).bit_length()


# -- timing --------------------------------------------------------------------------


def graph_time_us(launches: list, reps: int) -> float:
    """Median time per launch (us) of a CUDA graph running ``launches`` once per replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in launches:  # warm-up outside capture: compiles, allocator pools
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in launches:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    del graph
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3 / len(launches)


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 1 GiB device-to-device copy (median of 20)."""
    src = torch.randn(2**29, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


# -- checking -------------------------------------------------------------------------


def check(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> tuple[bool, float]:
    """(ok, relative Frobenius error) of ``out`` against the fp32 reference ``ref`` (``scale``: ``|x| @ |W|^T``)."""
    if not torch.isfinite(out).all():
        return False, float("nan")
    err = out.float() - ref
    rel = (err.norm() / ref.norm()).item()
    worst = (err.abs() / (4 * ULP * scale + 1e-30)).max().item()
    return rel < REL and worst <= 1.0, rel


def weights_for(n: int, k: int, l2: int) -> list[torch.Tensor]:
    nbytes = n * k * 2
    copies = max(2, math.ceil(3 * l2 / nbytes))
    return [torch.randn(n, k, device=DEVICE, dtype=DTYPE) * 0.02 for _ in range(copies)]


def sweep_shape(name, n, k, ms, sms, l2, reps, rows, failures):
    ws = weights_for(n, k, l2)
    w0 = ws[0].float()
    for m in ms:
        x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
        ref = x.float() @ w0.T
        scale = x.float().abs() @ w0.abs().T
        _, rel_lin = check(F.linear(x, ws[0]), ref, scale)
        lin_us = graph_time_us([lambda w=w, x=x: F.linear(x, w) for w in ws], reps)
        row = {"shape": name, "m": m, "n": n, "k": k, "linear_us": lin_us, "linear_rel": rel_lin, "configs": {}}
        for cfg in candidates(m, n, k, sms):
            try:
                out = torch.full((m, n), float("nan"), device=DEVICE, dtype=DTYPE)
                ok, rel = check(triton_gemv.gemv(x, ws[0], out=out, config=cfg), ref, scale)
                if not ok:
                    failures.append(f"{name} m={m} {cfg}: rel={rel:.2e} or an element out of bounds / unwritten")
                    continue
                us = graph_time_us([lambda w=w, c=cfg, x=x: triton_gemv.gemv(x, w, config=c) for w in ws], reps)
                row["configs"][str(cfg)] = {"us": us, "rel": rel}
            except Exception as exc:  # a config this GPU cannot compile or run: report, go on  # noqa: BLE001
                failures.append(f"{name} m={m} {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        rows.append(row)
    del ws


def sweep_silu_mul(ms, sms, l2, reps, best_down, rows, failures):
    """down(silu(gate) * up): Triton silu_and_mul + F.linear / + best GEMV, against gemv_silu_mul configs."""
    n, k = HIDDEN, INTER
    ws = weights_for(n, k, l2)
    w0 = ws[0].float()
    act = triton_activation.silu_and_mul
    for m in ms:
        gate_up = torch.randn(m, 2 * k, device=DEVICE, dtype=DTYPE) * 2
        h = F.silu(gate_up[:, :k]) * gate_up[:, k:]
        ref, scale = h.float() @ w0.T, h.float().abs() @ w0.abs().T
        base_us = graph_time_us([lambda w=w, g=gate_up: F.linear(act(g), w) for w in ws], reps)
        bd = best_down.get(m)
        unfused_us = (
            graph_time_us([lambda w=w, g=gate_up, c=bd: triton_gemv.gemv(act(g), w, config=c) for w in ws], reps) if bd else None
        )
        row = {"m": m, "silu_linear_us": base_us, "silu_gemv_us": unfused_us, "configs": {}}
        for cfg in candidates(m, n, k, sms):
            try:
                out = torch.full((m, n), float("nan"), device=DEVICE, dtype=DTYPE)
                ok, rel = check(triton_gemv.gemv_silu_mul(gate_up, ws[0], out=out, config=cfg), ref, scale)
                if not ok:
                    failures.append(f"silu_mul m={m} {cfg}: rel={rel:.2e} or an element out of bounds / unwritten")
                    continue
                us = graph_time_us([lambda w=w, c=cfg, g=gate_up: triton_gemv.gemv_silu_mul(g, w, config=c) for w in ws], reps)
                row["configs"][str(cfg)] = {"us": us, "rel": rel}
            except Exception as exc:  # noqa: BLE001
                failures.append(f"silu_mul m={m} {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        rows.append(row)
    del ws


NORM_SHAPES = {"input_layernorm+qkv": "qkv", "post_attention_layernorm+gate_up": "gate_up"}
EPS = 1e-5


def sweep_norm(ms, sms, l2, reps, rows, failures):
    """RMSNorm (+ residual add) then the projection: triton_rmsnorm + gemv against gemv_rmsnorm."""
    for pair, shape in NORM_SHAPES.items():
        n, k, _ = SHAPES[shape]
        ws = weights_for(n, k, l2)
        w0 = ws[0].float()
        nw = torch.rand(k, device=DEVICE).add_(0.5).to(DTYPE)
        for m in ms:
            x, res = torch.randn(m, k, device=DEVICE, dtype=DTYPE), torch.randn(m, k, device=DEVICE, dtype=DTYPE)
            normed, summed = triton_rmsnorm.rms_norm(x, nw, EPS, res)
            if not torch.equal(summed, x + res):
                failures.append(f"{pair} m={m}: triton_rmsnorm's residual is not x + residual")
            ref, scale = normed.float() @ w0.T, normed.float().abs() @ w0.abs().T
            unfused = triton_gemv.gemv(normed, ws[0])

            def unfused_step(w, x=x, res=res):
                return triton_gemv.gemv(triton_rmsnorm.rms_norm(x, nw, EPS, res)[0], w)

            row = {"pair": pair, "m": m, "n": n, "k": k, "configs": {}}
            row["unfused_us"] = graph_time_us([lambda w=w: unfused_step(w) for w in ws], reps)
            default = gemv_configs.NORM_TUNED.get((m, n, k)) or gemv_configs.choose_config(m, n, k, torch.device(DEVICE))
            row["default"] = str(default)
            for cfg in dict.fromkeys([default, *candidates(m, n, k, sms)]):
                try:
                    out = torch.full((m, n), float("nan"), device=DEVICE, dtype=DTYPE)
                    new_res = torch.full((m, k), float("nan"), device=DEVICE, dtype=DTYPE)
                    out, new_res = triton_gemv.gemv_rmsnorm(
                        x, res, nw, EPS, ws[0], out=out, config=cfg, residual_out=new_res
                    )
                    ok, rel = check(out, ref, scale)
                    if not ok or not torch.equal(new_res, summed):
                        failures.append(f"{pair} m={m} {cfg}: rel={rel:.2e}, out of bounds / unwritten, or residual differs")
                        continue
                    us = graph_time_us(
                        [lambda w=w, c=cfg, x=x, r=res: triton_gemv.gemv_rmsnorm(x, r, nw, EPS, w, config=c) for w in ws], reps
                    )
                    same = (out == unfused).float().mean().item()  # bitwise-equal fraction vs the unfused output
                    row["configs"][str(cfg)] = {"us": us, "rel": rel, "equal_to_unfused": same}
                except Exception as exc:  # noqa: BLE001
                    failures.append(f"{pair} m={m} {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            rows.append(row)
        del ws


def report_norm(rows) -> list:
    print("\nRMSNorm + projection (bf16): triton_rmsnorm + gemv against gemv_rmsnorm (default config, best of the sweep)")
    tuned, out = {}, []
    for r in rows:
        cfgs = r["configs"]
        dflt = cfgs.get(r["default"], {}).get("us", float("nan"))
        name, us = best(cfgs)
        eq = cfgs.get(name, {}).get("equal_to_unfused", float("nan"))
        print(
            f"  {r['pair']:32} M={r['m']}: unfused {r['unfused_us']:.1f} us, fused {dflt:.1f} us ({r['default']}), "
            f"best {us:.1f} us ({name}; {100 * eq:.1f}% of outputs equal the unfused); "
            f"per token ({LAYERS} layers) saves {LAYERS * (r['unfused_us'] - min(dflt, us)):.0f} us"
        )
        if name:
            tuned[(r["m"], r["n"], r["k"])] = name if us < r["unfused_us"] else None
        out.append({k: v for k, v in r.items() if k != "configs"} | {"default_us": dflt, "best": [name, us]})
    print("NORM_TUNED = {  # paste into framework/ops/gemv_configs.py (bf16; None: norm + GEMV apart are faster)")
    for (m, n, k), name in sorted(tuned.items()):
        if name is None:
            print(f"    ({m}, {n}, {k}): None,")
            continue
        c = parse(name)
        print(f"    ({m}, {n}, {k}): Config({c.dot}, {c.block_n}, {c.block_k}, {c.split}, {c.num_warps}, {c.num_stages}),")
    print("}")
    return out


def best(configs: dict) -> tuple[str | None, float]:
    if not configs:
        return None, float("inf")
    name = min(configs, key=lambda c: configs[c]["us"])
    return name, configs[name]["us"]


def parse(cfg: str) -> Config:
    kind, bn, bk, s, w, st = cfg.split(":")
    return Config(kind == "dot", int(bn[1:]), int(bk[1:]), int(s[1:]), int(w[1:]), int(st[2:]))


def report(rows, silu_rows, bw, ms, failures) -> dict:
    print(f"\ncopy bandwidth {bw / 1e12:.3f} TB/s (1 GiB device-to-device, read + write)")
    print(f"{'shape':8} {'M':>2} {'F.linear us':>11} {'%bw':>5} {'heur us':>8} {'best us':>8} {'%bw':>5} {'x':>5}  best config")
    per_token = {m: {"linear": 0.0, "gemv": 0.0, "heuristic": 0.0} for m in ms}
    tuned = {}
    for r in rows:
        nbytes = r["n"] * r["k"] * 2
        name, us = best(r["configs"])
        heur = str(gemv_configs.heuristic_config(r["m"], r["n"], r["k"], torch.device(DEVICE)))
        heur_us = r["configs"].get(heur, {}).get("us", float("nan"))
        times = SHAPES[r["shape"]][2]
        per_token[r["m"]]["linear"] += times * r["linear_us"]
        per_token[r["m"]]["gemv"] += times * min(us, r["linear_us"])
        per_token[r["m"]]["heuristic"] += times * (r["linear_us"] if math.isnan(heur_us) else heur_us)
        if name:
            tuned[(r["m"], r["n"], r["k"])] = name if us < r["linear_us"] else None
        pct = lambda t, b=nbytes: 100 * b / (t * 1e-6) / bw  # noqa: E731
        print(
            f"{r['shape']:8} {r['m']:>2} {r['linear_us']:>11.1f} {pct(r['linear_us']):>5.0f} {heur_us:>8.1f} "
            f"{us:>8.1f} {pct(us):>5.0f} {r['linear_us'] / us:>5.2f}  {name}"
        )
    total_bytes = sum(n * k * 2 * t for n, k, t in SHAPES.values())
    floor_us = total_bytes / bw * 1e6
    print(f"\nper token (32 layers' qkv, o, gate_up, down + lm_head; {total_bytes / 1e9:.2f} GB; copy floor {floor_us:.0f} us):")
    for m in ms:
        p = per_token[m]
        print(
            f"  M={m}: F.linear {p['linear']:.0f} us ({p['linear'] / floor_us:.3f}x floor), best GEMV {p['gemv']:.0f} us "
            f"({p['gemv'] / floor_us:.3f}x), heuristic {p['heuristic']:.0f} us; saves {p['linear'] - p['gemv']:.0f} us"
        )
    for r in silu_rows:
        name, us = best(r["configs"])
        unf = r["silu_gemv_us"]
        saves = "" if unf is None else f"; fused saves {LAYERS * (unf - us):.0f} us per token over silu_and_mul+GEMV"
        print(
            f"  MLP tail M={r['m']}: silu_and_mul+F.linear {r['silu_linear_us']:.1f} us, silu_and_mul+GEMV "
            f"{unf if unf is None else round(unf, 1)} us, fused {us:.1f} us ({name}){saves}"
        )
    print("\nTUNED = {  # paste into framework/ops/gemv_configs.py (bf16, H200)")
    for (m, n, k), name in sorted(tuned.items()):
        if name is None:
            print(f"    ({m}, {n}, {k}): None,  # F.linear is faster")
            continue
        c = parse(name)
        print(f"    ({m}, {n}, {k}): Config({c.dot}, {c.block_n}, {c.block_k}, {c.split}, {c.num_warps}, {c.num_stages}),")
    print("}")
    if failures:
        print(f"\n{len(failures)} config failures:")
        for f in failures[:20]:
            print("  " + f)
    return {
        "copy_bw_TBps": bw / 1e12,
        "floor_us": floor_us,
        "per_token_us": per_token,
        "tuned": {f"{m},{n},{k}": v for (m, n, k), v in tuned.items()},
        "silu_mul": [{**{k: v for k, v in r.items() if k != "configs"}, "best": best(r["configs"])} for r in silu_rows],
        "failures": len(failures),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="1,2,4,8")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--no-silu", action="store_true")
    ap.add_argument("--norm-ms", default="1", help="M values of the fused-norm section ('' to skip it)")
    ap.add_argument("--norm-only", action="store_true", help="only the fused-norm section")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    args = ap.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    sms, l2 = props.multi_processor_count, getattr(props, "L2_cache_size", 50 * 2**20)
    print(f"{props.name}: {sms} SMs, L2 {l2 / 2**20:.0f} MiB, torch {torch.__version__}")
    start = time.perf_counter()
    bw = copy_bandwidth()
    rows, silu_rows, norm_rows, failures = [], [], [], []
    if args.norm_ms:
        t0 = time.perf_counter()
        try:
            sweep_norm([int(m) for m in args.norm_ms.split(",")], sms, l2, args.reps, norm_rows, failures)
        except Exception:  # noqa: BLE001
            failures.append("norm: " + traceback.format_exc().splitlines()[-1])
        print(f"[norm] {time.perf_counter() - t0:.0f} s", flush=True)
    if args.norm_only:
        summary = {"norm": report_norm(norm_rows), "failures": failures, "seconds": time.perf_counter() - start}
        print(json.dumps(summary, default=str))
        return 1 if failures and not any(r["configs"] for r in norm_rows) else 0
    for name in args.shapes.split(","):
        n, k, _ = SHAPES[name]
        t0 = time.perf_counter()
        try:
            sweep_shape(name, n, k, ms, sms, l2, args.reps, rows, failures)
        except Exception:  # noqa: BLE001
            failures.append(f"{name}: " + traceback.format_exc().splitlines()[-1])
        print(f"[{name}] {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.no_silu:
        best_down = {
            r["m"]: parse(best(r["configs"])[0]) for r in rows if r["shape"] == "down" and best(r["configs"])[0]
        }
        t0 = time.perf_counter()
        try:
            sweep_silu_mul(ms, sms, l2, args.reps, best_down, silu_rows, failures)
        except Exception:  # noqa: BLE001
            failures.append("silu_mul: " + traceback.format_exc().splitlines()[-1])
        print(f"[silu_mul] {time.perf_counter() - t0:.0f} s", flush=True)
    summary = report(rows, silu_rows, bw, ms, failures)
    if norm_rows:
        summary["norm"] = report_norm(norm_rows)
    summary["seconds"] = time.perf_counter() - start
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "check_gemv.json").write_text(json.dumps({"rows": rows, "silu": silu_rows, "norm": norm_rows, "failures": failures}, indent=1))
    print(json.dumps(summary, default=str))
    return 1 if failures and not any(r["configs"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
