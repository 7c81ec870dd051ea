"""Time the tensor-parallel all-reduce as the engine issues it (NCCL, one process per GPU).

A decode step of a TP model all-reduces the hidden states twice per layer
(after attention and after the MLP): ``2 x layers`` calls of a
``[tokens, hidden]`` bf16 tensor. This times such a run of calls, eagerly and
replayed from a CUDA graph (the engine's decode path), and prints one JSON
line per (world size, tokens): microseconds per call and per step.

    python benchmarks/bench_allreduce.py --world-sizes 2 4 --hidden 8192 --layers 80 --tokens 1 256 [--impl nccl symm]

The batch-1 floor of a TP model is its weight bytes per GPU / copy bandwidth
plus this measured all-reduce time per step (``step_us`` at tokens=1).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _time(fn, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` synchronised runs (after two warm-ups)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        dist.barrier()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _nccl_all_reduce(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


def _time_impl(reduce, world: int, tokens: int, args, device: str) -> dict:
    """Time ``2 x layers`` calls of ``reduce`` eagerly and from a CUDA graph; check a sum of ones first."""
    calls = 2 * args.layers
    ones = torch.ones((tokens, args.hidden), dtype=torch.bfloat16, device=device)
    total = reduce(ones.clone())  # the sum must be right, not only fast
    if not torch.all(total == world):
        raise SystemExit(f"all-reduce of ones gave {total.flatten()[:4].tolist()}, not {world}")
    x = torch.full((tokens, args.hidden), 1.0 / world, dtype=torch.bfloat16, device=device)

    def run_calls() -> None:
        for _ in range(calls):
            reduce(x)

    eager_s = _time(run_calls, args.repeats)
    row = {
        "tokens": tokens, "hidden": args.hidden, "calls_per_step": calls,
        "eager_us_per_call": round(eager_s / calls * 1e6, 2), "eager_step_us": round(eager_s * 1e6, 1),
    }  # fmt: skip
    if not args.skip_graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            reduce(x)  # lazy set-up (NCCL's communicator) happens outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run_calls()
        graph_s = _time(graph.replay, args.repeats)
        graph = None  # NCCL's teardown can hang while a graph that captured collectives lives (pytorch#115388)
        row.update(graph_us_per_call=round(graph_s / calls * 1e6, 2), graph_step_us=round(graph_s * 1e6, 1))
    return row


def _rank(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    else:  # a dry run of the script on CPU (gloo; no graphs)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        args.skip_graph = True
    device = "cuda" if cuda else "cpu"
    impls = {"nccl": _nccl_all_reduce}
    if "symm" in args.impl:
        from framework.distributed.symm_allreduce import SymmMemAllReduce

        try:
            fast = SymmMemAllReduce(dist.group.WORLD, torch.device(device, rank) if cuda else torch.device(device))
            impls["symm"] = lambda x: fast(x) if fast.fits(x) else _nccl_all_reduce(x)
        except RuntimeError as exc:
            if rank == 0:
                print(json.dumps({"world_size": world, "impl": "symm", "skipped": str(exc)}), flush=True)
    for name, reduce in impls.items():
        if name in args.impl:
            for tokens in args.tokens:
                row = _time_impl(reduce, world, tokens, args, device)
                if rank == 0:
                    nccl_env = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}  # tuning knobs tried
                    print(json.dumps({"world_size": world, "impl": name, **row, "nccl_env": nccl_env}), flush=True)
    gc.collect()
    torch.cuda.synchronize() if cuda else None
    left = threading.Event()
    threading.Thread(target=lambda: (dist.destroy_process_group(), left.set()), daemon=True).start()
    if not left.wait(30):
        print(json.dumps({"rank": rank, "teardown": "destroy_process_group did not return in 30 s"}), flush=True)
        os._exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2])
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-graph", action="store_true", help="time eager calls only")
    parser.add_argument("--impl", nargs="+", default=["nccl"], choices=["nccl", "symm"],
                        help="nccl: torch.distributed; symm: framework.distributed.symm_allreduce (one-shot, peer memory)")
    args = parser.parse_args()
    from framework.distributed.parallel_state import free_port

    for world in args.world_sizes:
        if torch.cuda.is_available() and world > torch.cuda.device_count():
            print(json.dumps({"world_size": world, "skipped": f"{torch.cuda.device_count()} GPUs visible"}))
            continue
        mp.spawn(_rank, args=(world, free_port(), args), nprocs=world, join=True)


if __name__ == "__main__":
    main()
