"""Tensor selectors: which tensors of a model an analysis reads.

A selector names tensors by ONNX tensor name (``name``), by a shell-style pattern over
tensor names, layer labels and module paths (``glob``), by the user's layer name (``layer``), by
the op type that produces them (``op_type``), by their ``role`` in the graph (``input``,
``output``, ``intermediate``), as the ``activation: output`` / ``activation: input`` of an
activation function, single op or decomposed pattern, or as the ``attention: probabilities`` /
``attention: scores`` of an attention softmax (:mod:`layerscope.graph.activations`). Keys given
together must all match (AND); a list within
one key matches any of its entries (OR); a list of selectors selects the union, in
graph order. ``"all"`` selects every observable tensor.

``glob`` and ``layer`` name modules, and select what a forward hook on the module would see: the
tensors that leave its calls (:attr:`TensorInfo.output_of`). The tensors computed inside a call
and read only there (the seven steps of a decomposed GELU) are *inner*: they are selected with
``inner: true``, by a key that picks tensors by what they are (``name``, ``op_type``,
``activation``, ``attention``: the module then only bounds where), or by their own label or name
(``layer: block/add``, or a ``glob`` with a ``/``). ``inner: false`` keeps ``glob`` and ``layer`` to the
calls' outputs in every case.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError, model_validator

from layerscope.util.errors import UserError, did_you_mean

if TYPE_CHECKING:
    from .tensors import TensorInfo


class SelectorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | list[str] | None = None
    glob: str | list[str] | None = None
    layer: str | list[str] | None = None
    op_type: str | list[str] | None = None
    role: Literal["input", "output", "intermediate"] | list[Literal["input", "output", "intermediate"]] | None = None
    activation: Literal["input", "output"] | None = None
    attention: Literal["probabilities", "scores"] | None = None
    inner: StrictBool | None = None  # true or false: a string such as "yes" is refused

    @model_validator(mode="after")
    def _not_empty(self) -> SelectorSpec:
        if not any(
            getattr(self, key) for key in ("name", "glob", "layer", "op_type", "role", "activation", "attention")
        ):
            raise ValueError(
                "a selector needs at least one of name, glob, layer, op_type, role, activation, "
                "attention (or use 'all')"
            )
        return self

    def reaches_inner(self) -> bool:
        """True when ``glob`` and ``layer`` also select a module call's inner tensors: ``inner: true``, or
        (``inner`` not given) a key that picks tensors by what they are."""
        if self.inner is not None:
            return self.inner
        return bool(self.name or self.op_type or self.activation or self.attention)

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.model_dump(exclude_none=True).items())


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def matches(selector: SelectorSpec, tensor: TensorInfo, activation_ends: set[str] | None = None) -> bool:
    """True when *tensor* satisfies every key of *selector* (*activation_ends*: the tensors its
    ``activation`` and ``attention`` keys accept)."""
    if (selector.activation or selector.attention) and tensor.name not in (activation_ends or set()):
        return False
    names, globs = _as_list(selector.name), _as_list(selector.glob)
    layers, op_types = _as_list(selector.layer), _as_list(selector.op_type)
    if names and tensor.name not in names:
        return False
    if globs and not any(fnmatch.fnmatchcase(value, g) for g in globs for value in _glob_values(tensor, selector, g)):
        return False
    if layers and not set(layers) & set(_layer_values(tensor, selector)):
        return False  # a module path selects every call of the module
    if _as_list(selector.role) and tensor.role not in _as_list(selector.role):
        return False
    return not (op_types and tensor.op_type not in op_types)


def _modules(tensor: TensorInfo, selector: SelectorSpec) -> tuple[str, ...]:
    """The module paths and call labels through which ``glob`` and ``layer`` reach *tensor*: the calls it
    is an output of, or every call computing it when the selector reaches inner tensors; a tensor
    outside the calls (a model input) by its module."""
    if not tensor.calls:
        return (tensor.module,)
    return tensor.calls if selector.reaches_inner() else tensor.output_of


def _layer_values(tensor: TensorInfo, selector: SelectorSpec) -> tuple[str, ...]:
    """What ``layer`` is compared with: :func:`_modules` and the tensor's label; an inner tensor's label
    only when it names the tensor (``block/add``), not the call it is computed in (``block``, a label
    taken by the last tensor of a call), and not under ``inner: false``."""
    modules = _modules(tensor, selector)
    if tensor.inner and (selector.inner is False or tensor.layer in tensor.calls):
        return modules
    return (tensor.layer, *modules)


def _glob_values(tensor: TensorInfo, selector: SelectorSpec, pattern: str) -> tuple[str, ...]:
    """What *pattern* is matched against: the tensor's name, label and :func:`_modules`. An inner tensor
    that the selector does not reach by module is matched only by a pattern with a ``/``, against its
    name and label (inner labels are ``M/<tensor>``): ``*mlp.act*`` is the module, ``*mlp.act/*`` what
    it computes inside."""
    if not tensor.inner or selector.reaches_inner():
        return (tensor.name, tensor.layer, *_modules(tensor, selector))
    if selector.inner is False or "/" not in pattern:
        return ()
    return (tensor.name, tensor.layer)


def _hint(selector: SelectorSpec, tensors: Sequence[TensorInfo]) -> str:
    for key, pool in (
        ("name", [t.name for t in tensors]),
        ("layer", [t.layer for t in tensors] + [t.module for t in tensors] + [c for t in tensors for c in t.calls]),
        ("op_type", [t.op_type for t in tensors]),
    ):
        for wanted in _as_list(getattr(selector, key)):
            if wanted not in pool:
                return did_you_mean(wanted, set(pool)) or _ending_in(wanted, pool)
    return ""


def _ending_in(wanted: str, pool: Sequence[str]) -> str:
    """`` Did you mean 'transformer.h.0.mlp'?`` for *wanted* ``h.0.mlp``: the shortest name in *pool* that
    ends in ``.`` + *wanted* (a module path written without its parents), or ``""``."""
    endings = sorted({name for name in pool if name.endswith("." + wanted)}, key=len)
    return f" Did you mean '{endings[0]}'?" if endings else ""


Selection = SelectorSpec | list[SelectorSpec] | Literal["all"]


def as_selector(value: dict | list[dict] | Literal["all"]) -> Selection:
    """A selector written as plain data (an estimator's ``default_selector``: a dict, a list of dicts or
    ``"all"``) in the form the spec's ``on:`` holds."""
    if isinstance(value, str):
        return value
    return [SelectorSpec(**d) for d in value] if isinstance(value, list) else SelectorSpec(**value)


class SelectionError(UserError):
    """A selection that cannot be read. *path* leads from the selection to the problem (``(1, "inner")``:
    the key ``inner`` of the second selector of a list; ``()``: the selection itself), *problem* says
    what it is; the message is both (``[1]: inner: give true or false, not 'maybe'``), without the key
    when *problem* names it already (``unknown key 'layr'. Did you mean 'layer'?``)."""

    def __init__(self, path: tuple[int | str, ...], problem: str, names_key: bool = False):
        self.path, self.problem = path, problem
        index = f"[{path[0]}]: " if path and isinstance(path[0], int) else ""
        key = f"{path[-1]}: " if path and isinstance(path[-1], str) and not names_key else ""
        super().__init__(index + key + problem)


def parse_selection(value: Any) -> Selection:
    """*value* given in a spec's ``on:``, from Python or on the command line as a selection: ``"all"``, a
    mapping of selector keys, a :class:`SelectorSpec`, or a list of mappings or selectors; a
    :class:`SelectionError` naming the first problem (for the caller to place: ``on``, ``--on``)."""
    if value == "all" or isinstance(value, SelectorSpec):
        return value
    if isinstance(value, list) and not value:
        raise SelectionError((), "an empty list selects nothing; give a selector, a list of them or 'all'")
    parsed = []
    for index, item in enumerate(value if isinstance(value, list) else [value]):
        at: tuple[int | str, ...] = (index,) if isinstance(value, list) else ()
        if isinstance(item, SelectorSpec):
            parsed.append(item)
            continue
        if not isinstance(item, dict):
            raise SelectionError(
                at,
                f"expected a mapping of selector keys ({', '.join(SelectorSpec.model_fields)}), "
                f"a list of them or 'all', not {item!r}",
            )
        try:
            parsed.append(SelectorSpec.model_validate(item))
        except ValidationError as error:
            raise _selector_error(error.errors()[0], at) from None
    return parsed if isinstance(value, list) else parsed[0]


def _selector_error(problem: Any, at: tuple[int | str, ...]) -> SelectionError:
    """The first of pydantic's errors for one selector (at *at* in the selection) as one message: the
    selector key, not pydantic's union members, and a did-you-mean for an unknown key."""
    key = str(problem["loc"][0]) if problem["loc"] else ""
    where = (*at, key) if key else at
    if problem["type"] == "extra_forbidden":
        return SelectionError(where, f"unknown key '{key}'.{did_you_mean(key, SelectorSpec.model_fields)}", True)
    if problem["type"] == "bool_type":
        return SelectionError(where, f"give true or false, not {problem['input']!r}")
    return SelectionError(where, problem["msg"].removeprefix("Value error, "))


def resolve(selector: Selection, tensors: Sequence[TensorInfo], strict: bool = True) -> list[TensorInfo]:
    """The observable tensors *selector* picks, in graph order; :class:`UserError` if none.

    For a list of selectors, *strict* requires every one to match; otherwise only the union
    must be non-empty (estimators' defaults such as "activations or the model output").
    """
    if isinstance(selector, list):
        names: set[str] = set()
        errors: list[str] = []
        for item in selector:
            try:
                names.update(t.name for t in resolve(item, tensors))
            except UserError as error:
                errors.append(str(error))
        if (strict and errors) or not names:
            raise UserError("; ".join(errors))
        return [t for t in tensors if t.name in names]
    if selector == "all":
        chosen = [t for t in tensors if t.observable]
        if not chosen:
            raise UserError("selector 'all' matches no observable tensor")
        return chosen
    ends = None
    if selector.activation or selector.attention:
        from .activations import find_activations, find_attention

        ends = {getattr(a, selector.activation) for a in find_activations(tensors)} if selector.activation else None
        if selector.attention:
            end = "output" if selector.attention == "probabilities" else "input"
            attention = {getattr(a, end) for a in find_attention(tensors)}
            ends = attention if ends is None else ends & attention
    matched = [t for t in tensors if matches(selector, t, ends)]
    chosen = [t for t in matched if t.observable]
    if chosen:
        return chosen
    if matched:
        reasons = "; ".join(f"{t.name}: {t.reason}" for t in matched[:5])
        raise UserError(f"selector ({selector.describe()}) matches only tensors that cannot be observed ({reasons})")
    raise UserError(
        f"selector ({selector.describe()}) matches no tensor in the model.{_hint(selector, tensors)}"
        " Run `layerscope inspect MODEL` to list the tensors."
    )
