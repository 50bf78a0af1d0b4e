"""Expanding ``model.checkpoints`` into an ordered list of files."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field

from layerscope.model.adapter import Checkpoint, steps_from_labels
from layerscope.util.errors import UserError

CheckpointFiles = str | list[str] | None


def checkpoint_files(suffixes: str):
    """The ``checkpoints`` key of adapters that read model files: a glob or a list, analysed in order."""
    return Field(
        None,
        description=f"glob (relative to the spec's folder) or list of {suffixes} files, analysed in "
        "natural order (epoch_2 before epoch_10)",
    )


def natural_key(text: str) -> list:
    """Sort key that orders ``epoch_2`` before ``epoch_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def file_checkpoints(pattern: str | list[str], spec, suffixes: tuple[str, ...]) -> list[Checkpoint]:
    """Checkpoints from a glob (relative to the spec's folder) or an explicit list, in natural order; the
    last number in each file name is the checkpoint's step (:func:`layerscope.model.adapter.steps_from_labels`)."""
    if isinstance(pattern, list):
        paths = [spec.resolve_path(p) for p in pattern]
    else:
        resolved = spec.resolve_path(pattern)
        anchor = Path(resolved.anchor)
        paths = sorted(anchor.glob(str(resolved.relative_to(anchor))), key=lambda p: natural_key(p.name))
    paths = [p for p in paths if p.name.endswith(suffixes)] if not isinstance(pattern, list) else paths
    if not paths:
        raise UserError(f"model.checkpoints: '{pattern}' matches no {'/'.join(suffixes)} file")
    labels = [p.name.removesuffix(next((s for s in suffixes if p.name.endswith(s)), "")) for p in paths]
    return [Checkpoint(label, path, step) for label, path, step in zip(labels, paths, steps_from_labels(labels))]
