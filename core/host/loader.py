"""The plugin host: load plugins through entry points and collect their contributions.

Built-in adapters, estimators, data sources and reporters are entry points in the
``layerscope`` group exactly like third-party ones. ``LAYERSCOPE_LOAD_PLUGINS`` (a comma
list of entry-point names; empty for none) restricts which are loaded.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from layerscope.util.errors import UserError

from . import hookspecs
from .registry import Registry

ENTRY_POINT_GROUP = "layerscope"
CONTRIBUTION_HOOKS = {
    "register_estimators": "estimators",
    "register_adapters": "adapters",
    "register_data_sources": "data_sources",
    "register_reporters": "reporters",
}


@dataclass
class PluginHost:
    """A loaded plugin manager plus the registries its plugins filled."""

    pm: pluggy.PluginManager
    estimators: Registry = field(default_factory=lambda: Registry("estimator"))
    adapters: Registry = field(default_factory=lambda: Registry("adapter"))
    data_sources: Registry = field(default_factory=lambda: Registry("data source"))
    reporters: Registry = field(default_factory=lambda: Registry("reporter"))
    #: plugin name -> {"distribution", "version", "module"}: the package that installed it
    packages: dict[str, dict[str, str | None]] = field(default_factory=dict)
    load_errors: dict[str, str] = field(default_factory=dict)
    extra_plugins: tuple = ()  # plugin objects given from Python rather than installed

    @property
    def hook(self):
        return self.pm.hook

    def origin_of(self, estimator) -> str:
        """The plugin that contributed *estimator*'s class ("?" when it is not registered)."""
        return self.estimators.origin.get(estimator.name, "?")

    def load_warnings(self) -> list[str]:
        """One line per plugin that could not be used, naming it (for results.json)."""
        return [f"plugin '{name}' was not loaded: {error}" for name, error in sorted(self.load_errors.items())]

    def describe(self) -> list[dict[str, Any]]:
        """One entry per plugin: name, the distribution that installed it (its version and module),
        hooks implemented and what it contributes; then the plugins that could not be used."""
        described = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda item: item[0]):
            package = self.packages.get(name) or {
                "distribution": None,
                "version": None,
                "module": getattr(plugin, "__name__", type(plugin).__name__),
            }
            entry: dict[str, Any] = {
                "name": name,
                **package,
                "hooks": sorted(h.name for h in self.pm.get_hookcallers(plugin) or []),
            }
            for registry_name in CONTRIBUTION_HOOKS.values():
                contributed = getattr(self, registry_name).by_plugin(name)
                if contributed:
                    entry[registry_name] = contributed
            described.append(entry)
        described += [
            {"name": name, **self.packages.get(name, {}), "error": error}
            for name, error in sorted(self.load_errors.items())
        ]
        return described


def _wanted_entry_points() -> list[metadata.EntryPoint]:
    points = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    selection = os.environ.get("LAYERSCOPE_LOAD_PLUGINS")
    if selection is None:
        return points
    wanted = {name.strip() for name in selection.split(",") if name.strip()}
    return [ep for ep in points if ep.name in wanted]


def load_plugins(extra: tuple[Any, ...] = ()) -> PluginHost:
    """Load entry-point plugins (and *extra* plugin objects) and fill the registries."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    host = PluginHost(pm)
    distributions: dict[Any, dict[str, str | None]] = {None: {"distribution": None, "version": None}}
    for entry_point in _wanted_entry_points():
        if pm.has_plugin(entry_point.name):
            continue
        dist = entry_point.dist
        # each access to name or version parses the metadata file again (None, no distribution, is in already)
        if dist is not None and dist not in distributions:
            package = dist.metadata
            distributions[dist] = {"distribution": package["Name"], "version": package["Version"]}
        host.packages[entry_point.name] = {**distributions[dist], "module": entry_point.value}
        try:
            plugin = entry_point.load()
        except Exception as error:  # a broken third-party package must not take the host down
            host.load_errors[entry_point.name] = f"{type(error).__name__}: {error}"
            print(f"layerscope: warning: plugin '{entry_point.name}' failed to load: {error}", file=sys.stderr)
            continue
        pm.register(plugin, name=entry_point.name)
    for plugin in extra:
        pm.register(plugin)
    host.extra_plugins = tuple(extra)
    _drop_misspelt(host)
    _collect(host)
    return host


def _drop_misspelt(host: PluginHost) -> None:
    """Unregister plugins that implement a hook no spec declares (pluggy's ``check_pending``,
    per plugin), naming them loudly on stderr and in ``results.json``, so the others still run."""
    for name in dir(host.pm.hook):
        caller = getattr(host.pm.hook, name)
        if name.startswith("_") or not hasattr(caller, "has_spec") or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.optionalhook:
                continue
            plugin_name = impl.plugin_name
            message = f"implements '{name}', which is not a layerscope hook (misspelt?)"
            host.load_errors[plugin_name] = message
            print(f"layerscope: warning: plugin '{plugin_name}' {message}; it is not loaded", file=sys.stderr)
            if host.pm.has_plugin(plugin_name):
                host.pm.unregister(name=plugin_name)


def _collect(host: PluginHost) -> None:
    """Call every contribution hook once per plugin, so each entry knows its plugin."""
    for hook_name, registry_name in CONTRIBUTION_HOOKS.items():
        registry = getattr(host, registry_name)
        for impl in getattr(host.pm.hook, hook_name).get_hookimpls():
            plugin_name = impl.plugin_name

            def register(item, _plugin=plugin_name, _registry=registry):
                _registry.add(getattr(item, "name", None), item, _plugin)

            try:
                impl.function(register=register)
            except UserError:
                raise
            except Exception as error:  # a broken plugin: name it and carry on without it
                host.load_errors[plugin_name] = f"{hook_name} raised {type(error).__name__}: {error}"
                print(f"layerscope: warning: plugin '{plugin_name}' failed in {hook_name}: {error}", file=sys.stderr)
