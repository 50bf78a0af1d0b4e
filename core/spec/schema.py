"""The analysis spec: typed models for every section and loading with located errors.

:func:`read_document` parses YAML safely (keeping positions) and :func:`check_structure` checks
the structure of every section (unknown keys, types, ranges); :func:`layerscope.engine.plan.build_plan`
adds what only the loaded plugins know (estimators, data sources, reporters, adapters, their
parameters) in the same pass. Every problem is reported at once as
``file:line:col: key.path: message``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from layerscope.graph.selectors import SelectionError, SelectorSpec, parse_selection
from layerscope.util.errors import SpecError, UserError, did_you_mean
from layerscope.util.files import regular_file
from layerscope.util.names import ANALYSIS_ID, MODEL_LABEL, NAME_LENGTH, check_name
from layerscope.util.params import Count
from layerscope.util.units import parse_bytes

from .yaml_locations import LocatedDocument, load_yaml

MAX_SPEC_BYTES = 2**20  # a spec is a page of YAML; a larger file is not one


class StrictModel(BaseModel):
    """A section that rejects unknown keys."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class ModelSection(BaseModel):
    """Model section: ``source`` names the model; every other key belongs to the adapter that claims
    it, which validates the whole section with its own ``Params`` (a :class:`layerscope.model.adapter.ModelParams`)."""

    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)
    source: Any = Field(None, description="a .onnx / .pt2 / .keras file, 'demo:NAME', or (from Python) a model object")

    def get(self, key: str, default: Any = None) -> Any:
        """The value of *key* in the section (``source`` or an adapter's key)."""
        return self.source if key == "source" else (self.model_extra or {}).get(key, default)


class NamedModel(ModelSection):
    """An entry of ``models:`` (several models analysed with the same data and estimators): a label
    and the keys of a model section."""

    label: Annotated[str, AfterValidator(lambda v: check_name(v, MODEL_LABEL, "a model label"))] = Field(
        min_length=1, max_length=NAME_LENGTH, description="names the model in records (network) and figures"
    )


class DataSection(BaseModel):
    """Data section; keys beyond these are the data source's own parameters."""

    model_config = ConfigDict(extra="allow")
    source: str = "digits"
    batch_size: Count = 100
    limit: Count | None = None
    shuffle: StrictBool = True
    constants: dict[str, Any] = Field(
        default_factory=dict,
        description="model inputs fed the same value in every batch, without a sample axis (e.g. sr: 16000)",
    )
    token_mask: str | None = Field(
        None,
        description="the model input marking real tokens (1) against padding (0); "
        "default: an input named attention_mask",
    )

    def source_params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class AnalysisSection(StrictModel):
    id: Annotated[str, AfterValidator(lambda v: check_name(v, ANALYSIS_ID, "an analysis id"))] = Field(
        min_length=1, max_length=NAME_LENGTH
    )
    estimator: str
    on: SelectorSpec | list[SelectorSpec] | Literal["all"] | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("on", mode="before")
    @classmethod
    def _one_problem_per_selection(cls, value: Any) -> Any:
        """The selection read as :func:`parse_selection` reads it: its first problem as one error at the
        key it concerns (pydantic would report each member of the union: a list, 'all', a selector)."""
        if value is None:
            return None
        try:
            return parse_selection(value)
        except SelectionError as error:
            raise PydanticCustomError(
                "selection", "{problem}", {"problem": error.problem, "path": error.path}
            ) from None


class RuntimeSection(StrictModel):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    engine: Literal["local", "ray"] = "local"
    address: str | None = Field(
        None,
        min_length=1,
        description="engine ray: the cluster to join ('auto', 'ray://head:10001'); a local cluster when omitted",
    )
    memory_budget: int = Field(2 * 2**30, description="bytes of fetched tensors held at once")
    seed: StrictInt = 0
    workers: StrictInt = Field(
        1,
        ge=1,
        le=1024,
        description="processes (local) or Ray actors running shard tasks "
        "side by side; engine ray: the cluster's CPUs when omitted",
    )
    shards: Count | Literal["auto"] = Field(
        "auto",
        description="data shards per checkpoint in parallel runs; auto: enough to give every worker a task, "
        "and for one checkpoint only when its forward passes outlast starting the workers",
    )
    retries: StrictInt = Field(
        3,
        ge=0,
        le=100,
        description="parallel runs: times a shard task is run again after its worker was lost (a killed process, "
        "a lost Ray node)",
    )
    ship: StrictBool = Field(
        False,
        description="engine ray: send the files the spec names (model, checkpoints, data, python modules) to the "
        "workers through Ray's object store, for nodes that do not share this machine's files",
    )

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _parse_budget(cls, value: Any) -> int:
        return parse_bytes(value)

    @field_validator("shards", mode="before")
    @classmethod
    def _shards(cls, value: Any) -> Any:
        if value == "auto" or (type(value) is int and value > 0):
            return value
        raise ValueError(f"give a whole number of shards above 0, or auto, not {_scalar_shown(value)}")

    @property
    def parallel(self) -> bool:
        """True when shard tasks run outside this process (worker processes or Ray)."""
        return self.engine == "ray" or self.workers > 1

    @field_validator("address", "ship")
    @classmethod
    def _only_with_ray(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, False) and info.data.get("engine", "local") != "ray":
            raise ValueError(f"{info.field_name} is only used with engine: ray")
        return value


class OutputsSection(StrictModel):
    dir: str | None = Field(
        None,
        description="the output folder, relative to the current folder; default: results/<name>-<run id>, a new "
        "folder for every run",
    )
    formats: list[str] = Field(
        default_factory=lambda: ["json", "csv", "plots", "html"],
        description="json: results.json, always written; every other entry names a reporter "
        "(csv: records.csv, parquet: records.parquet, plots: plots/<analysis>.png and .svg, html: report.html; "
        "tensorboard, mlflow, wandb: experiment trackers)",
    )


class Spec(StrictModel):
    version: Literal[1] = 1
    name: str = "analysis"
    model: ModelSection | None = None
    models: list[NamedModel] | None = Field(
        None,
        min_length=1,
        description="several models, each with a label, analysed with the same data and estimators (instead of model)",
    )
    data: DataSection = Field(default_factory=DataSection)
    analyses: list[AnalysisSection] = Field(min_length=1)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    outputs: OutputsSection = Field(default_factory=OutputsSection)
    # Where relative paths in the spec are resolved (the spec file's folder); not a YAML key.
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @field_validator("analyses")
    @classmethod
    def _unique_ids(cls, analyses: list[AnalysisSection]) -> list[AnalysisSection]:
        seen: set[str] = set()
        for analysis in analyses:
            if analysis.id in seen:
                raise ValueError(f"analysis id '{analysis.id}' is used twice")
            seen.add(analysis.id)
        return analyses

    @field_validator("models")
    @classmethod
    def _unique_labels(cls, models: list[NamedModel] | None) -> list[NamedModel] | None:
        labels = [entry.label for entry in models or []]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"label '{repeated[0]}' is used twice")
        return models

    def resolve_path(self, value: str | os.PathLike) -> Path:
        """Resolve a path written in the spec relative to the spec's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else self._base_dir / path

    @property
    def base_dir(self) -> Path:
        return self._base_dir


class TraceSpec(Spec):
    """A spec as ``layerscope trace`` reads it: a model, data and runtime; analyses are not needed."""

    analyses: list[AnalysisSection] = Field(default_factory=list)


def _submodel_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the keys at *loc* (for did-you-mean hints)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _model_in_annotation(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _model_in_annotation(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in_annotation(arg)
        if found is not None:
            return found
    return None


_ABSENT = object()


def _child(node: Any, part: Any) -> Any:
    """The value under key or index *part* of a document's *node*, or ``_ABSENT``."""
    if isinstance(node, dict):
        return node.get(part, _ABSENT)
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return node[part]
    return _ABSENT


#: The tags pydantic puts in an error's location for a union's members of these types.
_TYPE_TAGS = frozenset({"int", "float", "str", "bool", "bytes", "none", "list", "dict", "tuple", "set"})


def _is_tag(part: Any) -> bool:
    """Whether a part of a pydantic error location names a union's member or a validator (``float``,
    ``literal['auto']``, ``constrained-int``, ``function-after[…]``, a model class) rather than a key."""
    return isinstance(part, str) and (not part.isidentifier() or part in _TYPE_TAGS or part[:1].isupper())


def _written_path(data: Any, prefix: tuple, loc: tuple) -> tuple:
    """*prefix* + pydantic's error location *loc* without the tags it adds for a union's members and for
    validators: the parts that are not keys of the document *data* and read as tags (:func:`_is_tag`)."""
    node = data
    for part in prefix:
        node = _child(node, part)
    path = list(prefix)
    for part in loc:
        child = _child(node, part)
        if child is _ABSENT and _is_tag(part):
            continue
        path.append(part)
        node = child
    return tuple(path)


def _one_message(messages: list[str]) -> str:
    """The errors of a union's members at one key as one message: ``Input should be a valid number or
    'alignment'``."""
    unique = list(dict.fromkeys(messages))
    lead = "Input should be "
    if len(unique) > 1 and all(message.startswith(lead) for message in unique):
        return lead + " or ".join(re.sub(r", (unable|got) .*", "", m.removeprefix(lead)) for m in unique)
    return "; or ".join(unique)


def _scalar_shown(value: Any) -> str:
    """*value* as YAML writes it (``true``, ``"2"``), for messages about a value of the wrong type."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return json.dumps(value)
    return "a list" if isinstance(value, list) else type(value).__name__


def format_validation_errors(
    error: ValidationError, doc: LocatedDocument, prefix: tuple = (), model: type[BaseModel] | None = None
) -> list[str]:
    """Turn pydantic errors into ``file:line:col: key.path: message`` lines, one per key (the errors of a
    union's members at a key are joined)."""
    by_key: dict[tuple, list[str]] = {}
    for item in error.errors():
        loc = _written_path(doc.data, prefix, tuple(item["loc"]))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden" and model is not None:
            owner = _submodel_at(model, tuple(item["loc"])[:-1])
            message = f"unknown key '{loc[-1]}'." + (did_you_mean(loc[-1], owner.model_fields) if owner else "")
        elif item["type"] == "selection":  # a problem inside `on:`, at the selector key it concerns
            loc += item["ctx"]["path"]
        elif item["type"] == "missing":
            message = "required key is missing"
        elif item["type"] in ("model_type", "model_attributes_type", "dict_type"):  # not the class's name
            message = f"Input should be a mapping of keys to values, not {_scalar_shown(item['input'])}"
        elif item["type"] in ("int_type", "bool_type", "float_type", "string_type", "literal_error"):
            message = f"{message}, not {_scalar_shown(item['input'])}"
        by_key.setdefault(loc, []).append(message)
    return [
        f"{doc.where(loc)}: {'.'.join(str(p) for p in loc) or '(top level)'}: {_one_message(messages)}"
        for loc, messages in by_key.items()
    ]


def check_structure(doc: LocatedDocument, base_dir: Path, schema: type[Spec] = Spec) -> tuple[Spec | None, list[str]]:
    """The spec of a parsed document as *schema* reads it, or None with one located error per structural
    problem (unknown keys, types, ranges); a document that is not a mapping is a :class:`SpecError` at once."""
    if not isinstance(doc.data, dict):
        raise SpecError([f"{doc.where(())}: the spec must be a mapping with model, data and analyses"])
    errors = []
    if "model" in doc.data and "models" in doc.data:
        errors.append(f"{doc.where(('models',))}: models: give model (one model) or models (labelled models), not both")
    elif "model" not in doc.data and "models" not in doc.data:
        errors.append(f"{doc.where(('model',))}: model: required key is missing (or models: a list of labelled models)")
    try:
        spec = schema.model_validate(doc.data)
    except ValidationError as error:
        return None, errors + format_validation_errors(error, doc, model=schema)
    spec._base_dir = base_dir
    return (None, errors) if errors else (spec, [])


PYTHON_DATA = "python"  # the data source that reads objects handed over from Python


def with_python_data(doc: LocatedDocument, data: Any = None) -> LocatedDocument:
    """*doc* reading *data* (``data=`` of ``layerscope.run``) through the ``python`` data source, which
    takes the place of the spec's data source and its parameters (the general keys of the data section,
    batch_size, limit, shuffle, constants and token_mask, still apply). A dict spec may also give the
    object as ``data.source``. The caller's dict is not changed."""
    section = doc.data.get("data") if isinstance(doc.data, dict) else None
    section = section if isinstance(section, dict) else {}
    source = section.get("source")
    if data is None and (source is None or isinstance(source, str)):
        return doc
    if data is None:  # an object as data.source in a dict spec: its other keys are for it
        kept, data = {k: v for k, v in section.items() if k != "source"}, source
    else:
        kept = {k: v for k, v in section.items() if k in DataSection.model_fields and k != "source"}
    return LocatedDocument(
        {**doc.data, "data": {**kept, "source": PYTHON_DATA, "object": data}}, doc.filename, doc.positions, doc.located
    )


def for_trace(doc: LocatedDocument) -> LocatedDocument:
    """*doc* as ``layerscope trace`` reads it (with :class:`TraceSpec`): its analyses and outputs left out,
    its samples in data order unless it sets ``data.shuffle``. The caller's dict is not changed."""
    if not isinstance(doc.data, dict):
        return doc  # the structural check reports it
    kept = {key: value for key, value in doc.data.items() if key not in ("analyses", "outputs")}
    section = kept.get("data", {})
    if isinstance(section, dict) and "shuffle" not in section:
        kept["data"] = {**section, "shuffle": False}
    return LocatedDocument(kept, doc.filename, doc.positions, doc.located)


def read_document(source: str | os.PathLike | dict) -> tuple[LocatedDocument, Path]:
    """Parse a spec file (or take a dict from Python); return it with the folder paths are relative to."""
    if isinstance(source, dict):
        return LocatedDocument(data=source, filename="<spec>", located=False), Path.cwd()
    path = Path(source)
    if not path.exists():
        raise SpecError([f"{path}: spec file not found"])
    try:
        size = regular_file(path, "spec").stat().st_size
        if size > MAX_SPEC_BYTES:
            raise UserError(f"the file has {size} bytes; a spec has at most {MAX_SPEC_BYTES // 2**20} MiB")
        text = path.read_text(encoding="utf-8")
    except UserError as error:
        raise SpecError([f"{path}: {error}"]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise SpecError([f"{path}: cannot read the spec: {error}"]) from None
    return load_yaml(text, str(path)), path.resolve().parent
