"""Resolve a spec against the loaded plugins: every name checked, every error reported at once.

Plugin names and parameters are checked on the raw document, so that a spec with both a
structural error and, say, a misspelt estimator reports both in one message.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ValidationError

from layerscope.data.labels import ClassLabels
from layerscope.data.source import DataSource, Samples, check_allocation, nbytes, sample_order, scan_labels, take
from layerscope.host.loader import PluginHost
from layerscope.model.adapter import Adapter, Checkpoint, ModelParams, find_adapter
from layerscope.results.contract import RESULTS_FORMAT, new_run_id
from layerscope.spec.schema import (
    AnalysisSection,
    DataSection,
    ModelSection,
    OutputsSection,
    Spec,
    check_structure,
    format_validation_errors,
)
from layerscope.spec.yaml_locations import LocatedDocument
from layerscope.util.errors import SpecError, UserError
from layerscope.util.names import run_name

from .estimator import Estimator

if TYPE_CHECKING:
    from layerscope.results.reporter import Reporter


@dataclass
class PlannedAnalysis:
    index: int
    section: AnalysisSection
    estimator_class: type[Estimator]
    params: BaseModel


@dataclass
class Network:
    """A model of the spec: its label (None for the spec's single ``model``), the adapter that claims
    it, and its section as the adapter validated it (the adapter's ``Params``)."""

    label: str | None
    adapter: Adapter
    params: ModelParams


@dataclass
class RunPlan:
    spec: Spec
    doc: LocatedDocument
    host: PluginHost
    data: DataSource
    #: The spec's model, or its ``models`` in order.
    networks: list[Network]
    analyses: list[PlannedAnalysis]
    reporters: list[Reporter]
    #: The indices of the samples the run reads, in order (shuffled with the seed, cut at ``limit``).
    order: np.ndarray
    #: How labels become class codes (:mod:`layerscope.data.labels`); None when the data has no labels.
    classes: ClassLabels | None
    #: The run's identifier (``runtime.run_id``; names the output folder of a spec without ``outputs.dir``).
    run_id: str = field(default_factory=new_run_id)

    def where(self, *path: Any) -> str:
        return f"{self.doc.where(tuple(path))}: {'.'.join(str(p) for p in path)}"

    def example(self) -> Samples:
        """The first two samples of the data source (what adapters trace a model with); also checks
        that a batch of such samples can be allocated at all."""
        example = self.data.read(np.arange(min(2, len(self.data))))[0]
        check_allocation(
            nbytes(take(example, slice(0, 1))) * self.spec.data.batch_size,
            f"{self.where('data', 'batch_size')}: a batch of {self.spec.data.batch_size} samples",
        )
        return example

    def checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint of every model, in the spec's order. In a multi-model spec each is tagged
        with its model's label (``network``) and labelled ``<label>`` (a model of one checkpoint) or
        ``<label>/<checkpoint>``."""
        listed = []
        for index, network in enumerate(self.networks):
            if network.label is None:
                listed += network.adapter.checkpoints(network.params, self.spec)
                continue
            try:
                checkpoints = network.adapter.checkpoints(network.params, self.spec)
            except UserError as error:  # "model.source: …" of the index-th model
                raise UserError(f"{self.where('models', index)}{str(error).removeprefix('model')}") from None
            listed += [
                Checkpoint(
                    network.label if len(checkpoints) == 1 else f"{network.label}/{c.label}",
                    c.ref,
                    c.step,
                    network.label,
                )
                for c in checkpoints
            ]
        return listed

    def adapter_of(self, checkpoint: Checkpoint) -> Adapter:
        """The adapter that loads *checkpoint* (its model's)."""
        return next(n.adapter for n in self.networks if n.label == checkpoint.network)

    @property
    def default_folder(self) -> Path:
        """The spec's ``outputs.dir``, else a folder of this run's own, ``results/<name>-<run id>`` (the name
        without path characters): runs of specs without ``outputs.dir`` never share a folder."""
        if self.spec.outputs.dir is not None:
            return Path(self.spec.outputs.dir)
        return Path("results") / run_name(self.spec.name, self.run_id)

    @property
    def passes(self) -> int:
        """Passes over the data the run makes: the most that any analysis needs."""
        return max(p.estimator_class.passes_for(p.params) for p in self.analyses)


@dataclass
class PluginChoices:
    """What the raw document names, resolved against the registries."""

    data_source: type[DataSource] | None = None
    data_params: BaseModel | None = None
    #: (label, adapter, validated section) of each model whose adapter and section were found
    networks: list[tuple[str | None, Adapter, ModelParams]] = field(default_factory=list)
    estimators: dict[int, tuple[type[Estimator], BaseModel]] = field(default_factory=dict)
    reporters: list[Reporter] = field(default_factory=list)


def _lookup(registry, name: Any, doc: LocatedDocument, path: tuple, errors: list[str]):
    if not isinstance(name, str):
        return None  # the structural check reports the wrong type
    try:
        return registry.get(name)
    except UserError as error:
        errors.append(f"{doc.where(path)}: {'.'.join(map(str, path))}: {error}")
        return None


def _params(
    model: type[BaseModel],
    values: Any,
    doc: LocatedDocument,
    path: tuple,
    errors: list[str],
    context: dict | None = None,
):
    try:
        return model.model_validate(values if values is not None else {}, context=context)
    except ValidationError as error:
        errors.extend(format_validation_errors(error, doc, prefix=path, model=model))
        return None


def check_plugins(doc: LocatedDocument, host: PluginHost, errors: list[str]) -> PluginChoices:
    """Check every plugin name and parameter block in the raw document (the adapter that claims the
    model and its keys, the data source, the estimators, the reporters), appending located errors."""
    raw = doc.data if isinstance(doc.data, dict) else {}
    choices = PluginChoices(estimators={}, reporters=[], networks=[])
    if isinstance(raw.get("model"), dict):  # other values: the structural check reports them
        if chosen := _model_choice(raw["model"], doc, host, errors, ("model",)):
            choices.networks.append((None, *chosen))
    models = raw.get("models")
    for index, entry in enumerate(models if isinstance(models, list) else []):
        if isinstance(entry, dict):
            section = {k: v for k, v in entry.items() if k != "label"}
            if chosen := _model_choice(section, doc, host, errors, ("models", index)):
                choices.networks.append((entry.get("label"), *chosen))
    data = raw.get("data")
    data = data if isinstance(data, dict) else {}
    source = data.get("source", DataSection().source)
    choices.data_source = _lookup(host.data_sources, source, doc, ("data", "source"), errors)
    if choices.data_source is not None:
        own = {k: v for k, v in data.items() if k not in DataSection.model_fields}
        choices.data_params = _params(choices.data_source.Params, own, doc, ("data",), errors)
    analyses = raw.get("analyses")
    analyses = analyses if isinstance(analyses, list) else []
    context = {  # what an estimator's parameter validators may compare against (the data's batches)
        "data_batch_size": data.get("batch_size", DataSection().batch_size),
        "data_limit": data.get("limit"),
    }
    for index, analysis in enumerate(analyses):
        if not isinstance(analysis, dict):
            continue
        estimator = _lookup(host.estimators, analysis.get("estimator"), doc, ("analyses", index, "estimator"), errors)
        if estimator is not None:
            params = _params(
                estimator.Params, analysis.get("params"), doc, ("analyses", index, "params"), errors, context
            )
            if params is not None:
                choices.estimators[index] = (estimator, params)
    outputs = raw.get("outputs")
    outputs = outputs if isinstance(outputs, dict) else {}
    if "formats" in outputs:
        formats = outputs["formats"] if isinstance(outputs["formats"], list) else []  # the structural check reports it
    else:  # the defaults, less a reporter no loaded plugin provides
        formats = [f for f in OutputsSection().formats if f == RESULTS_FORMAT or f in host.reporters]
    for index, fmt in enumerate(formats):
        if isinstance(fmt, str) and fmt != RESULTS_FORMAT and fmt not in formats[:index]:
            reporter = _lookup(host.reporters, fmt, doc, ("outputs", "formats", index), errors)
            if reporter is not None and (missing := reporter.missing()):
                errors.append(f"{doc.where(('outputs', 'formats', index))}: outputs.formats.{index}: {missing}")
            elif reporter is not None:
                choices.reporters.append(reporter(host))
    return choices


def _position_key(message: str) -> tuple:
    match = re.match(r"^.*?:(\d+):(\d+):", message)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def build_plan(doc: LocatedDocument, base_dir: Path, host: PluginHost, schema: type[Spec] = Spec) -> RunPlan:
    """Check a parsed spec in one pass, structure (:func:`layerscope.spec.schema.check_structure`, as *schema*
    reads it) and what the plugins know; raise one :class:`SpecError` with every problem, or return the plan."""
    spec, errors = check_structure(doc, base_dir, schema)
    choices = check_plugins(doc, host, errors)
    if spec is not None and spec.runtime.engine == "ray" and importlib.util.find_spec("ray") is None:
        errors.append(
            f"{doc.where(('runtime', 'engine'))}: runtime.engine: the ray engine needs Ray: "
            'pip install "layerscope[ray]"'
        )
    if errors or spec is None or choices.data_source is None or choices.data_params is None:  # None: an error
        raise SpecError(sorted(dict.fromkeys(errors), key=_position_key))
    analyses = [PlannedAnalysis(i, section, *choices.estimators[i]) for i, section in enumerate(spec.analyses)]
    with doc.locating_errors():  # the data source's errors name the key they concern (data.path: …)
        data = choices.data_source(choices.data_params, spec.base_dir, spec.runtime.seed)
        samples = len(data)
    if samples == 0:
        raise UserError(f"{doc.where(('data',))}: data: the data source '{spec.data.source}' has no samples")
    for planned in analyses:
        if planned.estimator_class.tags.needs_labels and not data.has_labels:
            raise UserError(
                f"{doc.where(('analyses', planned.index, 'estimator'))}: analyses.{planned.index}.estimator: "
                f"'{planned.section.estimator}' needs labels, but the data source '{spec.data.source}' "
                "has none"
            )
    order = sample_order(samples, spec.data.limit, spec.data.shuffle, spec.runtime.seed)
    networks = [Network(label, adapter, params) for label, adapter, params in choices.networks]
    with doc.locating_errors():
        classes = scan_labels(data, order)
    return RunPlan(spec, doc, host, data, networks, analyses, choices.reporters, order, classes)


def _model_choice(
    section: dict, doc: LocatedDocument, host: PluginHost, errors: list[str], path: tuple
) -> tuple[Adapter, ModelParams] | None:
    """The adapter that claims the model *section* (raw, at *path* in the spec: ``("model",)`` or
    ``("models", i)``) and the section as it validates it (its ``Params``); None when either fails, the
    problems appended to *errors* at their place in the spec, naming the keys the adapter reads."""
    dotted = ".".join(map(str, path))
    try:
        adapter = find_adapter(ModelSection.model_validate(section), host.adapters)
    except UserError as error:
        errors.append(f"{doc.where((*path, 'source'))}: {dotted}{str(error).removeprefix('model')}")
        return None
    try:
        return adapter, adapter.Params.model_validate(section)
    except ValidationError as error:
        keys = ", ".join(adapter.Params.model_fields)
        errors.extend(
            f"{message} (the '{adapter.name}' adapter reads: {keys})" if "unknown key" in message else message
            for message in format_validation_errors(error, doc, prefix=path, model=adapter.Params)
        )
        return None
