"""What ``results.json`` must hold to be read back (:meth:`~layerscope.results.contract.Results.load`).

A results file is data that a person or another tool may have edited, and ``layerscope report`` and
``compare`` write files named after what it holds. So it is read only when it is a regular file of at
most :data:`MAX_RESULTS_BYTES` (a FIFO never blocks, a huge file is refused before it is read), parsed
as strict JSON (no ``NaN`` or ``Infinity``, every number finite, nesting bounded) and checked against
the contract below before any reporter sees it: an analysis id is a name, never a path; an artifact is
a relative path inside the run folder; records hold finite numbers and the keys reporters read, with
the types they expect. Any departure is a user error naming the file and the key.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictInt,
    StrictStr,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from layerscope.util.errors import UserError
from layerscope.util.files import regular_file
from layerscope.util.names import ANALYSIS_ID, NAME_LENGTH, check_name

MAX_RESULTS_BYTES = 256 * 2**20  # far above a real run's results (records are a few hundred bytes each)
MAX_DEPTH = 64  # objects and lists nested at most this deep (a run's results.json nests fewer than ten)
MAX_NAME = 1000  # characters of a name in a record or model entry (a layer path is some tens)
MAX_TEXT = 100_000  # characters of any other string (a warning, a parameter value)
MAX_MAGNITUDE = 1e200  # no measurement layerscope records is larger; figures cannot lay out 1e308

AnalysisId = Annotated[
    str,
    StringConstraints(strict=True, max_length=NAME_LENGTH),
    AfterValidator(lambda v: check_name(v, ANALYSIS_ID, "an analysis id")),
]
Name = Annotated[str, StringConstraints(strict=True, max_length=MAX_NAME)]


def _finite_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or not abs(value) <= MAX_MAGNITUDE:
        raise ValueError(f"must be a finite number of magnitude at most {MAX_MAGNITUDE:g}")
    return value


Number = Annotated[Any, AfterValidator(_finite_number)]
Scalar = Name | StrictBool | Number | None
_EXTRA: TypeAdapter[Any] = TypeAdapter(Scalar | list[Scalar])


def _inside_the_run_folder(path: str) -> str:
    parts = PurePosixPath(path).parts
    if not parts or PurePosixPath(path).is_absolute() or ".." in parts or "\\" in path:
        raise ValueError(f"'{path}' is not a relative path inside the run folder")
    return path


class _Entry(BaseModel):
    """An object of the file: the keys layerscope reads are typed; other keys are kept as they are."""

    model_config = ConfigDict(extra="allow")


class RecordEntry(_Entry):
    """One record: the contract's keys, and the extra keys reporters compute with, typed."""

    analysis: AnalysisId
    estimator: Name
    model: Name
    layer: Name
    tensor: Name
    metric: Name
    value: Number
    unit: Name = ""
    network: Name | None = None
    step: StrictInt | None = None
    samples: StrictInt | None = None
    position: StrictInt | list[StrictInt] | None = None
    grid: list[StrictInt] | None = None

    @model_validator(mode="after")
    def _extra_keys_are_values(self) -> RecordEntry:
        for key, value in (self.__pydantic_extra__ or {}).items():
            try:
                _EXTRA.validate_python(value, strict=True)
            except ValidationError:
                raise ValueError(
                    f"'{key}' must be a name (at most {MAX_NAME} characters), a finite number, a boolean or a list"
                ) from None
        return self


class AnalysisEntry(_Entry):
    id: AnalysisId
    estimator: Name
    params: dict[str, Any] = {}


class TensorEntry(_Entry):
    name: Name
    layer: Name | None = None
    op_type: Name | None = None
    shape: list[StrictInt | StrictStr | None] | None = None


class ModelEntry(_Entry):
    label: Name
    tensors: list[TensorEntry] = []


class OutputsEntry(_Entry):
    formats: list[StrictStr] = []


class SpecEntry(_Entry):
    name: Name | None = None
    outputs: OutputsEntry | None = None


class ResultsFile(BaseModel):
    """The contract of ``results.json`` as layerscope reads it back; unknown top-level keys are ignored."""

    layerscope: StrictStr
    spec: SpecEntry
    runtime: dict[str, Any]
    models: list[ModelEntry]
    records: list[RecordEntry]
    warnings: list[StrictStr] = []
    artifacts: list[Annotated[StrictStr, AfterValidator(_inside_the_run_folder)]] = []
    analyses: list[AnalysisEntry] = []
    failures: list[dict[str, Any]] = []

    @model_validator(mode="after")
    def _records_name_their_analysis(self) -> ResultsFile:
        ids = [a.id for a in self.analyses]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"analyses: the id '{repeated[0]}' is given to more than one analysis")
        if self.analyses:
            unknown = sorted({r.analysis for r in self.records} - set(ids))
            if unknown:
                raise ValueError(f"records: the analysis '{unknown[0]}' is not among the analyses")
        return self


def _not_a_number(constant: str) -> float:
    raise ValueError(f"{constant} is not a number JSON allows")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is too large for a number")
    return value


def _beyond_limits(data: Any) -> str | None:
    """What makes *data* unfit to be written again, if anything: nesting deeper than :data:`MAX_DEPTH`,
    a string longer than :data:`MAX_TEXT`, or text that is not Unicode (a lone surrogate such as
    ``"\ud800"`` parses but cannot be written as UTF-8)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"nested more than {MAX_DEPTH} levels deep"
        if isinstance(value, dict):
            stack += [(key, depth) for key in value] + [(item, depth + 1) for item in value.values()]
        elif isinstance(value, list):
            stack += [(item, depth + 1) for item in value]
        elif isinstance(value, str):
            if len(value) > MAX_TEXT:
                return f"a text of {len(value):,} characters (at most {MAX_TEXT:,})"
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return f"a text that is not Unicode ({value[:40]!r})"
    return None


def _names_a_type(part: str | int) -> bool:
    """True for the parts of a pydantic error location that name a member of a union, not a key."""
    return isinstance(part, str) and ("[" in part or part in ("int", "float", "str", "bool", "none"))


def read_results_file(path: Path) -> dict[str, Any]:
    """The contents of the results file *path*, checked as the module docstring says (user errors naming
    the file and the first key at fault)."""
    path = regular_file(path, "results.json")
    size = path.stat().st_size
    if size > MAX_RESULTS_BYTES:
        raise UserError(
            f"{path}: {size / 2**20:.0f} MiB is larger than a results file can be (at most "
            f"{MAX_RESULTS_BYTES // 2**20} MiB); is it the results.json of a layerscope run?"
        )
    try:
        data = json.loads(path.read_bytes(), parse_constant=_not_a_number, parse_float=_finite)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: cannot read results: {error}") from None
    except (ValueError, RecursionError) as error:  # NaN, a huge number or integer, nesting too deep
        reason = str(error) if isinstance(error, ValueError) else "nested too deeply"
        raise UserError(f"{path}: not a results file: {reason}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a results file: the top level must be an object")
    problem = _beyond_limits(data)
    if problem:
        raise UserError(f"{path}: not a results file: {problem}")
    try:
        ResultsFile.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"] if not _names_a_type(part)) or "(top level)"
        message = (
            "required key is missing" if first["type"] == "missing" else first["msg"].removeprefix("Value error, ")
        )
        more = f" (and {error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
        raise UserError(f"{path}: {key}: {message}{more}") from None
    return data
