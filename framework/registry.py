"""Plugin discovery and the registries that plugins fill.

Plugins are found through the ``framework.plugins`` entry-point group, once
per process (``plugin_manager()`` caches). Our own built-in plugins are
declared in pyproject.toml exactly as a third party declares theirs; the core
never imports ``plugins.*`` by name.

Which entry points load:

* ``FRAMEWORK_PLUGINS`` unset: every installed plugin;
* ``FRAMEWORK_PLUGINS=""``: the built-in plugins only;
* ``FRAMEWORK_PLUGINS="a,b"``: the built-ins plus the entry points named a, b.

A config's ``plugins.disable`` list removes plugins by entry-point name for
one engine; the plugins in ``ESSENTIAL`` cannot be disabled.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from framework import hookspecs

ENTRY_POINT_GROUP = "framework.plugins"
BUILTIN_DISTRIBUTION = "llm-framework"
# The engine cannot run without a sampler and an attention backend.
ESSENTIAL = frozenset({"kernels", "samplers"})
REGISTRY_KINDS = ("models", "attention_backends", "quantizers", "samplers")

_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None
_builtin_names: set[str] = set()


def _allow_list() -> set[str] | None:
    raw = os.environ.get("FRAMEWORK_PLUGINS")
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _is_builtin(ep: importlib.metadata.EntryPoint) -> bool:
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) or getattr(dist, "metadata", {}).get("Name", "")
    return (name or "").replace("_", "-").lower() == BUILTIN_DISTRIBUTION


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loading entry points on first call."""
    global _manager
    with _lock:
        if _manager is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
            pm.add_hookspecs(hookspecs)
            allow = _allow_list()
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                builtin = _is_builtin(ep)
                if not builtin and allow is not None and ep.name not in allow:
                    continue
                if pm.get_plugin(ep.name) is not None:
                    continue  # the same distribution seen twice on sys.path
                pm.register(ep.load(), name=ep.name)
                if builtin:
                    _builtin_names.add(ep.name)
            _manager = pm
        return _manager


def reset_plugin_manager() -> None:
    """Forget the loaded plugins (tests; a changed ``FRAMEWORK_PLUGINS``)."""
    global _manager
    with _lock:
        _manager = None
        _builtin_names.clear()


def is_builtin(plugin_name: str) -> bool:
    plugin_manager()
    return plugin_name in _builtin_names


# -- registries ----------------------------------------------------------------


@dataclass
class Entry:
    """One registered thing: its name, target and the plugin that gave it."""

    name: str
    target: Any
    plugin: str
    _loaded: Any = field(default=None, repr=False)

    def load(self) -> Any:
        """Resolve a lazy ``"module:Attribute"`` target (imports on first use)."""
        if self._loaded is None:
            if isinstance(self.target, str):
                module_name, _, attr = self.target.partition(":")
                obj = importlib.import_module(module_name)
                for part in attr.split(".") if attr else ():
                    obj = getattr(obj, part)
                self._loaded = obj
            else:
                self._loaded = self.target
        return self._loaded

    def describe(self) -> str:
        if isinstance(self.target, str):
            return self.target
        return f"{self.target.__module__}:{self.target.__qualname__}"


class Registry:
    """Name -> ``Entry`` for one kind of thing (models, backends, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.entries: dict[str, Entry] = {}

    def add(self, name: str, target: Any, plugin: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"plugin {plugin!r} registered a {self.kind} entry with an invalid name {name!r}")
        if name in self.entries:
            other = self.entries[name].plugin
            raise ValueError(f"{self.kind} {name!r} is registered by both plugin {other!r} and plugin {plugin!r}")
        self.entries[name] = Entry(name, target, plugin)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> Any:
        """The registered object, imported if it was lazy; KeyError lists names."""
        if name not in self.entries:
            known = ", ".join(self.names()) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; installed: {known}")
        return self.entries[name].load()


@dataclass
class Registries:
    """Everything the enabled plugins registered, plus the hook caller."""

    models: Registry
    attention_backends: Registry
    quantizers: Registry
    samplers: Registry
    plugins: list[str]
    hook: Any  # pluggy hook relay restricted to the enabled plugins


def _check_disable(pm: pluggy.PluginManager, disable: Iterable[str]) -> list[str]:
    disable = list(disable)
    for name in disable:
        if name in ESSENTIAL and is_builtin(name):
            raise ValueError(f"plugin {name!r} is essential and cannot be disabled")
        if pm.get_plugin(name) is None:
            known = ", ".join(sorted(n for n, _ in pm.list_name_plugin())) or "none"
            raise ValueError(f"plugins.disable names {name!r}, which is not loaded; loaded plugins: {known}")
    return disable


def load_registries(disable: Iterable[str] = ()) -> Registries:
    """Call the registration hooks of every loaded, non-disabled plugin."""
    pm = plugin_manager()
    disable = _check_disable(pm, disable)
    enabled = [name for name, _ in pm.list_name_plugin() if name not in disable]
    registries = {kind: Registry(kind.replace("_", " ").rstrip("s")) for kind in REGISTRY_KINDS}
    for kind in REGISTRY_KINDS:
        caller = getattr(pm.hook, f"register_{kind}")
        # pluggy calls implementations last-registered first; keep install order.
        for impl in reversed(caller.get_hookimpls()):
            if impl.plugin_name in disable:
                continue
            registry, plugin = registries[kind], impl.plugin_name
            impl.function(register=lambda key, target, _r=registry, _p=plugin: _r.add(key, target, _p))
    removed = [pm.get_plugin(name) for name in disable]
    hook = _HookSubset(pm, removed)
    return Registries(**registries, plugins=enabled, hook=hook)


class _HookSubset:
    """``pm.hook`` restricted to the enabled plugins."""

    def __init__(self, pm: pluggy.PluginManager, removed: list):
        self._pm = pm
        self._removed = removed

    def __getattr__(self, name: str):
        if not self._removed:
            return getattr(self._pm.hook, name)
        return self._pm.subset_hook_caller(name, remove_plugins=self._removed)
