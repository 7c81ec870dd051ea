"""The per-step forward context: how attention metadata reaches the layers.

The model runner sets it around each forward; ``framework.layers.Attention``
reads it. Model plugins never pass metadata through their signatures.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator


@dataclass
class ForwardContext:
    attn_metadata: Any  # the backend's metadata for this step (None while profiling)


_current: ForwardContext | None = None


@contextmanager
def set_forward_context(attn_metadata: Any) -> Iterator[ForwardContext]:
    global _current
    previous, _current = _current, ForwardContext(attn_metadata)
    try:
        yield _current
    finally:
        _current = previous


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("no forward context: model forward must run inside set_forward_context()")
    return _current
