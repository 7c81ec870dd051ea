"""A plugin-based LLM inference and serving engine.

    import framework
    llm = framework.build({"model": "path/to/hf-model"})
    outs = llm.generate(["Hello"], framework.SamplingParams(temperature=0.8, max_tokens=64))
"""

from __future__ import annotations

from framework.config import ConfigLike, EngineConfig, load_config
from framework.hookspecs import hookimpl
from framework.outputs import CompletionOutput, Logprob, RequestOutput
from framework.sampling_params import SamplingParams

__version__ = "0.1.0"


def build(config: ConfigLike | None = None, **overrides) -> "LLM":
    """Build an offline ``LLM`` from an ``EngineConfig``, a dict or a YAML/JSON path."""
    from framework.entrypoints.llm import LLM

    return LLM(config=load_config(config, **overrides))


def __getattr__(name: str):
    if name == "LLM":
        from framework.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = [
    "build",
    "LLM",
    "EngineConfig",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "hookimpl",
    "__version__",
]
