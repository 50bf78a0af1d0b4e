"""What ``layerscope plugins`` shows: each plugin's package, and each contribution's parameters.

``layerscope plugins`` lists every plugin with the distribution that installed it (the name
you ``pip install`` or uninstall; built-ins report ``layerscope``), its version and module,
what it contributes and why it failed to load, if it did. ``layerscope plugins NAME``
describes one estimator, data source, adapter or reporter (or every contribution of the
plugin NAME): its parameters with types, defaults and descriptions from its pydantic model,
and for an estimator its default selector, whether it needs labels, the passes over the data
it makes with default parameters and whether the method is a reconstruction; with a minimal
spec snippet that runs it. Both print JSON, or readable tables on a terminal.
"""

from __future__ import annotations

import sys
import types
import typing
from typing import Any

from pydantic import BaseModel

from layerscope.util.errors import UserError, did_you_mean

from .loader import CONTRIBUTION_HOOKS, PluginHost

KINDS = {"estimators": "estimator", "data_sources": "data source", "adapters": "adapter", "reporters": "reporter"}


def type_name(annotation: Any) -> str:
    """A readable type: ``binary | histogram | pattern`` for a Literal, ``float | None`` for a union."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:  # PositiveInt and the like: the type, its constraints in the description
        return type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def parameters(model: type[BaseModel] | None) -> list[dict[str, Any]]:
    """Name, type, default (or ``required``) and description of every field of a parameter model."""
    described = []
    for name, field in model.model_fields.items() if model is not None else ():
        entry: dict[str, Any] = {"name": name, "type": type_name(field.annotation)}
        if field.is_required():
            entry["required"] = True
        else:
            entry["default"] = field.get_default(call_default_factory=True)
        if field.description:
            entry["description"] = field.description
        described.append(entry)
    return described


def _summary(item: Any) -> str:
    """The first line of the contribution's docstring, or of its module's."""
    doc = (item.__doc__ or getattr(sys.modules.get(item.__module__), "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def _placeholder(parameter: dict) -> str:
    return f"<{parameter['type']}>"


def _snippet(kind: str, name: str, params: list[dict]) -> str:
    required = [p for p in params if p.get("required")]
    if kind == "estimator":
        lines = ["analyses:", f"  - id: {name}", f"    estimator: {name}"]
        if required:
            lines.append("    params: {" + ", ".join(f"{p['name']}: {_placeholder(p)}" for p in required) + "}")
    elif kind == "data source":
        lines = ["data:", f"  source: {name}"] + [f"  {p['name']}: {_placeholder(p)}" for p in required]
    elif kind == "reporter":
        lines = ["outputs:", f"  formats: [json, {name}]"]
    else:
        lines = ["model:", "  source: <a model this adapter claims>"]
    return "\n".join(lines) + "\n"


def describe_contribution(host: PluginHost, kind_registry: str, name: str) -> dict[str, Any]:
    """Everything a user needs to use contribution *name* of registry *kind_registry*."""
    registry = getattr(host, kind_registry)
    item, plugin = registry.get(name), registry.origin[name]
    kind = KINDS[kind_registry]
    params = parameters(getattr(item, "Params", None))
    described: dict[str, Any] = {
        "kind": kind,
        "name": name,
        "plugin": plugin,
        **host.packages.get(plugin, {}),
        "summary": _summary(item),
        "parameters": params,
    }
    if kind == "estimator":
        described.update(
            default_selector=item.default_selector,
            needs_labels=item.tags.needs_labels,
            passes=_default_passes(item),
            per_batch=item.tags.per_batch,
            reads_plan=hasattr(item, "input_plan"),
            reconstructed=item.tags.reconstructed,
        )
    described["spec"] = _snippet(kind, name, params)
    return described


def _default_passes(estimator) -> int | None:
    """Passes over the data with default parameters (None when the parameters have required fields)."""
    try:
        return estimator.passes_for(estimator.Params())
    except Exception:
        return None


def describe_name(host: PluginHost, name: str) -> list[dict[str, Any]]:
    """The contributions named *name* (in any registry), or every contribution of the plugin *name*;
    a user error with a did-you-mean otherwise."""
    found = [describe_contribution(host, registry, name) for registry in KINDS if name in getattr(host, registry)]
    if not found and host.pm.has_plugin(name):
        found = [
            describe_contribution(host, registry, item)
            for registry in KINDS
            for item in getattr(host, registry).by_plugin(name)
        ]
    if found:
        return found
    known = {item for registry in KINDS for item in getattr(host, registry).names()}
    known |= {plugin for plugin, _ in host.pm.list_name_plugin()}
    raise UserError(
        f"no estimator, data source, adapter, reporter or plugin is named '{name}'."
        f"{did_you_mean(name, known)} `layerscope plugins` lists them all"
    )


def print_plugins_table(described: list[dict[str, Any]]) -> None:
    """``layerscope plugins`` as a table: plugin, package and version, module, contributions."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="layerscope plugins")
    for column in ("plugin", "package", "version", "module", "contributes"):
        table.add_column(column)
    for entry in described:
        contributes = "; ".join(
            f"{KINDS[key]}s: {', '.join(entry[key])}" for key in CONTRIBUTION_HOOKS.values() if entry.get(key)
        )
        if "error" in entry:
            contributes = f"[red]not loaded: {escape(entry['error'])}[/red]"
        cells = (
            entry["name"],
            entry.get("distribution") or "-",
            entry.get("version") or "-",
            entry.get("module") or "-",
        )
        table.add_row(
            *(escape(str(cell)) for cell in cells), contributes or "hooks: " + ", ".join(entry.get("hooks", []))
        )
    Console().print(table)


def print_contribution(described: dict[str, Any]) -> None:
    """``layerscope plugins NAME`` for a terminal: a header, the parameter table, the spec snippet."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    package = f"{described.get('distribution') or 'from Python'} {described.get('version') or ''}".strip()
    console.print(
        f"[bold]{described['kind']} {described['name']}[/bold] — plugin {described['plugin']} (package {package})"
    )
    if described["summary"]:
        console.print(escape(described["summary"]))
    if described["kind"] == "estimator":
        console.print(
            escape(
                f"default selector: {described['default_selector']}; needs labels: "
                f"{'yes' if described['needs_labels'] else 'no'}; passes over the data (defaults): "
                f"{described['passes']}"
            )
        )
        if described["reconstructed"]:
            console.print(f"[yellow]reconstructed:[/yellow] {escape(described['reconstructed'])}")
    if described["parameters"]:
        table = Table()
        for column in ("parameter", "type", "default", "description"):
            table.add_column(column)
        for p in described["parameters"]:
            cells = (
                p["name"],
                p["type"],
                "required" if p.get("required") else repr(p["default"]),
                p.get("description", ""),
            )
            table.add_row(*(escape(str(cell)) for cell in cells))
        console.print(table)
    console.print("spec:")
    console.print(described["spec"], markup=False, highlight=False)
