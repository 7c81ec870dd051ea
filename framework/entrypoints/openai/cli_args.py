"""``ServerConfig`` and the ``framework serve`` flags derived from it.

The server's own settings follow the engine's pattern: one pydantic model,
kebab-case flags derived from its fields, and the same keys in the
``--config`` file (engine and server keys may be mixed there; flags win).
"""

from __future__ import annotations

import argparse
import os
import typing
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from framework.config import EngineConfig, _read_config_file
from framework.entrypoints.cli_args import _flag_type, engine_config_from_args

API_KEY_ENV = "FRAMEWORK_API_KEY"


class ServerConfig(BaseModel):
    """Settings of the HTTP server (``framework serve``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_key: Optional[str] = Field(
        None, description=f"require 'Authorization: Bearer KEY' (also from ${API_KEY_ENV})"
    )
    served_model_name: Optional[list[str]] = Field(
        None, description="model name(s) the API accepts; the first names responses (default: the model argument)"
    )
    chat_template: Optional[str] = Field(None, description="Jinja chat template, or a file holding one")
    max_queued_requests: Optional[int] = Field(
        None, ge=1, description="most sequences (n per request) waiting for the engine; beyond: 503 + Retry-After"
    )
    shutdown_timeout: float = Field(
        20.0, ge=0, description="seconds in-flight requests may run after SIGTERM before they are aborted"
    )
    log_stats_interval: float = Field(10.0, ge=0, description="seconds between stats log lines (0: off)")


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """One flag per ``ServerConfig`` field (after ``add_engine_args`` added MODEL and --config)."""
    group = parser.add_argument_group("server")
    for name, field in ServerConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} (default: {field.default})"
        kind, _ = _flag_type(field.annotation)
        if any(typing.get_origin(a) is list for a in typing.get_args(field.annotation)):  # --served-model-name a b
            group.add_argument(flag, dest=name, nargs="+", default=None, help=help_text)
        else:
            group.add_argument(flag, dest=name, type=kind, default=None, help=help_text)


def configs_from_args(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    """The engine and server settings: defaults < --config file < $FRAMEWORK_API_KEY < flags."""
    file_values: dict[str, Any] = _read_config_file_arg(args.config)
    server_keys = set(ServerConfig.model_fields)
    server_values = {k: v for k, v in file_values.items() if k in server_keys}
    engine_values = {k: v for k, v in file_values.items() if k not in server_keys}
    if os.environ.get(API_KEY_ENV):
        server_values["api_key"] = os.environ[API_KEY_ENV]
    server_values.update({k: getattr(args, k) for k in server_keys if getattr(args, k, None) is not None})
    engine_args = argparse.Namespace(**{**vars(args), "config": engine_values})
    return engine_config_from_args(engine_args), ServerConfig.model_validate(server_values)


def _read_config_file_arg(path: Optional[str]) -> dict[str, Any]:
    return {} if path is None else dict(_read_config_file(Path(path)))
