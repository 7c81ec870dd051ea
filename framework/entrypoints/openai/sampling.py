"""Request fields -> ``SamplingParams``, mapped by name.

A field is passed when ``SamplingParams`` has a field of that name, so the
server picks up engine features (``n``, ``best_of``, penalties, beam
search ...) as soon as the engine grows them. Until then, a request that
sets one of them to anything but its neutral value gets a 400 naming it:
a parameter is never silently ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from framework.entrypoints.openai.errors import (
    from_value_error,
    invalid_request,
    unsupported,
)
from framework.sampling_params import SamplingParams

# Parameters the engine may not support yet, with the value(s) that mean "off".
_NEUTRAL: dict[str, tuple] = {
    "n": (1,),
    "best_of": (None, 1),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "min_tokens": (0,),
    "logit_bias": (None, {}),
    "use_beam_search": (False,),
    "length_penalty": (1, 1.0),
    "prompt_logprobs": (None,),
}


def engine_fields() -> set[str]:
    """Names the engine's ``SamplingParams`` accepts (its init fields)."""
    return {f.name for f in dataclasses.fields(SamplingParams) if f.init and not f.name.startswith("_")}


def supports(name: str) -> bool:
    return name in engine_fields()


def build_sampling_params(values: dict[str, Any], rename: Optional[dict[str, str]] = None) -> SamplingParams:
    """``SamplingParams`` from request values keyed by ``SamplingParams`` names.

    Args:
        values: request values; None means "the engine's default" and is
            dropped, except for ``max_tokens`` where None means "no limit".
        rename: ``SamplingParams`` name -> request parameter name, for
            error messages (e.g. chat's ``top_logprobs`` is ``logprobs``).
    Raises:
        errors.APIError: 400 naming the parameter (unsupported, unknown or invalid).
    """
    rename = rename or {}
    known = engine_fields()
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if value is None and name != "max_tokens":
            continue
        if name in known:
            kwargs[name] = value
        elif name in _NEUTRAL:
            if not _is_neutral(name, value, values):
                raise unsupported(rename.get(name, name), f"got {value!r}")
        else:
            raise invalid_request(f"unknown parameter {rename.get(name, name)!r}", rename.get(name, name))
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as exc:
        raise from_value_error(exc, rename=rename) from exc


def _is_neutral(name: str, value: Any, values: dict[str, Any]) -> bool:
    if name == "best_of" and value == values.get("n", 1):
        return True  # best_of == n: no extra candidates
    return value in _NEUTRAL[name]
