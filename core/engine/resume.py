"""Per-checkpoint progress of a run, saved so that ``layerscope run --resume`` continues it.

After each checkpoint of a multi-checkpoint run, its outcome (records, warnings, model
details, failures) and the declared state of its estimators (what the next checkpoint's
``carry_over`` reads) are written atomically to
``<outputs.dir>/.layerscope-resume/checkpoint-NNNN.pt``, tagged with a hash of the resolved
spec (less the outputs and the runtime keys that only place the work, :data:`PLACEMENT`) and the
layerscope version, and with a fingerprint of the data and of the checkpoint files up to
that checkpoint (:func:`input_fingerprints`: a changed data file or checkpoint is never mixed with
results saved before the change).

Reading these files can never run code: they hold only plain data and tensors and are read
with ``torch.load(weights_only=True)``, whose unpickler refuses anything else. A file that
is unreadable, or written for another spec, checkpoint, data or layerscope version, is discarded
with a warning and that checkpoint recomputed. A resumed run reuses the checkpoints that
match; a run that completes removes the folder, and a run started without ``--resume``
discards it.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from layerscope import __version__
from layerscope.util.files import atomic_write, fingerprint_paths, regular_file

from .outcomes import CheckpointOutcome

if TYPE_CHECKING:
    from layerscope.data.source import DataSource
    from layerscope.model.adapter import Checkpoint

    from .estimator import Estimator
    from .plan import RunPlan

FOLDER = ".layerscope-resume"
#: Runtime keys that say where and on how many workers a run goes, not what it computes (shards change only
#: the order of floating-point sums): a run may resume on another engine or cluster.
PLACEMENT = frozenset({"engine", "address", "workers", "shards", "retries", "ship"})


def input_fingerprints(data: DataSource, checkpoints: list[Checkpoint], base_dir: Path) -> list[str | None]:
    """Per checkpoint, a digest of the data (:meth:`DataSource.fingerprint`) and of the files of the
    checkpoints up to it: a changed checkpoint changes what later ones were handed by ``carry_over`` too.
    None throughout when the data cannot be fingerprinted."""
    data_fingerprint = data.fingerprint()
    if data_fingerprint is None:
        return [None] * len(checkpoints)
    chain = hashlib.sha256(data_fingerprint.encode())
    fingerprints: list[str | None] = []
    for checkpoint in checkpoints:
        chain.update(fingerprint_paths([checkpoint.ref], base_dir).encode())
        fingerprints.append(chain.hexdigest())
    return fingerprints


class ResumeStore:
    def __init__(self, out_dir: Path, spec: dict, resume: bool, inputs: list[str | None]):
        self.folder = out_dir / FOLDER
        self.inputs = inputs
        relevant = {k: v for k, v in spec.items() if k != "outputs"}  # where results go does not change them
        relevant["runtime"] = {k: v for k, v in relevant.get("runtime", {}).items() if k not in PLACEMENT}
        self.key = hashlib.sha256(
            json.dumps({"layerscope": __version__, "spec": relevant}, sort_keys=True, default=str).encode()
        ).hexdigest()
        self.warnings: list[str] = []
        if not resume:
            self.clear()
        elif None in inputs:
            self.warnings.append(
                "--resume: the data cannot be fingerprinted (it was handed over from Python), so saved "
                "checkpoints are reused trusting that it is unchanged"
            )

    def _path(self, index: int) -> Path:
        return self.folder / f"checkpoint-{index:04d}.pt"

    def load(self, index: int, label: str, plan: RunPlan) -> tuple[CheckpointOutcome, dict[str, Estimator]] | None:
        """The saved outcome and estimators of checkpoint *index*, or None (recompute it) when there is
        none or the file is unusable (then a warning says why)."""
        path = self._path(index)
        if not path.exists():
            return None
        try:
            regular_file(path, "resume file")  # a FIFO planted here would block the read forever
            with warnings.catch_warnings():  # torch's notes on odd files: this store says what went wrong
                warnings.simplefilter("ignore")
                saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") != self.key or saved.get("label") != label:
                self.warnings.append(
                    f"{path} was saved by another spec, checkpoint or layerscope version; "
                    f"checkpoint {label} was recomputed"
                )
                return None
            if saved.get("inputs") != self.inputs[index]:
                self.warnings.append(
                    f"--resume: the data or the checkpoint files changed since checkpoint {label} was saved; "
                    "it was recomputed"
                )
                return None
            outcome = CheckpointOutcome(**saved["outcome"])
            return outcome, {
                p.section.id: _restored(p, saved["estimators"][p.section.id])
                for p in plan.analyses
                if p.section.id in saved["estimators"]
            }
        except Exception as error:  # the file is untrusted: whatever is wrong with it, recompute
            self.warnings.append(
                f"{path} could not be read as a resume file ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else 'unreadable'}); "
                f"checkpoint {label} was recomputed"
            )
            return None

    def save(self, index: int, label: str, outcome: CheckpointOutcome, estimators: dict[str, Estimator]) -> None:
        """Write checkpoint *index*; skipped with a warning when an estimator's state holds something
        other than plain data and tensors (it could not be read back safely)."""
        buffer = io.BytesIO()
        torch.save(
            {
                "key": self.key,
                "inputs": self.inputs[index],
                "label": label,
                "outcome": outcome.to_dict(),
                "estimators": {aid: est.state_dict() for aid, est in estimators.items()},
            },
            buffer,
        )
        try:
            torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        except Exception as error:  # e.g. a third-party estimator keeping numpy arrays or objects
            self.warnings.append(
                f"checkpoint {label} was not saved for --resume: an estimator's state is not "
                f"plain data and tensors ({type(error).__name__})"
            )
            return
        try:
            atomic_write(self._path(index), buffer.getvalue())
        except OSError as error:  # the run goes on; only --resume loses this checkpoint
            self.warnings.append(f"checkpoint {label} was not saved for --resume: {error.strerror or error}")

    def clear(self) -> None:
        if self.folder.is_dir() and not self.folder.is_symlink():
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            self.folder.unlink(missing_ok=True)


def _restored(planned, state: dict[str, Any]) -> Estimator:
    """A fresh estimator of *planned* holding the saved declared state (what ``carry_over`` reads)."""
    estimator = planned.estimator_class(planned.params)
    estimator.load_state_dict(state)
    return estimator
