"""A worker rank: builds its shard of the model, then follows the driver's messages.

Every rank runs the same ``ModelRunner`` code on its shard. A worker's loop::

    join the process groups -> build the runner (its layers, its weight shards)
    loop: wait for a header from the driver (messages.py)
        STEP        -> block copies / swaps, the forward and its collectives (no sampling)
        BLOCK_BYTES -> max over ranks of the KV bytes per block
        PROFILE     -> min over ranks of the KV-cache budget (bytes)
        INIT_KV     -> allocate this rank's KV shard (and CUDA graphs)
        SHUTDOWN    -> leave the loop, destroy the groups, exit 0

Any error ends the process with a non-zero exit code; the driver's monitor
sees it (``executor.py``). A spawned worker also exits when its parent, the
driver, is gone (a watchdog thread), so a killed engine leaves no orphans.

Spawned workers are ``python -m framework.distributed`` processes that
read their ``WorkerSpec`` as JSON on stdin (``spec_to_json``): no pickle, and
the user's main module is never re-imported (so scripts need no
``if __name__ == "__main__"`` guard).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from framework.config import EngineConfig
from framework.distributed import messages
from framework.distributed.parallel_state import (
    ParallelState,
    RankLayout,
    device_for_rank,
)
from framework.model_config import HFConfig, ModelConfig

logger = logging.getLogger(__name__)


@dataclass
class WorkerSpec:
    """What a worker process is started with (handed over by the process launcher, not the network)."""

    layout: RankLayout
    local_rank: int
    device_type: str  # "cuda" or "cpu"
    init_method: str
    timeout_s: float
    config: EngineConfig
    model_config: ModelConfig
    parent_pid: int | None = None  # exit when this process is gone (None: no watchdog)
    log_level: int = logging.WARNING


def build_runner(
    config: EngineConfig,
    model_config: ModelConfig,
    device: torch.device,
    state: ParallelState,
):
    """This rank's ``ModelRunner`` (its shard of the model, loaded from the checkpoint)."""
    from framework.engine.model_runner import ModelRunner
    from framework.quantization import resolve_quant_config
    from framework.registry import load_registries

    registries = load_registries(config.plugins.disable)
    quant = resolve_quant_config(registries, config.quantization, model_config.hf_config)
    return ModelRunner(config, model_config, registries, device, quant, parallel=state)


def free_device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device; (0, 0) elsewhere."""
    if device.type != "cuda":
        return 0, 0
    return torch.cuda.mem_get_info(device)


def kv_budget(
    runner,
    config: EngineConfig,
    before: tuple[int, int],
    num_tokens: int,
    num_seqs: int,
) -> int:
    """KV-cache bytes this rank can give: its share of ``gpu_memory_utilization`` minus what the
    process used before the model (other processes) and the profiled peak (weights, activations, graphs)."""
    free_before, total = before
    peak = runner.profile_peak_memory(num_tokens, num_seqs)
    return int(total * config.gpu_memory_utilization) - (total - free_before) - peak


def serve(runner, state: ParallelState, config: EngineConfig, before: tuple[int, int]) -> None:
    """Follow the driver's messages until SHUTDOWN."""
    while True:
        header = state.receive_header(messages.HEADER_SIZE)
        op = int(header[0])
        if op == messages.STEP:
            step = messages.decode_step(header, state.receive_payload(messages.step_payload_size(header)))
            runner.execute_worker_step(step.prepared, step.copies, step.swap_out, step.swap_in)
        elif op == messages.BLOCK_BYTES:
            state.reduce_int(runner.kv_block_bytes(), "max")
        elif op == messages.PROFILE:
            state.reduce_int(kv_budget(runner, config, before, int(header[1]), int(header[2])), "min")
        elif op == messages.INIT_KV:
            runner.init_kv_cache(int(header[1]), int(header[2]))
        elif op == messages.SHUTDOWN:
            return
        else:
            raise RuntimeError(f"unknown message from the driver: op {op}")


def run_worker(spec: WorkerSpec) -> None:
    """Entry point of a worker process (ranks 1..N-1)."""
    fmt = f"%(asctime)s [rank {spec.layout.rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=spec.log_level, format=fmt)
    if spec.parent_pid is not None:
        threading.Thread(target=_exit_with_parent, args=(spec.parent_pid,), daemon=True).start()
    device = device_for_rank(spec.device_type, spec.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    before = free_device_memory(device)
    state = ParallelState(spec.layout, device, spec.init_method, spec.timeout_s)
    runner = build_runner(spec.config, spec.model_config, device, state)
    serve(runner, state, spec.config, before)
    # Only after SHUTDOWN: on an error the process exits, and the driver sees its exit code.
    runner.release_graphs()
    if not state.destroy():
        logging.shutdown()
        os._exit(0)  # a teardown thread stuck in NCCL would hold up the interpreter's exit


def spec_to_json(spec: WorkerSpec) -> str:
    """The spec as JSON: the engine config by its pydantic model, the model config field by field."""
    fields = {}
    for f in dataclasses.fields(spec.model_config):
        value = getattr(spec.model_config, f.name)
        if isinstance(value, Path):
            fields[f.name] = ["path", str(value)]
        elif isinstance(value, torch.dtype):
            fields[f.name] = ["dtype", str(value).removeprefix("torch.")]
        elif isinstance(value, HFConfig):
            fields[f.name] = ["hf_config", dict(value)]
        else:
            fields[f.name] = ["json", value]
    data = {k: getattr(spec, k) for k in ("local_rank", "device_type", "init_method", "timeout_s", "parent_pid",
                                          "log_level")}  # fmt: skip
    data["layout"] = dataclasses.asdict(spec.layout)
    data["config"] = spec.config.model_dump(mode="json")
    data["model_config"] = fields
    return json.dumps(data)


def spec_from_json(text: str) -> WorkerSpec:
    data = json.loads(text)
    decode = {
        "path": Path,
        "dtype": lambda name: getattr(torch, name),
        "hf_config": HFConfig,
        "json": lambda v: v,
    }
    model_config = ModelConfig(
        **{name: decode[kind](value) for name, (kind, value) in data.pop("model_config").items()}
    )
    return WorkerSpec(
        layout=RankLayout(**data.pop("layout")),
        config=EngineConfig.model_validate(data.pop("config")),
        model_config=model_config,
        **data,
    )


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            logger.error("the driver process %d is gone; worker exits", parent_pid)
            os._exit(1)
