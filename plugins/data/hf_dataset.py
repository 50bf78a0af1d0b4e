"""The ``hf_dataset`` data source: a Hugging Face ``datasets`` dataset on this machine
(``pip install "layerscope[hf]"``; nothing is downloaded).

The dataset is a folder written by ``save_to_disk`` (``path``; a ``DatasetDict`` needs ``split``
unless it has one split), or local files read by one of the packaged builders (``data_files`` with
``builder``: csv, json, parquet, arrow, text or imagefolder, default from the files' suffix; their
arrow cache goes to layerscope's cache folder). No dataset script is ever run.

Columns feed the model:

- ``inputs: image`` (one column: the model's only input) or ``inputs: {pixel_values: image, …}``;
  an image column goes through the same preprocessing as the ``images`` source (``color``,
  ``resize``, ``center_crop``, ``scale``, ``normalize``, ``layout``), a numeric column is stacked
  as it is (every row one shape);
- ``text: sentence`` with ``tokenizer: path/to/tokenizer`` (a folder written by a ``transformers``
  tokenizer's ``save_pretrained``, loaded with ``local_files_only``): each text is tokenized to
  ``max_length`` tokens (padded and truncated, so every batch has one sequence length) and the
  ``tokens`` it produces (default ``input_ids`` and ``attention_mask``) feed the inputs of those names.

``label`` names the label column; a ``ClassLabel`` column gives its class names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import numpy as np
from pydantic import Field, PositiveInt, model_validator

from layerscope import DataSource, hookimpl
from layerscope.util.errors import UserError
from layerscope.util.files import cache_dir

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
    max_length: PositiveInt = Field(128, description="text: tokens per sample (padded and truncated)")
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


def _load(params: HFDatasetParams, base_dir: Path):
    """The dataset (one split) the params name; a missing or unreadable one is a user error."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if params.path is not None:
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


class HFDatasetSource(DataSource):
    name = "hf_dataset"
    Params = HFDatasetParams
    params: HFDatasetParams

    def __init__(self, params, base_dir, seed=0):
        super().__init__(params, base_dir, seed)
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise UserError(
                'data.source: hf_dataset needs the datasets package: pip install "layerscope[hf]"'
            ) from None
        self.dataset = _load(params, base_dir)
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
        try:
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as error:  # transformers' errors for a folder without a tokenizer
            raise UserError(f"data.tokenizer: cannot load a tokenizer from {folder} ({error})") from None

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def has_labels(self) -> bool:
        return self.params.label is not None

    def _column(self, rows: dict, column: str, indices: np.ndarray) -> np.ndarray:
        """A column of *rows* as one array: images preprocessed, numbers stacked."""
        from datasets import Image

        values = rows[column]
        if isinstance(self.dataset.features[column], Image):
            return np.stack(
                [
                    self.params.process(self.params.converted(image), f"row {i} of column '{column}'")
                    for image, i in zip(values, indices)
                ]
            )
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
        rows = self.dataset[[int(i) for i in indices]]
        x = {name: self._column(rows, column, indices) for name, column in self.named.items()}
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
        return self._labels(self.dataset.select_columns([self.params.label])[[int(i) for i in indices]])

    def _labels(self, rows: dict) -> np.ndarray | None:
        if self.params.label is None:
            return None
        from datasets import ClassLabel

        values = np.asarray(rows[self.params.label])
        feature = self.dataset.features[self.params.label]
        return np.asarray(feature.names)[values] if isinstance(feature, ClassLabel) else values

    def describe(self) -> str:
        return f"hf_dataset {self.params.path or self.params.data_files}"

    def describe_labels(self) -> str:
        return f"column '{self.params.label}'"


@hookimpl
def register_data_sources(register):
    register(HFDatasetSource)
