"""The GEMV tests share ``gemv_helpers`` (this directory); pytest's importlib mode puts no test directory on
``sys.path``, so it is added here."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture
def gemv_calls(monkeypatch):
    """Pretend the CPU is a CUDA device in eager steps for the layers' dispatch (every fusion on) and
    list the GEMV launches by name (``gemv``, ``gemv_silu_mul``, ``gemv_rmsnorm``)."""
    from gemv_helpers import triton_gemv

    from framework import ops

    calls = []
    for name in ("gemv", "gemv_silu_mul", "gemv_rmsnorm"):
        real = getattr(triton_gemv, name)

        def spy(*args, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*args, **kw)

        monkeypatch.setattr(triton_gemv, name, spy)
    monkeypatch.setattr(ops, "use_triton", lambda x: True)
    monkeypatch.setattr(triton_gemv, "_in_eager_steps", True)  # on a GPU host: CUDA tensors, eager steps
    saved = (triton_gemv._enabled, triton_gemv._fuse_silu_mul, triton_gemv._fuse_norm)
    triton_gemv.set_enabled(True, fuse_silu_mul=True, fuse_norm=True)
    yield calls
    triton_gemv.set_enabled(*saved)
