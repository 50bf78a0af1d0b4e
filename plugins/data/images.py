"""The ``images`` data source: a folder of image files (PNG, JPEG, BMP, GIF, TIFF, WebP, PPM/PGM).

Samples are the image files under ``path`` (sub-folders included, sorted by their path), or the
files a manifest lists; either way every file must lie inside ``path``: links are followed, and a
link leading out of it (or, for a linked sub-folder, back to a folder it is in) is refused naming it,
never read. Labels (``labels``):

- ``auto`` (default): the class folder when the images sit in sub-folders (``cat/001.png`` has
  class ``cat``; string class names), none when they all sit in ``path`` itself;
- ``folders``: the class folder, and every image must have one; ``none``: no labels;
- ``manifest: labels.csv`` (or ``.json``), relative to the spec: the images and their labels,
  one row per image in the manifest's order; every file must lie inside ``path`` (a ``..``, an absolute
  path or a link leading out of it is refused, never read). A CSV has a header with ``file_column`` (default
  ``file``, relative to ``path``) and ``label_column`` (default ``label``); a JSON file is an
  object ``{file: label}`` or a list of objects with those two keys. Labels that all spell numbers
  are numbers (whole ones integer classes, others refused, as everywhere), others class names.

Every image goes through the preprocessing of :mod:`.image_preprocessing` (``color``, ``resize``,
``center_crop``, ``scale``, ``normalize``, ``layout``). Batches are decoded on ``threads`` threads
(Pillow releases the GIL while it decodes), each into its sample of the batch, as many at once as
hold ``max_pixels`` pixels together: nothing but the batch and those images is held (see
:mod:`.image_preprocessing`). Without
``resize: [h, w]`` or ``center_crop`` every image must have the size of the first, which is
checked from the files' headers before the run starts.
"""

from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from layerscope import DataSource, hookimpl
from layerscope.data.labels import labels_from_text
from layerscope.util.errors import UserError
from layerscope.util.files import regular_file
from layerscope.util.params import Count

from .image_preprocessing import ImagePreprocessing, PixelBudget, opened_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


class ImagesParams(ImagePreprocessing):
    path: str = Field(description="the folder of images, relative to the spec")
    labels: Literal["auto", "folders", "none"] = Field("auto", description="class sub-folders, none, or auto")
    manifest: str | None = Field(None, description="a CSV or JSON file listing the images and their labels")
    file_column: str = Field("file", description="manifest: the column of image paths (relative to path)")
    label_column: str = Field("label", description="manifest: the column of labels")
    threads: Count = Field(min(4, os.cpu_count() or 1), description="threads decoding a batch")

    @model_validator(mode="after")
    def _labels_from_one_place(self) -> ImagesParams:
        if self.manifest is not None and "labels" in self.model_fields_set:
            raise ValueError("labels come from the manifest when one is given; leave out labels")
        return self


def find_images(folder: Path) -> list[Path]:
    """The image files under *folder*, sorted by path (hidden files and folders left out), each inside it:
    links are followed, a linked folder as a folder of its own, and one leading out of *folder* (or back
    to a folder it is in, a cycle) is a user error naming it, as for the files a manifest lists."""
    root = folder.resolve()
    found: list[Path] = []

    def outside(link: Path, target: Path) -> UserError:
        return UserError(
            f"data.path: {link} is a link to {target}, outside {folder} (data.path); the images must lie inside "
            "that folder"
        )

    def scan(current: Path, above: tuple[Path, ...]) -> None:  # above: the real folders it is in, itself last
        try:
            with os.scandir(current) as entries:
                listed = sorted(entries, key=lambda entry: entry.name)
        except OSError as error:
            raise UserError(f"data.path: cannot read the folder {current} ({error.strerror or error})") from None
        for entry in listed:
            if entry.name.startswith("."):
                continue
            path = current / entry.name
            target = path.resolve() if entry.is_symlink() else None  # else inside, as its folder is
            if target is not None and not target.is_relative_to(root):
                if entry.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES:
                    raise outside(path, target)
            elif entry.is_dir():
                real = target if target is not None else above[-1] / entry.name
                if real in above:
                    raise UserError(
                        f"data.path: {path} is a link back to {real}, a folder it is in (a cycle); remove the link"
                    )
                scan(path, (*above, real))
            elif path.suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
                found.append(path)

    scan(folder, (root,))
    return sorted(found, key=lambda path: path.relative_to(folder).parts)


def read_manifest(path: Path, file_column: str, label_column: str) -> tuple[list[str], np.ndarray]:
    """The files and labels of a CSV or JSON manifest; labels that are all whole numbers become ints."""
    where = f"data.manifest: {path}"
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is no text
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{where}: cannot read it ({error})") from None
    if path.suffix.lower() == ".json":
        try:
            content = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{where}: not valid JSON ({error})") from None
        if isinstance(content, dict):
            rows = list(content.items())
        elif isinstance(content, list) and all(isinstance(row, dict) for row in content):
            missing = next((i for i, row in enumerate(content) if not {file_column, label_column} <= row.keys()), None)
            if missing is not None:
                raise UserError(f"{where}: entry {missing} lacks '{file_column}' or '{label_column}'")
            rows = [(row[file_column], row[label_column]) for row in content]
        else:
            raise UserError(f"{where}: give an object {{file: label}} or a list of objects")
    else:
        table = list(csv.DictReader(text.splitlines()))
        header = list(table[0]) if table else []
        for column, key in ((file_column, "file_column"), (label_column, "label_column")):
            if column not in header:
                raise UserError(
                    f"{where}: no column '{column}' (data.{key}; the columns: {', '.join(header) or 'none'})"
                )
        rows = [(row[file_column], row[label_column]) for row in table]
    if not rows:
        raise UserError(f"{where}: lists no images")
    bad = next((i for i, (file, label) in enumerate(rows) if not isinstance(file, str) or label in (None, "")), None)
    if bad is not None:
        raise UserError(f"{where}: row {bad + 1} has no file or no label ({rows[bad]})")
    labels = labels_from_text(
        [str(label).strip() if not isinstance(label, int | float) else label for _, label in rows]
    )
    return [file for file, _ in rows], labels


class ImagesSource(DataSource):
    name = "images"
    Params = ImagesParams
    params: ImagesParams

    def __init__(self, params, base_dir, seed=0):
        super().__init__(params, base_dir, seed)
        self.folder = base_dir / params.path
        if not self.folder.is_dir():
            raise UserError(f"data.path: {self.folder} is not a folder")
        self.labels: np.ndarray | None
        if params.manifest is not None:
            files, self.labels = read_manifest(
                regular_file(base_dir / params.manifest, "data.manifest"), params.file_column, params.label_column
            )
            self.files = self._confined(files, base_dir / params.manifest)
            absent = next((f for f in self.files if not f.is_file()), None)
            if absent is not None:
                raise UserError(f"data.manifest: {absent} (listed in {params.manifest}) is not a file")
        else:
            self.files = find_images(self.folder)
            if not self.files:
                raise UserError(f"data.path: {self.folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            self.labels = self._folder_labels(params.labels)
        self._executor: ThreadPoolExecutor | None = None
        if params.output_size is None:
            self.sample_shape = params.sample_shape(*self._check_one_size())
        else:
            self.sample_shape = params.sample_shape(*params.output_size[::-1])

    def _confined(self, files: list[str], manifest: Path) -> list[Path]:
        """The paths of the manifest's *files*, each inside the folder (no ``..`` out of it, no absolute
        path elsewhere, no link leading out): a manifest never makes a run read a file outside data.path."""
        root = self.folder.resolve()
        paths = [self.folder / file for file in files]
        outside = next((i for i, path in enumerate(paths) if not path.resolve().is_relative_to(root)), None)
        if outside is not None:
            raise UserError(
                f"data.manifest: {manifest}: entry {outside + 1} ('{files[outside]}') lies outside {self.folder} "
                "(data.path); a manifest lists images inside that folder"
            )
        return paths

    def _folder_labels(self, mode: str) -> np.ndarray | None:
        """The class folder of each image (labels auto/folders), or None."""
        parts = [f.relative_to(self.folder).parts for f in self.files]
        nested = [len(p) > 1 for p in parts]
        if mode == "none" or mode == "auto" and not any(nested):
            return None
        if not all(nested):
            loose = self.files[nested.index(False)]
            raise UserError(
                f"data.labels: {loose} sits outside any class folder of {self.folder}; move it into "
                "one, or set labels: none"
            )
        return np.asarray([p[0] for p in parts])

    def _check_one_size(self) -> tuple[int, int]:
        """The (width, height) of every image, the same (read from the headers), since no step fixes the size."""
        first: tuple[Path, tuple[int, int]] | None = None
        for path in self.files:
            with opened_image(path, max_pixels=self.params.max_pixels) as image:
                size = image.size
            if first is None:
                first = (path, size)
            elif size != first[1]:
                raise UserError(
                    f"data: the images differ in size ({first[0]} is {first[1][0]}×{first[1][1]}, "
                    f"{path} is {size[0]}×{size[1]}); set resize: [h, w] or center_crop to give "
                    "every sample one shape"
                )
        assert first is not None  # the source holds at least one image (checked when it is made)
        return first[1]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def read(self, indices):
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.params.threads, thread_name_prefix="layerscope-images")
        files = [self.files[i] for i in indices]
        batch = np.empty((len(files), *self.sample_shape), np.float32)  # each thread decodes into its sample
        budget = PixelBudget(self.params.max_pixels)  # images decoded at once hold at most max_pixels together
        for _ in self._executor.map(lambda k: self.params(files[k], out=batch[k], budget=budget), range(len(files))):
            pass
        return batch, self.read_labels(indices)

    def read_labels(self, indices):
        return self.labels[indices] if self.labels is not None else None

    def describe(self) -> str:
        return f"images {self.folder}"

    def describe_labels(self) -> str:
        return f"'{self.params.label_column}' of {self.params.manifest}" if self.params.manifest else "class folders"


@hookimpl
def register_data_sources(register):
    register(ImagesSource)
