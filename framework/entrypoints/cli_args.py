"""CLI flags derived from ``EngineConfig`` (kebab-case): one source of truth."""

from __future__ import annotations

import argparse
import typing
from typing import Any

from framework.config import EngineConfig, load_config

# Fields with a CLI shape of their own.
_SPECIAL = {"model", "plugins"}


def _flag_type(annotation: Any) -> tuple[Any, list | None]:
    """(argparse type, choices) for a field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return type(args[0]), list(args)
    if args:  # Optional[X] / Union[X, None]
        return _flag_type(args[0])
    return annotation, None


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add ``MODEL`` (optional positional), ``--config`` and one flag per EngineConfig field."""
    parser.add_argument("model", nargs="?", default=None, help="Hugging Face model directory (default: demo model)")
    parser.add_argument("--config", default=None, help="YAML or JSON file of engine settings (flags win)")
    group = parser.add_argument_group("engine")
    for name, field in EngineConfig.model_fields.items():
        if name in _SPECIAL:
            continue
        flag = "--" + name.replace("_", "-")
        kind, choices = _flag_type(field.annotation)
        help_text = f"{field.description} (default: {field.default})"
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=name, type=kind, choices=choices, default=None, help=help_text)
    group.add_argument(
        "--disable-plugin", dest="disable_plugins", action="append", default=None, help="plugin to disable (repeatable)"
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    overrides = {
        name: getattr(args, name)
        for name in EngineConfig.model_fields
        if name not in _SPECIAL and getattr(args, name, None) is not None
    }
    if args.model is not None:
        overrides["model"] = args.model
    if args.disable_plugins:
        overrides["plugins"] = {"disable": args.disable_plugins}
    return load_config(args.config, **overrides)
