"""Plugin discovery and the registry of passes, backends and decompositions.

Built-ins (``graphopt.passes``, ``graphopt.backends``) are registered with the
same pluggy manager and the same hooks as third-party packages, which arrive
through the entry-point group ``graphopt``. A plugin that fails to import, or
whose hook raises, is reported as a :class:`PluginWarning` naming the plugin,
the hook and the cause, and everything else keeps working.

``GRAPHOPT_DISABLE_PLUGINS`` (comma-separated entry-point names, or ``all``)
skips third-party plugins, e.g. to rule one out when debugging.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from graphopt import hookspecs
from graphopt._errors import PluginError, UnknownNameError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "graphopt"
DEFAULT_PLUGINS = ("graphopt.passes", "graphopt.backends")


class PluginWarning(UserWarning):
    """A plugin could not be loaded or registered something invalid; it was skipped."""


@dataclass
class Registered:
    name: str
    obj: Any
    plugin: str


@dataclass
class Registry:
    passes: dict[str, Registered] = field(default_factory=dict)
    backends: dict[str, Registered] = field(default_factory=dict)
    decompositions: dict[tuple[str, str], Registered] = field(default_factory=dict)
    plugins: dict[str, str] = field(default_factory=dict)  # plugin name -> where it came from
    problems: list[str] = field(default_factory=list)

    # --------------------------------------------------------------- lookups
    def pass_class(self, name: str) -> Any:
        if name not in self.passes:
            raise UnknownNameError(f"unknown pass {name!r}; known passes: {', '.join(sorted(self.passes))}")
        return self.passes[name].obj

    def backend(self, name: str) -> Any:
        if name not in self.backends:
            raise UnknownNameError(f"unknown target {name!r}; known targets: {', '.join(sorted(self.backends))}")
        return self.backends[name].obj()

    def decomposition(self, domain: str, op_type: str) -> Callable | None:
        entry = self.decompositions.get((domain, op_type))
        return entry.obj if entry else None

    def default_passes(self) -> list[str]:
        return [n for n, r in self.passes.items() if getattr(r.obj, "default", True)]


def _warn(msg: str, registry: Registry) -> None:
    registry.problems.append(msg)
    logger.warning(msg)
    warnings.warn(msg, PluginWarning, stacklevel=3)


def make_plugin_manager(registry: Registry, *, entry_points: bool = True,
                        extra: tuple[tuple[str, Any], ...] = ()) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for modname in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(modname), name=modname)
        registry.plugins[modname] = "built-in"
    if entry_points:
        disabled = {s.strip() for s in os.environ.get("GRAPHOPT_DISABLE_PLUGINS", "").split(",") if s.strip()}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if "all" in disabled or ep.name in disabled or pm.has_plugin(ep.name):
                continue
            try:
                obj = ep.load()
                pm.register(obj, name=ep.name)
            except Exception as e:  # a broken plugin must not break graphopt
                _warn(f"graphopt plugin {ep.name!r} ({ep.value}) failed to load: "
                      f"{type(e).__name__}: {e}; skipped", registry)
                continue
            dist = getattr(ep, "dist", None)
            registry.plugins[ep.name] = f"{dist.name} {dist.version}" if dist else ep.value
    for name, obj in extra:
        pm.register(obj, name=name)
        registry.plugins[name] = "registered in code"
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        name = pm.get_name(e.plugin) or repr(e.plugin)
        hooks = ", ".join(sorted(h for h in dir(e.plugin) if h.startswith("graphopt_")
                                 and not hasattr(hookspecs, h)))
        _warn(f"graphopt plugin {name!r} implements unknown hook(s) {hooks}; known hooks: "
              f"graphopt_register_passes, graphopt_register_backends, graphopt_register_decompositions",
              registry)
    return pm


def _call_each(pm: pluggy.PluginManager, hook_name: str, make_register: Callable[[str], Callable],
               registry: Registry) -> None:
    """Call every implementation of a hook separately so one failure names its plugin."""
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls():
        plugin = pm.get_name(impl.plugin) or repr(impl.plugin)
        try:
            impl.function(register=make_register(plugin))
        except PluginError as e:
            _warn(f"graphopt plugin {plugin!r}, hook {hook_name}: {e}", registry)
        except Exception as e:
            _warn(f"graphopt plugin {plugin!r}, hook {hook_name}: {type(e).__name__}: {e}", registry)


def build_registry(*, entry_points: bool = True, extra: tuple[tuple[str, Any], ...] = ()) -> Registry:
    """Discover plugins and collect what they register."""
    registry = Registry()
    pm = make_plugin_manager(registry, entry_points=entry_points, extra=extra)

    def named_register(kind: str, table: dict[str, Registered], method: str, signature: str) -> Callable:
        """A ``register(cls)`` for classes identified by their ``name`` attribute."""
        def for_plugin(plugin: str) -> Callable:
            def register(cls: Any) -> None:
                name = getattr(cls, "name", "")
                if not name or not callable(getattr(cls, method, None)):
                    raise PluginError(f"{cls!r} is not a {kind}: it needs a 'name' and a '{signature}' method")
                if name in table:
                    raise PluginError(f"{kind} {name!r} is already registered by {table[name].plugin!r}")
                table[name] = Registered(name, cls, plugin)
            return register
        return for_plugin

    pass_register = named_register("pass", registry.passes, "run", "run(model, ctx)")
    backend_register = named_register("backend", registry.backends, "ops", "ops()")

    def decomposition_register(plugin: str) -> Callable:
        def register(domain: str, op_type: str, fn: Callable) -> None:
            key = ("" if domain == "ai.onnx" else domain, op_type)
            if key in registry.decompositions:
                raise PluginError(f"a decomposition of {domain}::{op_type} is already registered by "
                                  f"{registry.decompositions[key].plugin!r}")
            registry.decompositions[key] = Registered(f"{domain}::{op_type}", fn, plugin)
        return register

    # Built-ins were registered first; pluggy returns impls oldest-first here.
    _call_each(pm, "graphopt_register_passes", pass_register, registry)
    _call_each(pm, "graphopt_register_backends", backend_register, registry)
    _call_each(pm, "graphopt_register_decompositions", decomposition_register, registry)
    return registry


_REGISTRY: Registry | None = None


def get_registry(*, reload: bool = False) -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None or reload:
        _REGISTRY = build_registry()
    return _REGISTRY
