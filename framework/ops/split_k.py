"""What the split-K Triton kernels share: the device's SM count (it sizes their grids) and the arrival
counters of a split-K reduction done inside the launch.

In-launch reduction: each program of an output tile stores its partial result, then bumps the tile's
counter (an int32 in a persistent zeroed buffer); the program that arrives last adds the partials and puts
the counter back to 0. Every launch therefore leaves the buffer zeroed, so one buffer per device serves
every kernel (the GEMV, the int4 GEMM, decode attention), as long as the launches that use it run one after
another on one stream, as the engine's do.

CUDA graphs: a buffer allocated during capture would belong to the graph, so buffers are made (or grown)
outside capture only; a capture that needs more counters than exist gets None and the kernel falls back to
its two-launch reduction. A buffer replaced by a larger one is kept alive, since a graph captured earlier
still uses it.
"""

from __future__ import annotations

import functools

import torch

MIN_COUNTERS = 1 << 16  # 256 KiB of int32: enough for every kernel's tiles at the engine's sizes
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # smaller buffers that captured graphs may still use


def _key(device: torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is capturing a CUDA graph."""
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


def arrival_counters(device: torch.device, needed: int) -> torch.Tensor | None:
    """At least ``needed`` zeroed int32 counters on ``device``, or None during a capture that needs more."""
    key = _key(device)
    buffer = _COUNTERS.get(key)
    if buffer is None or buffer.numel() < needed:
        if capturing(key):
            return None
        if buffer is not None:
            _RETIRED.append(buffer)
        buffer = _COUNTERS[key] = torch.zeros(max(MIN_COUNTERS, needed), dtype=torch.int32, device=key)
    return buffer


def counters_on(device: torch.device) -> torch.Tensor | None:
    """The device's counter buffer, if one was made (tests check that launches leave it zeroed)."""
    return _COUNTERS.get(_key(device))


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 8 elsewhere (the Triton interpreter: any value is correct)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count
