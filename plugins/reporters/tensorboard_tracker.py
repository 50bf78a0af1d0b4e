"""Reporter ``tensorboard``: the run as TensorBoard event files, one folder per run.

Where: ``$LAYERSCOPE_TENSORBOARD_DIR/<name>-<run id>/`` when the variable is set, else
``<outputs.dir>/tensorboard/<name>-<run id>/``; ``tensorboard --logdir`` on the parent folder shows every run
logged there side by side. What:

- a scalar per series (``<analysis>/<metric>/<layer>[/class_<c>]…``, :mod:`layerscope.results.tracking`)
  at each checkpoint's step (a :class:`layerscope.Monitor`'s step: the training step);
- a histogram per histogram the records hold (``aggregation_distribution``'s ``histogram`` bins), its bins'
  weights as counts;
- each analysis's figure (``figures/<analysis>``, as the ``plots`` reporter draws it) at the last step;
- the resolved spec as text (``spec``).

Written with tensorboardX, which needs neither TensorFlow nor TensorBoard (``torch.utils.tensorboard``
would import TensorFlow when it is installed: seconds per run).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from layerscope import Results, TrackingReporter, hookimpl
from layerscope.results.reporter import unusable_folder
from layerscope.results.tracking import scalars_and_histograms

from .trackers import figure_images, refused, tracked_run_name

LOG_DIR_VARIABLE = "LAYERSCOPE_TENSORBOARD_DIR"


class TensorBoardReporter(TrackingReporter):
    name = "tensorboard"
    requires = {"tensorboardX": 'pip install "layerscope[tensorboard]"'}

    def problem(self, out_dir: Path) -> str | None:
        """The log folder (``$LAYERSCOPE_TENSORBOARD_DIR`` or ``<out_dir>/tensorboard``) cannot be written."""
        if root := os.environ.get(LOG_DIR_VARIABLE):
            found = unusable_folder(Path(root))
            return f"{LOG_DIR_VARIABLE}: {found}" if found else None
        return unusable_folder(out_dir / "tensorboard")

    def start(self, results: Results, folder: Path) -> None:
        from tensorboardX import SummaryWriter

        root = Path(os.environ.get(LOG_DIR_VARIABLE) or folder / "tensorboard")
        self.destination = str(root / tracked_run_name(results))
        try:
            # event files are named by the second and the host: a suffix of its own keeps a second log of the
            # run (``layerscope report --formats tensorboard``) within the same second from overwriting the first
            suffix = f".{uuid.uuid4().hex[:8]}"
            self.writer = SummaryWriter(logdir=self.destination, flush_secs=10, filename_suffix=suffix)
        except OSError as error:
            raise refused(self.name, self.destination, error) from None
        spec = json.dumps(results.spec, indent=2)
        self.writer.add_text("spec", "\n".join("    " + line for line in spec.splitlines()), 0)

    def log_step(self, step: int, records: list[dict]) -> None:
        scalars, histograms = scalars_and_histograms(records)
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        for histogram in histograms:
            centers, weights = histogram.centers, histogram.weights
            self.writer.add_histogram_raw(
                histogram.name,
                min=histogram.edges[0],
                max=histogram.edges[-1],
                num=sum(weights),
                sum=sum(c * w for c, w in zip(centers, weights)),
                sum_squares=sum(c * c * w for c, w in zip(centers, weights)),
                bucket_limits=histogram.edges[1:],
                bucket_counts=weights,
                global_step=step,
            )
        self.writer.flush()  # a training run's steps are on disk as they come

    def log_outputs(self, results: Results, step: int, folder: Path | None) -> None:
        import numpy as np

        for analysis, image in figure_images(results, self.host).items():
            self.writer.add_image(f"figures/{analysis}", np.asarray(image), step, dataformats="HWC")
        self.writer.flush()

    def finish(self, failed: bool = False) -> None:
        self.writer.close()


@hookimpl
def register_reporters(register):
    register(TensorBoardReporter)
