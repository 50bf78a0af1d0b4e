"""Per-checkpoint progress of a run, saved so that ``layerscope run --resume`` continues it.

After each checkpoint of a multi-checkpoint run, its records, warnings, model details and
finished estimators (for the next checkpoint's ``carry_over``) are pickled atomically into
``<outputs.dir>/.layerscope-resume/``, tagged with a hash of the resolved spec. A resumed
run reuses the checkpoints whose spec hash and label match and computes the rest; a run
that completes removes the folder, and a run started without ``--resume`` discards it. The
files are written and read only by layerscope itself.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

from .results import atomic_write

FOLDER = ".layerscope-resume"


class ResumeStore:
    def __init__(self, out_dir: Path, spec: dict, resume: bool):
        self.folder = out_dir / FOLDER
        relevant = {k: v for k, v in spec.items() if k != "outputs"}  # where results go does not change them
        self.key = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()
        if not resume:
            self.clear()

    def _path(self, index: int) -> Path:
        return self.folder / f"checkpoint-{index:04d}.pkl"

    def load(self, index: int, label: str) -> dict[str, Any] | None:
        """The saved state of checkpoint *index* if it belongs to this spec and checkpoint, else None."""
        path = self._path(index)
        if not path.exists():
            return None
        saved = pickle.loads(path.read_bytes())
        return saved if saved.get("key") == self.key and saved.get("label") == label else None

    def save(self, index: int, label: str, state: dict[str, Any]) -> None:
        atomic_write(self._path(index), pickle.dumps({"key": self.key, "label": label, **state}))

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
