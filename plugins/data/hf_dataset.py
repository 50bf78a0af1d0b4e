"""The ``hf_dataset`` data source: a Hugging Face ``datasets`` dataset on this machine
(``pip install "layerscope[hf]"``; nothing is downloaded).

The dataset is a folder written by ``save_to_disk`` (``path``; a ``DatasetDict`` needs ``split``
unless it has one split), or local files read by one of the packaged builders (``data_files`` with
``builder``: csv, json, parquet, arrow, text or imagefolder, default from the files' suffix; their
arrow cache goes to layerscope's cache folder). No dataset script is ever run, and a saved folder
reads only files inside it (the arrow files its ``state.json`` files name and the splits of its
``dataset_dict.json``: a ``..``, an absolute path or a link leading out is refused).

Columns feed the model:

- ``inputs: image`` (one column: the model's only input) or ``inputs: {pixel_values: image, …}``;
  an image column goes through the same preprocessing as the ``images`` source (``color``,
  ``resize``, ``center_crop``, ``scale``, ``normalize``, ``layout``, ``max_pixels``; decoded by
  layerscope, one image at a time, from the bytes it stores, or from the file a stored path names
  inside the saved dataset's folder or the data files' folders, relative paths from there), a
  numeric column is stacked as it is (every row one shape);
- ``text: sentence`` with ``tokenizer: path/to/tokenizer`` (a folder written by a ``transformers``
  tokenizer's ``save_pretrained``, loaded with ``local_files_only`` and never with its own code: a
  folder whose ``auto_map`` asks for custom code is refused): each text is tokenized to
  ``max_length`` tokens (padded and truncated, so every batch has one sequence length) and the
  ``tokens`` it produces (default ``input_ids`` and ``attention_mask``) feed the inputs of those names.

``label`` names the label column; a ``ClassLabel`` column gives its class names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from pydantic import Field, model_validator

from layerscope import DataSource, hookimpl
from layerscope.util.errors import UserError
from layerscope.util.files import cache_dir, regular_file
from layerscope.util.params import Count

from .image_preprocessing import ImagePreprocessing

Builder = Literal["csv", "json", "parquet", "arrow", "text", "imagefolder"]
BUILDERS = get_args(Builder)
SUFFIX_BUILDERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}


class HFDatasetParams(ImagePreprocessing):
    path: str | None = Field(None, description="a folder written by save_to_disk, relative to the spec")
    data_files: str | list[str] | None = Field(None, description="local data files (relative to the spec)")
    builder: Builder | None = Field(None, description="how data_files are read (default: their suffix)")
    split: str | None = Field(None, description="the split of a DatasetDict (default: its only split)")
    inputs: str | dict[str, str] | None = Field(
        None, description="the column feeding the only model input, or model input name -> column"
    )
    text: str | None = Field(None, description="a text column, tokenized into the tokens inputs")
    tokenizer: str | None = Field(None, description="text: a local tokenizer folder (save_pretrained)")
    max_length: Count = Field(128, description="text: tokens per sample (padded and truncated)")
    tokens: list[str] = Field(
        ["input_ids", "attention_mask"],
        min_length=1,
        description="text: the tokenizer outputs fed to the model inputs of those names",
    )
    label: str | None = Field(None, description="the label column (none: no labels)")

    @model_validator(mode="after")
    def _consistent(self) -> HFDatasetParams:
        if (self.path is None) == (self.data_files is None):
            raise ValueError("give either path (a save_to_disk folder) or data_files (local files)")
        if self.inputs is None and self.text is None:
            raise ValueError("name the columns that feed the model: inputs (and/or text with a tokenizer)")
        if (self.text is None) != (self.tokenizer is None):
            raise ValueError("text and tokenizer go together")
        if self.text is not None and isinstance(self.inputs, str):
            raise ValueError("with text, give inputs as {model input: column}: the tokens are named inputs")
        return self


def _json_file(path: Path):
    """The content of a JSON file of a saved dataset; an unreadable one is a user error naming it."""
    try:
        return json.loads(regular_file(path, "data.path").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"data.path: {path} is not readable JSON ({error})") from None


def _confined(listing: Path, entries, folder: Path, what: str) -> None:
    """Every path of *entries* (read from the file *listing*) lies inside *folder*, links followed."""
    if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
        raise UserError(f"data.path: {listing}: {what} are not a list of file names")
    root = folder.resolve()
    outside = next((entry for entry in entries if not (folder / entry).resolve().is_relative_to(root)), None)
    if outside is not None:
        raise UserError(
            f"data.path: {listing}: '{outside}' lies outside {folder}; a saved dataset reads only files inside "
            "its folder"
        )


def _check_saved(folder: Path) -> None:
    """The files a ``save_to_disk`` folder names lie inside it (checked before datasets reads any): the
    splits of ``dataset_dict.json`` and the arrow files of each ``state.json``. Which files datasets reads
    follows ``load_from_disk``: a Dataset folder has ``dataset_info.json`` and ``state.json``, else a
    DatasetDict folder ``dataset_dict.json`` (anything else is refused by datasets itself)."""

    def check_dataset(where: Path) -> bool:
        if not ((where / "dataset_info.json").is_file() and (where / "state.json").is_file()):
            return False
        state = _json_file(where / "state.json")
        files = state.get("_data_files") if isinstance(state, dict) else None
        names = [f.get("filename") if isinstance(f, dict) else f for f in files] if isinstance(files, list) else None
        _confined(where / "state.json", names, where, "_data_files")
        return True

    if check_dataset(folder) or not (folder / "dataset_dict.json").is_file():
        return
    listing = folder / "dataset_dict.json"
    content = _json_file(listing)
    splits = content.get("splits") if isinstance(content, dict) else None
    _confined(listing, splits, folder, "splits")
    for split in splits or ():
        check_dataset(folder / split)


def _load(params: HFDatasetParams, base_dir: Path):
    """The dataset (one split) the params name; a missing or unreadable one is a user error."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if params.path is not None:
            _check_saved(base_dir / params.path)
            loaded = datasets.load_from_disk(str(base_dir / params.path))
            where = f"data.path: {base_dir / params.path}"
        else:
            # the validator: data_files is given when path is not
            files = [params.data_files] if isinstance(params.data_files, str) else params.data_files or []
            files = [str(base_dir / f) for f in files]
            builder = params.builder or SUFFIX_BUILDERS.get(Path(files[0]).suffix.lower())
            if builder is None:
                raise UserError(
                    f"data.builder: cannot tell how to read {files[0]}; set builder ({', '.join(BUILDERS)})"
                )
            where = f"data.data_files: {', '.join(files)}"
            loaded = datasets.load_dataset(builder, data_files=files, cache_dir=str(cache_dir() / "hf-datasets"))
    except UserError:
        raise
    except Exception as error:  # FileNotFoundError, datasets' own errors for a folder that is no dataset
        raise UserError(f"data: cannot load the dataset ({type(error).__name__}: {error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        split = params.split or (splits[0] if len(splits) == 1 else None)
        if split not in loaded:
            raise UserError(f"data.split: {where} has the splits {', '.join(splits)}; name one")
        loaded = loaded[split]
    return loaded


def _custom_tokenizer_code(folder: Path) -> str | None:
    """What in a tokenizer *folder* asks for code of its own (an ``auto_map`` naming a module of the folder for
    ``AutoTokenizer``), or None. transformers, told not to trust such code, would still load a class of its
    own that the folder also names, a tokenizer other than the one the folder declares: refused instead."""
    for name, tokenizer_only in (("tokenizer_config.json", True), ("config.json", False)):
        path = folder / name
        if not path.is_file():
            continue
        try:
            config = json.loads(regular_file(path, "data.tokenizer").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"data.tokenizer: {path} is not readable JSON ({error})") from None
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        if auto_map and (tokenizer_only or not isinstance(auto_map, dict) or "AutoTokenizer" in auto_map):
            entry = auto_map.get("AutoTokenizer", auto_map) if isinstance(auto_map, dict) else auto_map
            return f"auto_map in {name}: {json.dumps(entry)}"
    return None


def _feature_name(feature) -> str:
    """How an error names a datasets feature: its dtype or type (a list of int64, …)."""
    inner = getattr(feature, "feature", None)
    if inner is not None:
        return f"lists of {_feature_name(inner)}"
    return getattr(feature, "dtype", None) or type(feature).__name__


def _image_roots(params: HFDatasetParams, base_dir: Path) -> list[Path]:
    """The folders (resolved) an image column's stored paths may name, the first also where relative ones
    start: a saved dataset's folder, or the folders of the data files (up to a pattern's first wildcard)."""
    if params.path is not None:
        return [(base_dir / params.path).resolve()]
    roots = []
    for pattern in [params.data_files] if isinstance(params.data_files, str) else params.data_files or []:
        parts = Path(pattern).parts
        wild = next((k for k, part in enumerate(parts) if any(c in part for c in "*?[{")), None)
        roots.append((base_dir / (Path(*parts[:wild]) if wild is not None else Path(pattern).parent)).resolve())
    return list(dict.fromkeys(roots))


class HFDatasetSource(DataSource):
    name = "hf_dataset"
    Params = HFDatasetParams
    params: HFDatasetParams

    def __init__(self, params, base_dir, seed=0):
        super().__init__(params, base_dir, seed)
        try:
            import datasets
        except ImportError:
            raise UserError(
                'data.source: hf_dataset needs the datasets package: pip install "layerscope[hf]"'
            ) from None
        self.dataset = _load(params, base_dir)
        files = [params.data_files] if isinstance(params.data_files, str) else params.data_files
        self.location = (
            base_dir / params.path if params.path is not None else ", ".join(str(base_dir / f) for f in files)
        )
        columns = list(self.dataset.column_names)
        named = {None: params.inputs} if isinstance(params.inputs, str) else dict(params.inputs or {})
        for key, column in [
            *((f"data.inputs{'.' + n if n else ''}", c) for n, c in named.items()),
            ("data.text", params.text),
            ("data.label", params.label),
        ]:
            if column is not None and column not in columns:
                raise UserError(f"{key}: the dataset has no column '{column}' (its columns: {', '.join(columns)})")
        self.named = named
        self._check_label()
        # read without datasets' decoding: image columns as their stored {bytes, path} (decoded here, bounded
        # and confined), the others as Python values (whatever format the saved state.json asks for)
        self.images = {c for c in named.values() if isinstance(self.dataset.features[c], datasets.Image)}
        plain = [c for c in dict.fromkeys([*named.values(), params.text, params.label]) if c and c not in self.images]
        self._plain = self.dataset.select_columns(plain).with_format(None) if plain else None
        self._stored = self.dataset.select_columns(sorted(self.images)).with_format("arrow")
        self._image_roots = _image_roots(params, base_dir)
        # text and tokenizer come together
        self.tokenizer = self._tokenizer(base_dir / params.tokenizer) if params.tokenizer is not None else None

    def _tokenizer(self, folder: Path):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise UserError(
                'data.tokenizer: tokenizing text needs transformers: pip install "layerscope[transformers]"'
            ) from None
        if not folder.is_dir():
            raise UserError(f"data.tokenizer: {folder} is not a folder (save a tokenizer with save_pretrained)")
        custom = _custom_tokenizer_code(folder)
        if custom is not None:
            raise UserError(
                f"data.tokenizer: {folder} needs custom code ({custom}); layerscope never runs code from a "
                "tokenizer folder: save a tokenizer of a class transformers has (e.g. its fast tokenizer)"
            )
        try:
            # trust_remote_code=False: never run the folder's code, and never ask on stdin whether to
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        except Exception as error:  # transformers' errors for a folder without a tokenizer
            raise UserError(f"data.tokenizer: cannot load a tokenizer from {folder} ({error})") from None

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def has_labels(self) -> bool:
        return self.params.label is not None

    def _check_label(self) -> None:
        """The label column holds one class per row: a ClassLabel, integers, floats, booleans or strings."""
        from datasets import ClassLabel, Value

        if self.params.label is None:
            return
        feature = self.dataset.features[self.params.label]
        kinds = ("bool", "int", "uint", "float", "string", "large_string")
        if not (isinstance(feature, ClassLabel) or isinstance(feature, Value) and feature.dtype.startswith(kinds)):
            raise UserError(
                f"data.label: column '{self.params.label}' of {self.location} holds "
                f"{_feature_name(feature)}, not one class per row; name a column of integers or strings"
            )

    def _images(self, stored: list, column: str, indices: np.ndarray) -> np.ndarray:
        """The images stored in *column* at *indices* (``{bytes, path}`` each) through the preprocessing, into
        one batch; a missing, unreadable or oversized image, or a path outside the dataset, names the row."""
        batch = None
        for k, (value, index) in enumerate(zip(stored, indices)):
            where = f"{self.location}: row {index} of column '{column}'"
            source = self._image_source(value, where)
            if batch is None:
                first = self.params(source, where)
                batch = np.empty((len(stored), *first.shape), np.float32)
                batch[0] = first
            else:
                self.params(source, where, out=batch[k])
        return batch if batch is not None else np.zeros((0,), np.float32)

    def _image_source(self, value, where: str) -> bytes | Path:
        """The bytes of a stored image, or the file its path names: inside the dataset's folder (a saved
        dataset) or the folders of the data files (relative paths start from the first)."""
        if isinstance(value, dict) and value.get("bytes") is not None:
            return value["bytes"]
        path = value.get("path") if isinstance(value, dict) else None
        if not path:
            raise UserError(f"data: {where} holds no image")
        file = self._image_roots[0] / path
        if not any(file.resolve().is_relative_to(root) for root in self._image_roots):
            raise UserError(
                f"data: {where} names the file '{path}', outside {', '.join(map(str, self._image_roots))}; "
                "a dataset's images are read only from its own folders"
            )
        return regular_file(file, f"data: {where}")

    def _column(self, rows: dict, column: str, indices: np.ndarray) -> np.ndarray:
        """A non-image column of *rows* as one array: numbers stacked."""
        values = rows[column]
        try:
            array = np.asarray(values)
        except ValueError:
            raise UserError(
                f"data: the rows of column '{column}' differ in shape (rows {indices[:5].tolist()}…)"
            ) from None
        if array.dtype.kind not in "biuf":
            raise UserError(
                f"data: column '{column}' is not numeric ({array.dtype}); text goes through text: and a tokenizer"
            )
        return array

    def read(self, indices):
        indices = np.asarray(indices)
        keys = [int(i) for i in indices]
        rows = self._plain[keys] if self._plain is not None else {}
        stored = self._stored[keys] if self.images else {}
        x = {
            name: self._images(stored[column].to_pylist(), column, indices)
            if column in self.images
            else self._column(rows, column, indices)
            for name, column in self.named.items()
        }
        if self.tokenizer is not None:
            encoded = self.tokenizer(
                list(rows[self.params.text]),
                padding="max_length",
                truncation=True,
                max_length=self.params.max_length,
                return_tensors="np",
            )
            missing = [t for t in self.params.tokens if t not in encoded]
            if missing:
                raise UserError(
                    f"data.tokens: the tokenizer gives no {', '.join(missing)} (it gives: {', '.join(encoded)})"
                )
            x.update({name: np.asarray(encoded[name]) for name in self.params.tokens})
        return x[None] if None in x else x, self._labels(rows)

    def read_labels(self, indices):
        if self.params.label is None:
            return None
        assert self._plain is not None  # the label column is one of the plain columns
        return self._labels(self._plain.select_columns([self.params.label])[[int(i) for i in indices]])

    def _labels(self, rows: dict) -> np.ndarray | None:
        if self.params.label is None:
            return None
        from datasets import ClassLabel

        values = np.asarray(rows[self.params.label])
        feature = self.dataset.features[self.params.label]
        if not isinstance(feature, ClassLabel):
            return values
        if values.dtype.kind not in "iu" or values.size and not 0 <= values.min() <= values.max() < len(feature.names):
            bad = next(v for v in values.tolist() if not (isinstance(v, int) and 0 <= v < len(feature.names)))
            raise UserError(
                f"data.label: column '{self.params.label}' holds {bad!r}, not one of its {len(feature.names)} "
                "classes (-1: no label)"
            )
        return np.asarray(feature.names)[values]

    def describe(self) -> str:
        return f"hf_dataset {self.params.path or self.params.data_files}"

    def describe_labels(self) -> str:
        return f"column '{self.params.label}'"


@hookimpl
def register_data_sources(register):
    register(HFDatasetSource)
