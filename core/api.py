"""The Python entry points: ``layerscope.run``, ``layerscope.validate`` and ``layerscope.trace``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerscope.results.contract import Results
from layerscope.util.errors import UserError

if TYPE_CHECKING:
    from layerscope.engine.plan import RunPlan
    from layerscope.engine.trace import Trace


def prepare(spec: str | os.PathLike | dict, plugins: tuple[Any, ...] = (), data: Any = None):
    """Load, validate and resolve a spec against the plugins (reading *data* from Python when given);
    every error at once as one ``SpecError``."""
    from layerscope.engine.plan import build_plan
    from layerscope.host.loader import load_plugins
    from layerscope.spec.schema import read_document, with_python_data

    doc, base_dir = read_document(spec)
    return build_plan(with_python_data(doc, data), base_dir, load_plugins(plugins))


def prepare_trace(spec: str | os.PathLike | dict, plugins: tuple[Any, ...] = (), data: Any = None) -> RunPlan:
    """:func:`prepare` for a trace: the spec's model, data and runtime (:func:`layerscope.spec.schema.for_trace`)."""
    from layerscope.engine.plan import build_plan
    from layerscope.host.loader import load_plugins
    from layerscope.spec.schema import TraceSpec, for_trace, read_document, with_python_data

    doc, base_dir = read_document(spec)
    return build_plan(with_python_data(for_trace(doc), data), base_dir, load_plugins(plugins), TraceSpec)


def output_dir(plan, out: str | os.PathLike | None, resume: bool) -> Path:
    """*out*, else the spec's ``outputs.dir``, else a folder of this run's own (``results/<name>-<run id>``):
    runs of specs without ``outputs.dir`` never share a folder, so two of them never collide."""
    if out is not None:
        return Path(out)
    if resume and plan.spec.outputs.dir is None:
        raise UserError(
            "--resume continues a run in the folder it wrote to: give the spec an outputs.dir (or --out), since "
            "a run without one writes to a new folder every time"
        )
    return plan.default_folder


def run(
    spec: str | os.PathLike | dict,
    out: str | os.PathLike | None = None,
    *,
    data: Any = None,
    write: bool = True,
    plugins: tuple[Any, ...] = (),
    progress: bool = True,
    resume: bool = False,
) -> Results:
    """Run a spec (a YAML path or a dict) and return its :class:`Results`.

    *data* replaces the spec's data source with data from Python: an array, ``(x, y)``, a mapping
    of named arrays (one per model input), a map-style torch ``Dataset`` or a ``DataLoader``
    (the data section's batch_size, limit, shuffle, constants and token_mask still apply).
    Outputs go to *out*, the spec's ``outputs.dir`` (relative to the current folder) or a new folder
    ``results/<name>-<run id>`` (:func:`output_dir`);
    ``write=False`` computes the results without writing files. *plugins* are extra
    plugin objects registered next to the installed ones. ``resume=True`` continues an
    interrupted multi-checkpoint run from the checkpoints it saved in the output folder.
    """
    from layerscope.engine.execute import execute

    plan = prepare(spec, plugins, data)
    out_dir = output_dir(plan, out, resume) if write else None
    try:
        with plan.doc.locating_errors():  # an error naming a spec key (data.path: …) gets its file:line:col
            return execute(plan, out_dir, show_progress=progress, resume=resume)
    except BaseException as error:
        plan.host.hook.on_run_error(error=error)
        raise


def validate(
    spec: str | os.PathLike | dict, *, data: Any = None, plugins: tuple[Any, ...] = (), with_model: bool = True
) -> list[str]:
    """Check a spec (with *data* as in :func:`run`): structure, plugin names and parameters, and (with
    the model) that the data fits the model's inputs and every selector matches.

    Returns a short description of what was checked; raises a ``UserError`` on the first failing stage.
    """
    plan = prepare(spec, plugins, data)
    checked = [
        "spec structure",
        "estimator, data source and reporter names and parameters",
        *(["labels"] if plan.classes is not None else []),
    ]
    if with_model:
        from layerscope.engine.checkpoint_run import ShardWorker, build_estimators

        with plan.doc.locating_errors():  # an error naming a spec key (data.path: …) gets its file:line:col
            checkpoints = plan.checkpoints()
            worker = ShardWorker(plan, checkpoints, [(0, len(plan.order))], plan.order, plan.example())
            for index, checkpoint in enumerate(checkpoints):
                model = worker.load(index)  # checks the data against the model's inputs
                estimators = build_estimators(plan, model)
                checked.append(
                    f"model {checkpoint.label}: inputs {model.feeds.describe()}; "
                    + ", ".join(
                        f"{aid} selects {len(est.tensors)} tensor{'s' if len(est.tensors) != 1 else ''}"
                        for aid, est in estimators
                    )
                )
    return checked


def trace(
    model: Any,
    data: Any,
    on: Any,
    *,
    batch_size: int = 100,
    limit: int | None = None,
    memory_budget: int | str = "2GiB",
    device: str = "auto",
    progress: bool = True,
    plugins: tuple[Any, ...] = (),
) -> Trace:
    """The tensors *on* selects, for every sample of *data*, as named arrays: a :class:`~layerscope.engine.
    trace.Trace`, a dict from ONNX tensor name to an array with the samples on axis 0 in data order, with
    ``layers`` (tensor name → layer label), ``by_layer()`` and ``save(path)``. A ``layer`` or ``glob``
    selector picks what a forward hook on the module returns (as TransformerLens's ``run_with_cache``
    with a names filter).

    *model* is what ``model.source`` takes (an ``nn.Module``, a Keras model, an ``.onnx`` or ``.pt2``
    path, an ``onnx.ModelProto`` …) or a whole model section as a dict (``{"source": "net.onnx",
    "checkpoints": …}``, naming one checkpoint); *data* what :func:`run` takes as ``data``; *on* a
    selector (a mapping, a list of them or ``"all"``). The model runs on batches of *batch_size* over
    the first *limit* samples. The arrays count against *memory_budget* together with the runner's
    fetches: a trace that would hold more is refused, naming the bytes it needs.
    """
    from layerscope.engine.progress import Progress
    from layerscope.engine.trace import Trace, trace_tensors
    from layerscope.graph.selectors import parse_selection

    if data is None:
        raise UserError("data: give the samples to trace (an array, a mapping of named arrays, a Dataset …)")
    try:
        selector = parse_selection(on)
    except UserError as error:
        raise UserError(f"on: {error}") from None
    section = dict(model) if isinstance(model, dict) else {"source": model}
    spec = {
        "model": section,
        "data": {"batch_size": batch_size, **({"limit": limit} if limit is not None else {})},
        "runtime": {"memory_budget": memory_budget, "device": device},
    }
    plan = prepare_trace(spec, plugins, data)
    with Progress(len(plan.order), "tracing", enabled=progress) as bar:
        arrays, layers = trace_tensors(plan, selector, "on", progress=bar)
    return Trace(arrays, layers, plan.order)
