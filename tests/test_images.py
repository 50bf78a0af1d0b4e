"""The ``images`` data source: every preprocessing step equals a NumPy computation on known pixels,
records equal those of the same pixels through npz, and bad folders are user errors naming the file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import layerscope
from layerscope.plugins.data.images import ImagesSource
from layerscope.util.errors import SpecError, UserError

from .conftest import digit_image_folder

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _read(folder: Path, **params) -> np.ndarray:
    source = ImagesSource(ImagesSource.Params(path=str(folder), **params), Path("."))
    return source.read(np.arange(len(source)))[0]


@pytest.fixture
def rgb(tmp_path):
    """One 10×14 RGB image of known random pixels, alone in its folder."""
    pixels = np.random.default_rng(0).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    _save(tmp_path / "img" / "a.png", pixels)
    return tmp_path / "img", pixels


def test_scale_and_layout_give_the_pixels(rgb):
    folder, pixels = rgb
    expected = pixels.astype(np.float32) * np.float32(1 / 255)
    np.testing.assert_array_equal(_read(folder)[0], expected.transpose(2, 0, 1))
    np.testing.assert_array_equal(_read(folder, layout="nhwc")[0], expected)
    np.testing.assert_array_equal(_read(folder, scale=1.0)[0], pixels.transpose(2, 0, 1).astype(np.float32))


def test_grey_is_the_itu_601_luma(rgb):
    folder, pixels = rgb
    r, g, b = (pixels[..., c].astype(np.int64) for c in range(3))
    luma = (19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16
    np.testing.assert_array_equal(_read(folder, color="grey", scale=1.0)[0], luma[None].astype(np.float32))


def test_normalize_presets_and_explicit_values(rgb):
    folder, pixels = rgb
    scaled = pixels.astype(np.float32) * np.float32(1 / 255)
    np.testing.assert_allclose(
        _read(folder, normalize="imagenet")[0],
        ((scaled - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1),
        rtol=1e-6,
        atol=1e-6,
    )
    got = _read(folder, normalize={"mean": [0.5], "std": [0.25]}, layout="nhwc")[0]
    np.testing.assert_allclose(got, (scaled - 0.5) / 0.25, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="normalize.mean has 2 values; color rgb has 3 channels"):
        ImagesSource.Params(path=".", normalize={"mean": [0.5, 0.5], "std": [1.0]})


def test_center_crop_cuts_the_middle(rgb):
    folder, pixels = rgb
    got = _read(folder, center_crop=[4, 7], scale=1.0, layout="nhwc")[0]
    top, left = round((10 - 4) / 2), round((14 - 7) / 2)  # 3, 4 (round half to even, as torchvision)
    np.testing.assert_array_equal(got, pixels[top : top + 4, left : left + 7].astype(np.float32))
    with pytest.raises(UserError, match=r"a.png is 14×10 after resize, smaller than center_crop 16×16"):
        _read(folder, center_crop=16)


def test_resize_nearest_up_box_down_and_shorter_side(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.integers(4, 250, (6, 8), dtype=np.uint8)
    _save(tmp_path / "up" / "a.png", base)
    up = _read(tmp_path / "up", color="grey", resize=[12, 16], interpolation="nearest", scale=1.0)[0, 0]
    np.testing.assert_array_equal(up, np.repeat(np.repeat(base, 2, axis=0), 2, axis=1).astype(np.float32))
    # 2×2 blocks a, a, a+d, a-d: their mean is a exactly, what a box filter halving the size gives
    d = rng.integers(0, 4, (6, 8))
    blocks = np.stack([base, base, base + d, base - d]).astype(np.uint8)  # (4, 6, 8)
    big = blocks.reshape(2, 2, 6, 8).transpose(2, 0, 3, 1).reshape(12, 16)
    _save(tmp_path / "down" / "a.png", big)
    down = _read(tmp_path / "down", color="grey", resize=[6, 8], interpolation="box", scale=1.0)[0, 0]
    np.testing.assert_array_equal(down, base.astype(np.float32))
    assert _read(tmp_path / "down", color="grey", resize=6).shape == (1, 1, 6, 8)  # shorter side 12 -> 6


ANALYSES = [
    {"id": "entropy", "estimator": "activation_entropy"},
    {"id": "signature", "estimator": "nonlinearity_signature"},
    {"id": "plane", "estimator": "information_plane", "params": {"sigma": 1.0}},
]


def test_images_give_the_records_of_the_same_pixels_through_npz(tmp_path):
    folder, x, y = digit_image_folder(tmp_path, 160)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    common = {"batch_size": 40, "limit": 120, "shuffle": True}
    through = {
        source: layerscope.run(
            {"model": {"source": "demo:digits-cnn"}, "data": {**common, **data}, "analyses": ANALYSES},
            write=False,
            progress=False,
        ).records
        for source, data in (
            ("npz", {"source": "npz", "path": str(tmp_path / "d.npz")}),
            ("images", {"source": "images", "path": str(folder), "color": "grey", "scale": 1 / 240, "threads": 3}),
        )
    }
    assert len(through["images"]) == len(through["npz"]) > 50
    assert {r.get("class") for r in through["images"]} >= {"all", "0", "9"}
    for a, b in zip(through["images"], through["npz"]):
        assert {k: v for k, v in a.items() if k != "value"} == {k: v for k, v in b.items() if k != "value"}
        assert a["value"] == pytest.approx(b["value"], rel=1e-6, abs=1e-6)


def test_a_channel_last_model_receives_channel_last_images(tmp_path):
    """An ONNX model whose input is (batch, H, W, C) gets the source's (C, H, W) images with the channel
    axis moved, not reshaped: the same records as the channel-first model."""
    import torch

    folder, _, _ = digit_image_folder(tmp_path, 60)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3))

    class ChannelLast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.permute(0, 3, 1, 2))

    batch = torch.export.Dim("batch")
    for module, shape, name in ((net, (2, 1, 8, 8), "first"), (ChannelLast(), (2, 8, 8, 1), "last")):
        torch.onnx.export(
            module.eval(),
            (torch.rand(shape),),
            str(tmp_path / f"{name}.onnx"),
            dynamo=True,
            dynamic_shapes=({0: batch},),
        )
    records = {
        name: layerscope.run(
            {
                "model": {"source": str(tmp_path / f"{name}.onnx")},
                "data": {"source": "images", "path": str(folder), "color": "grey"},
                "analyses": [{"id": "e", "estimator": "activation_entropy"}],
            },
            write=False,
            progress=False,
        ).records
        for name in ("first", "last")
    }
    assert [r["value"] for r in records["first"]] == pytest.approx([r["value"] for r in records["last"]], abs=1e-9)


def test_manifest_labels_csv_and_json(tmp_path):
    for index in range(4):
        _save(tmp_path / "img" / f"{index}.png", np.full((4, 4), index * 50, np.uint8))
    (tmp_path / "labels.csv").write_text("path,target\n3.png,7\n0.png,2\n1.png,7\n")
    source = ImagesSource(
        ImagesSource.Params(
            path="img", manifest="labels.csv", file_column="path", label_column="target", color="grey", scale=1.0
        ),
        tmp_path,
    )
    x, y = source.read(np.arange(3))
    assert len(source) == 3 and y.tolist() == [7, 2, 7] and x[:, 0, 0, 0].tolist() == [150.0, 0.0, 50.0]
    (tmp_path / "labels.json").write_text(json.dumps({"2.png": "cat", "0.png": "dog"}))
    source = ImagesSource(ImagesSource.Params(path="img", manifest="labels.json"), tmp_path)
    assert source.read_labels(np.arange(2)).tolist() == ["cat", "dog"]
    with pytest.raises(ValueError, match="labels come from the manifest"):
        ImagesSource.Params(path="img", manifest="labels.json", labels="folders")


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", r"data.path: .*empty holds no images"),
        ("garbage", r"data: .*broken.png is not a readable image"),
        ("garbage-resized", r"data: .*broken.png is not a readable image"),
        ("mixed", r"the images differ in size \(.*a.png is 8×8, .*b.png is 9×8\); set resize"),
        ("loose", r"data.labels: .*loose.png sits outside any class folder"),
        (
            "no-column",
            r"data.manifest: .*labels.csv: no column 'label' \(data.label_column; the columns: file, class\)",
        ),
        ("missing-file", r"data.manifest: .*nothere.png \(listed in .*labels.csv\) is not a file"),
    ],
)
def test_bad_folders_are_user_errors_naming_the_file(tmp_path, case, message):
    folder = tmp_path / "empty"
    folder.mkdir()
    params = {"path": str(folder), "color": "grey"}
    if case.startswith("garbage"):
        _save(folder / "a" / "ok.png", np.zeros((8, 8), np.uint8))
        (folder / "a" / "broken.png").write_bytes(b"not a png at all")
        params["resize"] = [8, 8] if case == "garbage-resized" else None
    elif case == "mixed":
        _save(folder / "a.png", np.zeros((8, 8), np.uint8))
        _save(folder / "b.png", np.zeros((8, 9), np.uint8))
    elif case == "loose":
        _save(folder / "cls" / "a.png", np.zeros((8, 8), np.uint8))
        _save(folder / "loose.png", np.zeros((8, 8), np.uint8))
    elif case in ("no-column", "missing-file"):
        _save(folder / "a.png", np.zeros((8, 8), np.uint8))
        (tmp_path / "labels.csv").write_text(
            "file,class\na.png,1\n" if case == "no-column" else "file,label\na.png,1\nnothere.png,2\n"
        )
        params["manifest"] = str(tmp_path / "labels.csv")
    with pytest.raises(UserError, match=message):
        layerscope.run(
            {
                "model": {"source": "demo:digits-cnn"},
                "data": {"source": "images", **params},
                "analyses": [{"id": "e", "estimator": "activation_entropy"}],
            },
            out=tmp_path / "out",
            progress=False,
        )
    assert not (tmp_path / "out" / "results.json").exists()


def test_an_unreadable_image_is_exit_2_from_the_cli(tmp_path):
    _save(tmp_path / "img" / "a" / "ok.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "img" / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "spec.yaml").write_text(
        "model: {source: demo:digits-cnn}\n"
        "data: {source: images, path: img, color: grey, resize: [8, 8]}\n"
        "analyses: [{id: e, estimator: activation_entropy}]\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "layerscope", "run", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "bad.jpg is not a readable image" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_unknown_preprocessing_keys_are_spec_errors():
    with pytest.raises(SpecError, match=r"data.resise: unknown key 'resise'. Did you mean 'resize'"):
        layerscope.validate(
            {
                "model": {"source": "demo:digits-cnn"},
                "data": {"source": "images", "path": ".", "resise": 8},
                "analyses": [{"id": "e", "estimator": "activation_entropy"}],
            },
            with_model=False,
        )


@pytest.mark.slow
def test_the_example_images_spec_runs_on_scikit_image_samples(repo, tmp_path):
    """specs/images/images.yaml on the folder its script writes from scikit-image's bundled pictures."""
    import shutil

    spec_dir = tmp_path / "images"
    shutil.copytree(repo / "specs" / "images", spec_dir, ignore=shutil.ignore_patterns("sample-images"))
    proc = subprocess.run([sys.executable, str(spec_dir / "make_sample_images.py")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (spec_dir / "sample-images").iterdir()) == ["photo", "texture"]
    results = layerscope.run(spec_dir / "images.yaml", out=tmp_path / "out", progress=False)
    assert {r.get("class") for r in results.records} >= {"photo", "texture"}
    assert all(np.isfinite(r["value"]) for r in results.records)
    assert (tmp_path / "out" / "report.html").is_file()


@pytest.mark.parametrize("entry", ["../outside.png", "ABSOLUTE", "sub/../../outside.png", "link.png"])
@pytest.mark.parametrize("manifest", ["csv", "json"])
def test_a_manifest_entry_outside_the_image_folder_is_refused(tmp_path, entry, manifest):
    """A manifest lists images inside data.path: a relative path climbing out of it, an absolute path and
    a link inside the folder pointing out are refused naming the manifest and the entry, never read."""
    outside = _save(tmp_path / "outside.png", np.full((4, 4), 200, np.uint8))
    _save(tmp_path / "img" / "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "img" / "link.png").symlink_to(outside)
    entry = str(outside) if entry == "ABSOLUTE" else entry
    if manifest == "csv":
        (tmp_path / "labels.csv").write_text(f"file,label\na.png,0\n{entry},1\n")
    else:
        (tmp_path / "labels.json").write_text(json.dumps({"a.png": 0, entry: 1}))
    data = {"source": "images", "path": str(tmp_path / "img"), "manifest": str(tmp_path / f"labels.{manifest}")}
    with pytest.raises(
        UserError, match=rf"data.manifest: .*labels.{manifest}: entry 2 \('{re.escape(entry)}'\) lies outside"
    ):
        layerscope.run(
            {
                "model": {"source": "demo:digits-cnn"},
                "data": {**data, "color": "grey", "resize": [8, 8]},
                "analyses": ANALYSES[:1],
            },
            out=tmp_path / "out",
            progress=False,
        )
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_manifest_link_out_of_the_folder_is_exit_2_from_the_cli(tmp_path):
    outside = _save(tmp_path / "outside.png", np.full((4, 4), 200, np.uint8))
    _save(tmp_path / "img" / "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "img" / "link.png").symlink_to(outside)
    (tmp_path / "labels.csv").write_text("file,label\na.png,0\nlink.png,1\n")
    (tmp_path / "spec.yaml").write_text(
        "model: {source: demo:digits-cnn}\n"
        "data: {source: images, path: img, manifest: labels.csv, color: grey, resize: [8, 8]}\n"
        "analyses: [{id: e, estimator: activation_entropy}]\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "layerscope", "run", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1
    assert "labels.csv: entry 2 ('link.png') lies outside" in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()
