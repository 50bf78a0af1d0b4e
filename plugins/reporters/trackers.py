"""What the tracking reporters (``tensorboard``, ``mlflow``, ``wandb``) share: the run's name in a tracker, its
figures as images, its files, and the user error for a tracker that refuses to log."""

from __future__ import annotations

from pathlib import Path

from layerscope import Results, UserError
from layerscope.util.errors import first_line
from layerscope.util.names import run_name

from .plots import analysis_figures


def tracked_run_name(results: Results) -> str:
    """``<spec name>-<run id>``, as the folder of a run without ``outputs.dir`` is named."""
    return run_name(str(results.spec.get("name") or ""), str(results.runtime.get("run_id")))


def figure_pngs(results: Results, host) -> dict[str, bytes]:
    """Each analysis's figure as the ``plots`` reporter draws it (PNG), by analysis id."""
    return {analysis["id"]: rendered["png"] for analysis, rendered in analysis_figures(results, host, ("png",))}


def figure_images(results: Results, host) -> dict[str, object]:
    """Each analysis's figure (:func:`figure_pngs`) as an RGB :class:`PIL.Image.Image`, by analysis id."""
    import io

    from PIL import Image

    return {key: Image.open(io.BytesIO(png)).convert("RGB") for key, png in figure_pngs(results, host).items()}


def run_files(results: Results, folder: Path | None) -> dict[str, Path]:
    """The run's files in *folder* (``results.json`` and the artifacts it lists) by their path relative to it;
    none without a folder."""
    listed = ("results.json", *results.artifacts) if folder is not None else ()
    return {name: folder / name for name in listed if folder is not None and (folder / name).is_file()}


def refused(tracker: str, where: str | None, error: BaseException) -> UserError:
    """The user error for a tracker that could not log the run (an unreachable server, a store it cannot open)."""
    return UserError(f"outputs.formats: {tracker}: cannot log to {where}: {first_line(error)}")
