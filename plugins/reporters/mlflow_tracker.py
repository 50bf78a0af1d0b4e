"""Reporter ``mlflow``: the run as an MLflow run.

Where: the tracking server or store of ``$MLFLOW_TRACKING_URI`` when the variable is set, else a SQLite store
in the output folder, ``sqlite:///<outputs.dir>/mlflow.db``, with the artifacts under
``<outputs.dir>/mlartifacts/`` (MLflow 3 refuses new file stores; view it with
``mlflow ui --backend-store-uri sqlite:///<outputs.dir>/mlflow.db``). The experiment is
``$MLFLOW_EXPERIMENT_NAME``, else the spec's ``name``; the run is named ``<name>-<run id>``. What:

- a metric per series (``<analysis>/<metric>/<layer>[/class_<c>]…``, :mod:`layerscope.results.tracking`;
  characters MLflow refuses in a name become ``_``) at each checkpoint's step;
- the resolved spec as parameters (``analyses.<id>.params.<name>``, ``data.source`` …) and the provenance
  as tags (``layerscope.version``, ``layerscope.run_id``, provider, device, onnxruntime and torch versions);
- the run's files as artifacts (``results.json``, ``records.csv``, ``plots/``, ``report.html``: what
  ``outputs.formats`` wrote), and each analysis's figure as ``plots/<analysis>.png`` when the ``plots``
  format did not write it.

Histograms are not logged (MLflow has none): their bins are in ``results.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from layerscope import Results, TrackingReporter, UserError, hookimpl
from layerscope.results.tracking import flat_parameters, scalars_and_histograms

from .trackers import figure_pngs, refused, run_files, tracked_run_name

MAX_KEY = 250  # MLflow's longest metric or parameter name
MAX_VALUE = 6000  # its longest parameter value
BATCH = {"metrics": 1000, "params": 100}  # its most metrics and parameters per log_batch call


def mlflow_name(name: str) -> str:
    """*name* as MLflow accepts it: each ``/``-separated part with letters, digits, ``_ - . `` and spaces only
    (others become ``_``; empty, ``.`` and ``..`` parts become ``_``), at most 250 characters (a longer name
    ends with 8 hex digits of its SHA-1 instead)."""
    parts = [re.sub(r"[^\w.\- ]", "_", part) for part in name.split("/")]
    cleaned = "/".join("_" if part in ("", ".", "..") else part for part in parts)
    if len(cleaned) > MAX_KEY:
        cleaned = cleaned[: MAX_KEY - 9] + "_" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return cleaned


@contextlib.contextmanager
def _quiet_store_setup():
    """MLflow announces at INFO level each table it creates in a new SQLite store: keep that off the terminal."""
    logger = logging.getLogger("mlflow.store.db.utils")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def provenance_tags(results: Results) -> dict:
    """The run's provenance as MLflow tags: ``layerscope.version``, ``layerscope.run_id`` and the runtime's
    provider, device, onnxruntime and torch versions."""
    runtime = results.runtime
    return {
        "layerscope.version": results.layerscope,
        "layerscope.run_id": runtime.get("run_id"),
        **{f"layerscope.{key}": runtime.get(key) for key in ("provider", "device", "onnxruntime", "torch")},
    }


class MlflowReporter(TrackingReporter):
    name = "mlflow"
    requires = {"mlflow": 'pip install "layerscope[mlflow]"'}

    def problem(self, out_dir: Path) -> str | None:
        """``$MLFLOW_TRACKING_URI`` has a scheme no tracking store of mlflow's (or of an mlflow plugin) serves.
        The scheme is looked up in mlflow's store registry, which opens nothing (an mlflow without that
        registry skips the check: the run's logging then reports it)."""
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            return None
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking._tracking_service.utils import _tracking_store_registry
        except ImportError:
            return None
        try:
            _tracking_store_registry.get_store_builder(uri)
        except MlflowException as error:
            schemes = getattr(error, "supported_uri_schemes", None)
            known = f" (it knows {', '.join(repr(s) for s in schemes if s)})" if schemes else ""
            return f"MLFLOW_TRACKING_URI: mlflow has no tracking store for {uri!r}{known}"
        return None

    def start(self, results: Results, folder: Path) -> None:
        from mlflow.exceptions import MlflowException

        own_store = not os.environ.get("MLFLOW_TRACKING_URI")
        uri = f"sqlite:///{(folder / 'mlflow.db').resolve()}" if own_store else os.environ["MLFLOW_TRACKING_URI"]
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or str(results.spec.get("name") or "layerscope")
        self.destination = f"{uri} (experiment '{experiment}')"
        self.names: dict[str, str] = {}  # series name -> the MLflow name it was given (unique, kept across steps)
        try:
            experiment_id = self._experiment(uri, experiment, folder if own_store else None)
            tags = {key: str(value) for key, value in provenance_tags(results).items() if value is not None}
            self.run_id = self.client.create_run(
                experiment_id, run_name=tracked_run_name(results), tags=tags
            ).info.run_id
            self.destination = f"{uri} (experiment '{experiment}', run {self.run_id})"
            self._log_params(results)
        except ImportError as error:  # mlflow-skinny: no SQLAlchemy, so no database store
            raise UserError(
                f"outputs.formats: mlflow: the store {uri} needs the full mlflow package ({error}): "
                'pip install "layerscope[mlflow]", or set MLFLOW_TRACKING_URI to a tracking server'
            ) from None
        except (MlflowException, OSError) as error:
            raise refused(self.name, self.destination, error) from None

    def _experiment(self, uri: str, name: str, own_folder: Path | None) -> str:
        """Open the store at *uri* (creating it, in *own_folder* when it is layerscope's own) and return the id of
        the experiment *name*, created when new (its artifacts in ``<own_folder>/mlartifacts``)."""
        from mlflow.tracking import MlflowClient

        if own_folder is not None:
            own_folder.mkdir(parents=True, exist_ok=True)
        with _quiet_store_setup():
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = (own_folder / "mlartifacts").resolve().as_uri() if own_folder is not None else None
        return self.client.create_experiment(name, artifact_location=location)

    def _log_params(self, results: Results) -> None:
        from mlflow.entities import Param

        params = [Param(mlflow_name(key), value[:MAX_VALUE]) for key, value in flat_parameters(results.spec).items()]
        for start in range(0, len(params), BATCH["params"]):
            self.client.log_batch(self.run_id, params=params[start : start + BATCH["params"]])

    def _name(self, series: str) -> str:
        """The MLflow name of *series*: :func:`mlflow_name`, with ``_2``, ``_3`` … when another series took it."""
        if series not in self.names:
            taken, candidate, count = set(self.names.values()), mlflow_name(series), 1
            while candidate in taken:
                count += 1
                candidate = f"{mlflow_name(series)[: MAX_KEY - 8]}_{count}"
            self.names[series] = candidate
        return self.names[series]

    def log_step(self, step: int, records: list[dict]) -> None:
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException

        scalars, _ = scalars_and_histograms(records)
        now = int(time.time() * 1000)
        metrics = [Metric(self._name(name), value, now, step) for name, value in scalars.items()]
        try:
            for start in range(0, len(metrics), BATCH["metrics"]):
                self.client.log_batch(self.run_id, metrics=metrics[start : start + BATCH["metrics"]])
        except MlflowException as error:
            raise refused(self.name, self.destination, error) from None

    def log_outputs(self, results: Results, step: int, folder: Path | None) -> None:
        from mlflow.exceptions import MlflowException

        files = run_files(results, folder)
        try:
            for relative, path in files.items():
                parent = str(Path(relative).parent)
                self.client.log_artifact(self.run_id, str(path), None if parent == "." else parent)
            figures = figure_pngs(results, self.host)
            drawn = {key: png for key, png in figures.items() if f"plots/{key}.png" not in files}
            if drawn:
                with tempfile.TemporaryDirectory() as scratch:
                    (Path(scratch) / "plots").mkdir()
                    for analysis, png in drawn.items():
                        (Path(scratch) / "plots" / f"{analysis}.png").write_bytes(png)
                    self.client.log_artifacts(self.run_id, scratch)
        except (MlflowException, OSError) as error:
            raise refused(self.name, self.destination, error) from None

    def finish(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


@hookimpl
def register_reporters(register):
    register(MlflowReporter)
