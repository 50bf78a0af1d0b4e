"""The ``hf_dataset`` data source: Hugging Face datasets saved on disk or read from local files, image
columns through the images preprocessing, text through a local tokenizer; nothing is downloaded.

datasets (which imports pandas and pyarrow) is imported by the ``datasets`` fixture, not when the module
is collected."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import layerscope
from layerscope.plugins.data.hf_dataset import HFDatasetSource
from layerscope.util.errors import UserError

from .conftest import digit_image_folder, one_user_error, run_in_subprocess

ENTROPY = [{"id": "entropy", "estimator": "activation_entropy"}]


@pytest.fixture(autouse=True)
def datasets():
    """The ``datasets`` module; every test here is skipped without it."""
    return pytest.importorskip("datasets")


def _run(model, data: dict, analyses=ENTROPY) -> list[dict]:
    return layerscope.run(
        {"model": {"source": model}, "data": data, "analyses": analyses}, write=False, progress=False
    ).records


def test_an_image_dataset_on_disk_gives_the_records_of_the_image_folder(tmp_path, datasets):
    """The same PNG files as an image column (rows in the folder's order), the same preprocessing."""
    from PIL import Image

    folder, _, names = digit_image_folder(tmp_path, 120)
    files = sorted(folder.rglob("*.png"), key=lambda p: p.relative_to(folder).parts)
    classes = sorted(set(names))
    features = datasets.Features({"picture": datasets.Image(), "digit": datasets.ClassLabel(names=classes)})
    table = datasets.Dataset.from_dict(
        {"picture": [Image.open(f) for f in files], "digit": [classes.index(n) for n in names]}, features=features
    )
    table.save_to_disk(str(tmp_path / "saved"))
    prep = {"color": "grey", "resize": [12, 12], "center_crop": 8, "normalize": {"mean": [0.2], "std": [0.3]}}
    common = {"batch_size": 25, "limit": 100, **prep}
    analyses = ENTROPY + [{"id": "signature", "estimator": "nonlinearity_signature"}]
    from_folder = _run("demo:digits-cnn", {"source": "images", "path": str(folder), **common}, analyses)
    from_dataset = _run(
        "demo:digits-cnn",
        {"source": "hf_dataset", "path": str(tmp_path / "saved"), "inputs": "picture", "label": "digit", **common},
        analyses,
    )
    assert len(from_dataset) == len(from_folder) > 20
    assert from_dataset == from_folder  # class names from the ClassLabel, identical values


def test_local_files_through_a_packaged_builder(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSCOPE_CACHE", str(tmp_path / "cache"))
    rows = "\n".join(f'{{"features": {[float(i), float(i) / 2] * 32}, "kind": "{"ab"[i % 2]}"}}' for i in range(30))
    (tmp_path / "rows.jsonl").write_text(rows + "\n")
    source = HFDatasetSource(HFDatasetSource.Params(data_files="rows.jsonl", inputs="features", label="kind"), tmp_path)
    x, y = source.read(np.array([3, 0]))
    assert len(source) == 30 and x.shape == (2, 64) and x[0, :2].tolist() == [3.0, 1.5] and y.tolist() == ["b", "a"]
    assert (tmp_path / "cache" / "hf-datasets").is_dir()  # the arrow cache, not ~/.cache/huggingface


VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "a",
    "mat",
    "far",
    "and",
    "slept",
    "very",
    "fast",
]


def _tokenizer(folder: Path) -> Path:
    """A BERT word-piece tokenizer over VOCAB, saved like a downloaded one."""
    from transformers import BertTokenizerFast

    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder / "tokenizer"))
    return folder / "tokenizer"


@pytest.mark.slow
def test_text_is_tokenized_into_the_inputs_of_a_bert_model(tmp_path, datasets):
    """Sentences tokenized by a local tokenizer feed BERT's input_ids and attention_mask: the records equal
    those of the tokenizer's own arrays through npz, and padding (max_length 12) never counts."""
    transformers = pytest.importorskip("transformers")
    import torch
    from transformers import AutoTokenizer

    tokenizer_dir = _tokenizer(tmp_path)
    rng = np.random.default_rng(0)
    words = VOCAB[5:]
    sentences = [" ".join(rng.choice(words, rng.integers(2, 9))) for _ in range(40)]
    labels = rng.integers(0, 2, 40)
    datasets.Dataset.from_dict({"sentence": sentences, "label": labels}).save_to_disk(str(tmp_path / "saved"))
    encoded = AutoTokenizer.from_pretrained(str(tokenizer_dir))(
        sentences, padding="max_length", truncation=True, max_length=12, return_tensors="np"
    )
    np.savez(tmp_path / "tokens.npz", ids=encoded["input_ids"], mask=encoded["attention_mask"], y=labels)
    torch.manual_seed(0)
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    )
    analyses = ENTROPY + [{"id": "signature", "estimator": "nonlinearity_signature"}]
    common = {"batch_size": 10, "shuffle": False}
    from_text = _run(
        bert,
        {
            "source": "hf_dataset",
            "path": str(tmp_path / "saved"),
            "text": "sentence",
            "tokenizer": str(tokenizer_dir),
            "max_length": 12,
            "label": "label",
            **common,
        },
        analyses,
    )
    from_npz = _run(
        bert,
        {
            "source": "npz",
            "path": str(tmp_path / "tokens.npz"),
            "inputs": {"input_ids": "ids", "attention_mask": "mask"},
            **common,
        },
        analyses,
    )
    assert len(from_text) == len(from_npz) > 5
    for a, b in zip(from_text, from_npz):
        assert {k: v for k, v in a.items() if k != "value"} == {k: v for k, v in b.items() if k != "value"}
        assert a["value"] == pytest.approx(b["value"], rel=1e-9, abs=1e-12)


def test_bad_datasets_are_user_errors(tmp_path, datasets):
    datasets.Dataset.from_dict({"a": [[1.0, 2.0], [3.0, 4.0]], "t": ["x", "y"]}).save_to_disk(str(tmp_path / "s"))
    cases = [
        ({"path": "s", "inputs": "b"}, r"data.inputs: the dataset has no column 'b' \(its columns: a, t\)"),
        ({"path": "nothere", "inputs": "a"}, r"data: cannot load the dataset \(FileNotFoundError"),
        ({"path": "s", "inputs": "a", "label": "z"}, r"data.label: the dataset has no column 'z'"),
        ({"path": "s", "inputs": "a", "text": "t", "tokenizer": "tok"}, "give inputs as {model input: column}"),
        ({"path": "s", "inputs": {"x": "a"}, "text": "t", "tokenizer": "none"}, r"data.tokenizer: .*none is not"),
        ({"path": "s", "inputs": "t"}, r"column 't' is not numeric"),
    ]
    for params, message in cases:
        with pytest.raises((UserError, ValueError), match=message):
            source = HFDatasetSource(HFDatasetSource.Params(**params), tmp_path)
            source.read(np.array([0, 1]))
    with pytest.raises(ValueError, match="either path .* or data_files"):
        HFDatasetSource.Params(inputs="a")


def test_an_image_folder_through_the_imagefolder_builder(tmp_path, monkeypatch):
    """Local image files read by datasets' imagefolder builder: class names from the folders, pixels
    through the images preprocessing (the same arrays the images source gives)."""
    monkeypatch.setenv("LAYERSCOPE_CACHE", str(tmp_path / "cache"))
    from layerscope.plugins.data.images import ImagesSource

    digit_image_folder(tmp_path, 30)
    source = HFDatasetSource(
        HFDatasetSource.Params(
            data_files="digits/**", builder="imagefolder", inputs="image", label="label", color="grey", scale=1 / 240
        ),
        tmp_path,
    )
    x, y = source.read(np.arange(len(source)))
    images = ImagesSource(ImagesSource.Params(path="digits", color="grey", scale=1 / 240), tmp_path)
    expected, expected_names = images.read(np.arange(len(images)))
    order = np.lexsort(x.reshape(len(x), -1).T[::-1])  # both sets sorted by pixels: the builders' orders differ
    reference = np.lexsort(expected.reshape(len(expected), -1).T[::-1])
    np.testing.assert_array_equal(x[order], expected[reference])
    assert y[order].tolist() == expected_names[reference].tolist() and len(source) == 30


def _token_model(path: Path, length: int) -> Path:
    """A real ONNX model of input_ids and attention_mask (int64, batch × length): relu(ids · mask)."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", length]) for n in ("input_ids", "attention_mask")
    ]
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["ids", "mask"], ["product"]),
        helper.make_node("Relu", ["product"], ["y"]),
    ]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", length])
    model = helper.make_model(
        helper.make_graph(nodes, "tokens", inputs, [output]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("declared_class", ["EvilTokenizer", "BertTokenizer"])
def test_a_tokenizer_with_custom_code_never_runs_it_even_when_stdin_says_yes(tmp_path, declared_class, datasets):
    """A tokenizer folder whose tokenizer_config.json maps AutoTokenizer to a module of its own: transformers
    would ask on stdin whether to run it; answered "y", it must still not run, and the run exits 2 naming
    data.tokenizer and the folder (whether or not the folder also names a class transformers has)."""
    import json

    pytest.importorskip("transformers")
    tokenizer = _tokenizer(tmp_path)
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}, tokenizer_class=declared_class)
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    marker = tmp_path / "MARKER"
    (tokenizer / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertTokenizerFast\n\n\nclass EvilTokenizer(BertTokenizerFast):\n    pass\n"
    )
    datasets.Dataset.from_dict({"sentence": ["the cat sat", "a dog ran"], "label": [0, 1]}).save_to_disk(
        str(tmp_path / "saved")
    )
    _token_model(tmp_path / "tokens.onnx", 8)
    (tmp_path / "spec.yaml").write_text(
        "model: {source: tokens.onnx}\n"
        "data: {source: hf_dataset, path: saved, text: sentence, tokenizer: tokenizer, max_length: 8, label: label}\n"
        "analyses: [{id: e, estimator: activation_entropy}]\n"
    )
    done = run_in_subprocess(
        tmp_path / "spec.yaml",
        tmp_path / "out",
        input="y\ny\ny\n",
        env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")},
        timeout=300,
    )
    assert not marker.exists(), "the tokenizer's module ran"
    err = one_user_error(done, tmp_path / "out")
    assert f"data.tokenizer: {tokenizer}" in err and "custom code" in err


@pytest.mark.parametrize("how", ["climbing", "absolute", "link", "split"])
def test_a_saved_dataset_never_reads_files_outside_its_folder(tmp_path, how, datasets):
    """The arrow files a save_to_disk folder's state.json names (and the splits its dataset_dict.json
    names) must lie inside it: a '..' path, an absolute path or a link leading out is refused naming the
    file and the entry, and the files outside are never read."""
    import json
    import shutil

    datasets.Dataset.from_dict({"a": [[1.0, 2.0], [3.0, 4.0]]}).save_to_disk(str(tmp_path / "elsewhere"))
    datasets.Dataset.from_dict({"a": [[5.0, 6.0]]}).save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "elsewhere").glob("*.arrow"))
    state_file = tmp_path / "saved" / "state.json"
    state = json.loads(state_file.read_text())
    if how == "split":
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"a": [[5.0, 6.0]]})}).save_to_disk(
            str(tmp_path / "dict")
        )
        (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["../elsewhere"]}))
        path, listing, entry = "dict", tmp_path / "dict" / "dataset_dict.json", "../elsewhere"
    else:
        entry = {"climbing": "../elsewhere/" + arrow.name, "absolute": str(arrow), "link": "link.arrow"}[how]
        if how == "link":
            (tmp_path / "saved" / "link.arrow").symlink_to(arrow)
        for name in state["_data_files"]:
            (tmp_path / "saved" / name["filename"]).unlink()
        state["_data_files"] = [{"filename": entry}]
        state_file.write_text(json.dumps(state))
        path, listing = "saved", state_file
    with pytest.raises(UserError, match=rf"data.path: {listing}: '{re.escape(entry)}' lies outside"):
        source = HFDatasetSource(HFDatasetSource.Params(path=path, inputs="a"), tmp_path)
        source.read(np.array([0]))
    shutil.rmtree(tmp_path / "elsewhere")  # nothing of it was kept open


def _png_bytes(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _bomb_bytes(width: int, height: int) -> bytes:
    """A PNG whose header says width × height, a few hundred bytes long."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "stored, message",
    [
        (_bomb_bytes(50_000, 50_000), r"row 1 of column 'img' has 2,500,000,000 pixels, more than layerscope decodes"),
        (b"these bytes are no image", r"row 1 of column 'img' is not a readable image"),
        ("PATH", r"row 1 of column 'img' names the file '.*outside.png', outside"),
    ],
    ids=["bomb", "undecodable", "path outside"],
)
def test_a_bad_image_in_an_image_column_is_exit_2_naming_the_dataset_and_row(tmp_path, stored, message, datasets):
    """Images stored in a saved dataset are decoded by layerscope: a decompression bomb, bytes that are no
    image and a stored path outside the dataset's folder are user errors naming the dataset, row and column
    (a bomb or bad bytes were tracebacks; a path anywhere was read)."""

    import pyarrow as pa

    outside = tmp_path / "outside.png"
    outside.write_bytes(_png_bytes(np.full((8, 8), 9, np.uint8)))
    bad = {"bytes": None, "path": str(outside)} if stored == "PATH" else {"bytes": stored, "path": None}
    features = datasets.Features({"img": datasets.Image(), "y": datasets.Value("int64")})
    good = {"bytes": _png_bytes(np.zeros((8, 8), np.uint8)), "path": None}
    datasets.Dataset.from_dict({"img": [good, good], "y": [0, 1]}, features=features).save_to_disk(
        str(tmp_path / "saved")
    )
    # save_to_disk embeds the files of stored paths: write the bad row into the arrow file as it is
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    with pa.memory_map(str(arrow)) as source:
        table = pa.ipc.open_stream(source).read_all()
    column = pa.array([good, bad], type=table.schema.field("img").type)
    table = table.set_column(0, table.schema.field("img"), column)
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (tmp_path / "spec.yaml").write_text(
        "model: {source: demo:digits-cnn}\n"
        "data: {source: hf_dataset, path: saved, inputs: img, label: y, color: grey, resize: [8, 8]}\n"
        "analyses: [{id: e, estimator: activation_entropy}]\n"
    )
    err = one_user_error(run_in_subprocess(tmp_path / "spec.yaml", tmp_path / "out"), tmp_path / "out")
    assert re.search(rf"data: {tmp_path / 'saved'}: {message}", err), err


def test_stored_image_paths_are_read_inside_the_data_files_folders(tmp_path, monkeypatch, datasets):
    """The imagefolder builder stores paths, which are read (inside the folder the data files name); a
    Parquet file naming an image outside its folder is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("LAYERSCOPE_CACHE", str(tmp_path / "cache"))
    digit_image_folder(tmp_path, 10)
    source = HFDatasetSource(
        HFDatasetSource.Params(data_files="digits/**", builder="imagefolder", inputs="image", color="grey"), tmp_path
    )
    assert source.read(np.arange(10))[0].shape == (10, 1, 8, 8)
    (tmp_path / "table").mkdir()
    (tmp_path / "table" / "in.png").write_bytes(_png_bytes(np.zeros((8, 8), np.uint8)))
    features = datasets.Features({"img": datasets.Image()})
    rows = [{"bytes": None, "path": "in.png"}, {"bytes": None, "path": str(tmp_path / "digits" / "0" / "0000.png")}]
    stored = pa.array(rows, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"img": stored}).replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": features.to_dict()}})}
    )
    pq.write_table(table, tmp_path / "table" / "rows.parquet")
    source = HFDatasetSource(HFDatasetSource.Params(data_files="table/rows.parquet", inputs="img"), tmp_path)
    assert source.read(np.arange(1))[0].shape == (1, 3, 8, 8)  # relative paths start from the files' folder
    with pytest.raises(UserError, match=r"rows.parquet: row 1 of column 'img' names the file '.*0000.png', outside"):
        source.read(np.arange(2))


@pytest.mark.parametrize("how", ["parquet", "saved"])
def test_a_label_column_of_lists_is_refused_naming_it(tmp_path, monkeypatch, how, datasets):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("LAYERSCOPE_CACHE", str(tmp_path / "cache"))
    columns = {"x": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], "y": [[1, 2], [3], [4]]}
    if how == "parquet":
        pq.write_table(pa.table(columns), tmp_path / "d.parquet")
        params = {"data_files": str(tmp_path / "d.parquet")}
    else:
        datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "saved"))
        params = {"path": str(tmp_path / "saved")}
    with pytest.raises(UserError, match=r"data.label: column 'y' of .* holds lists of int64, not one class per row"):
        layerscope.run(
            {
                "model": {"source": "demo:digits-mlp"},
                "data": {"source": "hf_dataset", **params, "inputs": "x", "label": "y"},
                "analyses": ENTROPY,
            },
            write=False,
            progress=False,
        )


def test_a_class_label_of_minus_one_is_no_class(tmp_path, datasets):
    """Hugging Face marks a missing label -1 in a ClassLabel column: refused, never the last class."""
    features = datasets.Features({"x": datasets.Value("float32"), "y": datasets.ClassLabel(names=["a", "b"])})
    datasets.Dataset.from_dict({"x": [1.0, 2.0], "y": [0, -1]}, features=features).save_to_disk(str(tmp_path / "s"))
    source = HFDatasetSource(HFDatasetSource.Params(path="s", inputs="x", label="y"), tmp_path)
    with pytest.raises(UserError, match=r"data.label: column 'y' holds -1, not one of its 2 classes"):
        source.read_labels(np.arange(2))
