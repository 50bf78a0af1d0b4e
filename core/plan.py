"""Resolve a validated spec against the loaded plugins: every name checked, every error at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from .data import DataSource
from .errors import SpecError, UserError
from .estimator import Estimator
from .model import Adapter, find_adapter
from .plugin_host import PluginHost
from .spec import AnalysisSection, Spec, format_validation_errors
from .yaml_locations import LocatedDocument

ALWAYS_WRITTEN = "json"  # results.json is the contract; it is written whatever formats lists


@dataclass
class PlannedAnalysis:
    index: int
    section: AnalysisSection
    estimator_class: type[Estimator]
    params: BaseModel


@dataclass
class RunPlan:
    spec: Spec
    doc: LocatedDocument
    host: PluginHost
    data: DataSource
    adapter: Adapter
    analyses: list[PlannedAnalysis]
    reporters: list[Any]

    def where(self, *path: Any) -> str:
        return f"{self.doc.where(tuple(path))}: {'.'.join(str(p) for p in path)}"


def _lookup(registry, name: str, doc: LocatedDocument, path: tuple, errors: list[str]):
    try:
        return registry.get(name)
    except UserError as error:
        errors.append(f"{doc.where(path)}: {'.'.join(map(str, path))}: {error}")
        return None


def _params(model: type[BaseModel], values: dict, doc: LocatedDocument, path: tuple, errors: list[str]):
    try:
        return model.model_validate(values)
    except ValidationError as error:
        errors.extend(format_validation_errors(error, doc, prefix=path, model=model))
        return None


def build_plan(spec: Spec, doc: LocatedDocument, host: PluginHost) -> RunPlan:
    """Check estimator, data-source and reporter names and parameters; raise one :class:`SpecError`."""
    errors: list[str] = []
    source_class = _lookup(host.data_sources, spec.data.source, doc, ("data", "source"), errors)
    data_params = source_class and _params(source_class.Params, spec.data.source_params(), doc, ("data",), errors)
    analyses = []
    for index, section in enumerate(spec.analyses):
        estimator_class = _lookup(host.estimators, section.estimator, doc, ("analyses", index, "estimator"), errors)
        if estimator_class is None:
            continue
        params = _params(estimator_class.Params, section.params, doc, ("analyses", index, "params"), errors)
        if params is not None:
            analyses.append(PlannedAnalysis(index, section, estimator_class, params))
    reporters = []
    for index, fmt in enumerate(dict.fromkeys([ALWAYS_WRITTEN, *spec.outputs.formats])):
        path = ("outputs", "formats", spec.outputs.formats.index(fmt)) if fmt in spec.outputs.formats else ("outputs",)
        reporter = _lookup(host.reporters, fmt, doc, path, errors)
        if reporter is not None:
            reporters.append(reporter())
    adapter = None
    try:
        adapter = find_adapter(spec.model, host.adapters)
    except UserError as error:
        errors.append(f"{doc.where(('model', 'source'))}: {error}")
    if errors:
        raise SpecError(errors)
    data = source_class(data_params, spec.base_dir, spec.runtime.seed)
    if len(data) == 0:
        raise UserError(f"{doc.where(('data',))}: data: the data source '{spec.data.source}' has no samples")
    return RunPlan(spec, doc, host, data, adapter, analyses, reporters)
