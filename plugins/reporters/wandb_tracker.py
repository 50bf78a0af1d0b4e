"""Reporter ``wandb``: the run as a Weights & Biases run.

Where: an offline run under ``<outputs.dir>/wandb/offline-run-<time>-<id>/`` (``wandb sync`` uploads it)
unless ``WANDB_MODE`` says otherwise (``online`` logs straight to the server, given ``wandb login``);
``WANDB_DIR`` moves the ``wandb/`` folder, ``WANDB_PROJECT`` (default: the spec's ``name``) and
``WANDB_ENTITY`` name the project and team. The run is named ``<name>-<run id>``. What:

- a value per series (``<analysis>/<metric>/<layer>[/class_<c>]…``, :mod:`layerscope.results.tracking`) at
  each checkpoint's step;
- a ``wandb.Histogram`` per histogram the records hold (``aggregation_distribution``'s ``histogram`` bins);
- each analysis's figure (``figures/<analysis>``, as the ``plots`` reporter draws it) at the last step;
- the resolved spec as the run's config (analyses by id) with the provenance under ``layerscope``.
"""

from __future__ import annotations

import os
from pathlib import Path

from layerscope import Results, TrackingReporter, hookimpl
from layerscope.results.reporter import unusable_folder
from layerscope.results.tracking import scalars_and_histograms

from .trackers import figure_images, refused, tracked_run_name


def run_config(results: Results) -> dict:
    """The resolved spec with its analyses by id, and the run's provenance under ``layerscope``."""
    spec = dict(results.spec)
    spec["analyses"] = {a["id"]: {k: v for k, v in a.items() if k != "id"} for a in spec.get("analyses", [])}
    keys = ("run_id", "provider", "device", "onnxruntime", "torch", "seed")
    spec["layerscope"] = {"version": results.layerscope, **{k: results.runtime.get(k) for k in keys}}
    return spec


class WandbReporter(TrackingReporter):
    name = "wandb"
    requires = {"wandb": 'pip install "layerscope[wandb]"'}

    def problem(self, out_dir: Path) -> str | None:
        """The ``wandb/`` folder (in ``$WANDB_DIR`` or *out_dir*) cannot be written. (Whether online mode has
        credentials is not checked: wandb offers no check that neither prints nor may reach its server.)"""
        found = unusable_folder(Path(os.environ.get("WANDB_DIR") or out_dir) / "wandb")
        return f"WANDB_DIR: {found}" if found and os.environ.get("WANDB_DIR") else found

    def start(self, results: Results, folder: Path) -> None:
        import wandb

        settings = wandb.Settings(silent=True, console="off", disable_git=True, disable_code=True, save_code=False)
        self.destination = str(Path(os.environ.get("WANDB_DIR") or folder) / "wandb")
        try:
            if not os.environ.get("WANDB_DIR"):
                folder.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or str(results.spec.get("name") or "layerscope"),
                name=tracked_run_name(results),
                dir=None if os.environ.get("WANDB_DIR") else str(folder),
                mode=None if os.environ.get("WANDB_MODE") else "offline",
                config=run_config(results),
                settings=settings,
                reinit="create_new",  # beside a run the training script has open, not in place of it
            )
        except (wandb.errors.Error, OSError) as error:
            raise refused(self.name, self.destination, error) from None
        self.destination = str(Path(self.run.dir).parent)

    def log_step(self, step: int, records: list[dict]) -> None:
        import numpy as np
        import wandb

        scalars, histograms = scalars_and_histograms(records)
        logged: dict = dict(scalars)
        for histogram in histograms:
            weights, edges = np.asarray(histogram.weights), np.asarray(histogram.edges)
            logged[histogram.name] = wandb.Histogram(np_histogram=(weights, edges))
        self.run.log(logged, step=step)

    def log_outputs(self, results: Results, step: int, folder: Path | None) -> None:
        import wandb

        images = {f"figures/{key}": wandb.Image(image) for key, image in figure_images(results, self.host).items()}
        if images:
            self.run.log(images, step=step)

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


@hookimpl
def register_reporters(register):
    register(WandbReporter)
