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

Off by default until measured end to end (docs/benchmarks.md); the int4 kernel alone under PDL (session 14's
``FRAMEWORK_INT4_MMA_PDL=1``, since replaced by this) made batch-1 decode slower on an H200 (2.76 against
2.68 ms), because nothing before it signalled early.
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

ENABLED = os.environ.get("FRAMEWORK_PDL", "0") == "1" and gdc_wait is not None


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch as programmatic dependents (``FRAMEWORK_PDL=1`` on sm_90+)."""
    if not ENABLED or device.type != "cuda":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch_args(device: torch.device) -> dict:
    """The launch keywords of a kernel taking part: its ``PDL`` constexpr and ``launch_pdl`` (none when off,
    so that the kernel compiles and launches exactly as before)."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {}


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """Let the next kernel launch now, then wait for the one before to finish (no-op unless PDL)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
