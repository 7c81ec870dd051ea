"""What the split-K Triton kernels share: the device's SM count (it sizes their grids), the arrival
counters of a split-K reduction done inside the launch, and the second launch that adds the partial sums
where there is none (``sum_splits``).

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
import triton
import triton.language as tl

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


@triton.jit
def _sum_splits_kernel(
    ws_ptr,  # fp32 [S, M, N] partial sums
    b_ptr,  # [N] bias (read only if HAS_BIAS)
    out_ptr,  # [M, N], row stride stride_om
    M, N, S, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``out[m, n] = sum_s ws[s, m, n] + b[n]`` in fp32, in split order, rounded once. Grid ``(M, cdiv(N, BLOCK))``."""
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(S):
        acc += tl.load(ws_ptr + (s * M + m) * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_splits(ws: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """``out = ws.sum(0) (+ bias)``: ``ws`` fp32 ``[S, M, N]`` contiguous (or ``[S, M * N]``), ``out`` ``[M, N]``
    with unit last stride, summed in split order in fp32 and rounded once (one launch)."""
    m, n = out.shape
    block = 1024
    _sum_splits_kernel[(m, triton.cdiv(n, block))](
        ws, bias if bias is not None else out, out, m, n, ws.shape[0], out.stride(0),
        HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
    )  # fmt: skip
