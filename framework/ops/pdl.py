"""Programmatic dependent launch (PDL) for the decode path's Triton kernels: ``FRAMEWORK_PDL=1``, sm_90+.

A kernel launched with ``launch_pdl=True`` may start while the kernel before it on the stream still runs
(also inside CUDA graphs, as a programmatic edge), once every program of that one has signalled
``griddepcontrol.launch_dependents``. Each kernel that takes part calls ``pdl_start`` first: it signals its
own dependents, then waits (``griddepcontrol.wait``) until the kernel before it has finished and its writes
are visible. Nothing is read from the previous kernel's outputs, and nothing is written, before that wait;
a kernel may issue loads of read-only data (weights) above it, as the int4 tensor-core kernel does. A kernel
launched the ordinary way after one of these simply starts when that one ends; a PDL launch after an
ordinary kernel starts when that one ends too (its implicit signal). So the kernels gain only where two
of them that take part follow each other: the launch and the first loads of the second overlap the end of
the first.

``FRAMEWORK_PDL``: ``auto`` (the default) launches this way the kernels of steps of up to ``AUTO_MAX_ROWS``
rows (each caller passes its rows: the step's tokens or sequences), ``1`` those of every step, ``0`` none.
Measured on an H200 (docs/benchmarks.md): int4 batch-1 decode 2.268 against 2.457 ms with the ring programs of
the int4 kernel, bf16 batch 1 about 1% faster; but int4 batch 16 3.339 against 3.149 ms, and batch 32 and 64
slower too (session 15), hence the row limit.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None

MODE = os.environ.get("FRAMEWORK_PDL", "auto")
if MODE not in ("0", "1", "auto"):
    raise ValueError(f"FRAMEWORK_PDL must be 0, 1 or auto; got {MODE!r}")
AUTO_MAX_ROWS = 8  # auto: steps of up to this many rows (decode batch 1-8)
AVAILABLE = gdc_wait is not None


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(device: torch.device, rows: int | None = None) -> bool:
    """Whether a kernel on ``device`` for a step of ``rows`` rows launches as a programmatic dependent (sm_90+;
    ``FRAMEWORK_PDL``: ``auto`` for up to AUTO_MAX_ROWS rows, ``1`` always, ``0`` never; ``rows`` None: only
    under ``1``)."""
    if not AVAILABLE or MODE == "0" or device.type != "cuda":
        return False
    if MODE == "auto" and (rows is None or rows > AUTO_MAX_ROWS):
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch_args(device: torch.device, rows: int | None = None) -> dict:
    """The launch keywords of a kernel taking part, for a step of ``rows`` rows: its ``PDL`` constexpr and
    ``launch_pdl`` (none when off, so that the kernel compiles and launches exactly as before)."""
    return {"PDL": True, "launch_pdl": True} if enabled(device, rows) else {}


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """Let the next kernel launch now, then wait for the one before to finish (no-op unless PDL)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
