"""Reporters turn :class:`Results` into files or send them to an experiment tracker; each ``outputs.formats``
entry names one.

- :class:`Reporter` writes files of the run into its output folder (``records.csv``, plots, the report).
- :class:`TrackingReporter` logs the run to an experiment tracker (TensorBoard, MLflow, Weights & Biases):
  each checkpoint's records as scalars and histograms at its step, the figures, the run's files. A run
  calls it once its files are in place (:meth:`TrackingReporter.write`); a :class:`layerscope.Monitor`
  calls it step by step while a model trains (:meth:`~TrackingReporter.start`,
  :meth:`~TrackingReporter.log_step`, :meth:`~TrackingReporter.log_outputs`, :meth:`~TrackingReporter.finish`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from .contract import Results
from .tracking import checkpoint_steps

if TYPE_CHECKING:
    from layerscope.host.loader import PluginHost


class Reporter:
    """Base class of reporter plugins; *host* gives access to the other plugins (e.g. estimators' plots)."""

    name: ClassVar[str]
    #: The modules the reporter imports when it writes, each with the command that installs it, e.g.
    #: ``{"pyarrow": 'pip install "layerscope[table]"'}``: a spec asking for the format without them is a
    #: user error when it is checked, before the run starts (:meth:`missing`).
    requires: ClassVar[dict[str, str]] = {}

    def __init__(self, host: PluginHost | None = None):
        self.host = host

    @classmethod
    def missing(cls) -> str | None:
        """What the format needs that is not installed (a sentence with the command that installs it), or None."""
        for module, install in cls.requires.items():
            try:
                found = importlib.util.find_spec(module)
            except (ImportError, ValueError):  # a broken install cannot be imported either
                found = None
            if found is None:
                return f"the {cls.name} format needs the {module} package: {install}"
        return None

    def problem(self, out_dir: Path) -> str | None:
        """What would keep this reporter from writing a run into *out_dir* that can be found before the
        run starts, without side effects (a tracker's folder that is a file, a setting its package cannot
        use), as a sentence naming the setting; None when nothing is found. :func:`check_reporters` asks
        each reporter before the model runs."""
        return None

    def write(self, results: Results, out_dir: Path) -> list[str]:
        """Write this format's files under *out_dir*; return their paths relative to it."""
        raise NotImplementedError


def check_reporters(reporters: list[Reporter], out_dir: Path, key: str) -> None:
    """A user error naming *key* (``outputs.formats``, ``--formats``), the format and the setting when a
    reporter finds a :meth:`~Reporter.problem` with writing into *out_dir*."""
    from layerscope.util.errors import UserError

    for reporter in reporters:
        if found := reporter.problem(out_dir):
            raise UserError(f"{key}: {reporter.name}: {found}")


def unusable_folder(folder: Path) -> str | None:
    """Why *folder* cannot be created or written to (the nearest existing path on the way is not a folder
    or not writable), or None."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder" + (f" (on the way to {folder})" if existing != folder else "")
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write to {existing}" + (f" (on the way to {folder})" if existing != folder else "")
    return None


class TrackingReporter(Reporter):
    """Base class of reporters that log to an experiment tracker rather than write files of the run.

    A tracker keeps its own store (an event-file folder, a tracking database, an offline run folder) whose
    default location is inside the run's output folder, *folder* below; it is not one of the run's files
    (``results.json`` does not list it), so the next run into the same folder adds to it instead of
    replacing it. Subclasses implement the four steps; :meth:`write` runs them over a finished run.
    """

    #: Where the tracker's run went, once :meth:`start` has opened it (printed at the end of ``layerscope run``).
    destination: str | None = None

    def start(self, results: Results, folder: Path) -> None:
        """Open a tracked run for *results* (its spec, provenance and ``runtime.run_id``; records may still
        be empty), with the tracker's store under *folder* unless the tracker's own settings say where."""
        raise NotImplementedError

    def log_step(self, step: int, records: list[dict]) -> None:
        """Log *records*, the records of one checkpoint, at *step* (steps only increase)."""
        raise NotImplementedError

    def log_outputs(self, results: Results, step: int, folder: Path | None) -> None:
        """Log what is drawn or written from the whole of *results*, at *step*: the figures, and the run's
        files in *folder* (``results.json`` and its ``artifacts``) when it is given."""
        raise NotImplementedError

    def finish(self, failed: bool = False) -> None:
        """Close the tracked run (marked as failed when *failed*); nothing is logged after."""
        raise NotImplementedError

    def write(self, results: Results, out_dir: Path) -> list[str]:
        """Log a finished run whose files are in *out_dir*: every checkpoint at its step
        (:func:`~layerscope.results.tracking.checkpoint_steps`), then the figures and files at the last one."""
        self.start(results, out_dir)
        try:
            steps = checkpoint_steps(results)
            for step, records in steps:
                self.log_step(step, records)
            self.log_outputs(results, steps[-1][0] if steps else 0, out_dir)
        except BaseException:
            self.finish(failed=True)
            raise
        self.finish()
        return []
