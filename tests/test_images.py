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

from .conftest import digit_image_folder, one_user_error, run_in_subprocess

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
    {"id": "plane", "estimator": "information_plane", "params": {"sigma": 1.0, "batch_size": 40}},
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
    err = one_user_error(run_in_subprocess(tmp_path / "spec.yaml", tmp_path / "out"), tmp_path / "out")
    assert "bad.jpg is not a readable image" in err


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
    err = one_user_error(run_in_subprocess(tmp_path / "spec.yaml", tmp_path / "out"), tmp_path / "out")
    assert "labels.csv: entry 2 ('link.png') lies outside" in err


# --- bit depths and modes: every image on the 8-bit scale, or refused by name ----------------------------

GRADIENT = np.array([[0, 66, 133, 199, 255]], np.uint8)  # one row; the 8-bit values every depth must give


def _depths(folder: Path) -> dict[str, Path]:
    """Folders of one image each: GRADIENT stored as 8- and 16-bit PNG, 16-bit big-endian TIFF, 16-bit
    PGM, 32-bit unsigned and signed integer TIFF and 32-bit float TIFF (each value the type's maximum · v/255)."""
    import tifffile

    g = GRADIENT.astype(np.int64)
    writers = {
        "8-bit png": ("g.png", lambda p: Image.fromarray(GRADIENT).save(p)),
        "16-bit png": ("g.png", lambda p: Image.fromarray((g * 257).astype(np.uint16)).save(p)),
        "16-bit tiff I;16B": ("g.tif", lambda p: tifffile.imwrite(p, (g * 257).astype(np.uint16), byteorder=">")),
        "16-bit pgm": ("g.pgm", lambda p: p.write_bytes(b"P5\n5 1\n65535\n" + (g * 257).astype(">u2").tobytes())),
        "32-bit unsigned tiff": ("g.tif", lambda p: tifffile.imwrite(p, (g * 16843009).astype(np.uint32))),
        "32-bit signed tiff": (
            "g.tif",
            lambda p: tifffile.imwrite(p, np.round(g * (2**31 - 1) / 255).astype(np.int32)),
        ),
        "float tiff": ("g.tif", lambda p: tifffile.imwrite(p, (g / 255).astype(np.float32))),
    }
    folders = {}
    for index, (name, (file, write)) in enumerate(writers.items()):
        folders[name] = folder / str(index)
        folders[name].mkdir(parents=True)
        write(folders[name] / file)
    return folders


def test_every_bit_depth_gives_the_values_of_the_8_bit_image(tmp_path):
    """16-bit PNG/TIFF/PGM, 32-bit integer and float TIFFs of one gradient give the 8-bit image's values
    (a 16-bit gradient was clipped to [0, 1, 1, 1, 1], 32-bit ones to all 1.0): each by its type's range."""
    folders = _depths(tmp_path)
    assert Image.open(folders["16-bit png"] / "g.png").mode == "I;16"
    assert Image.open(folders["16-bit tiff I;16B"] / "g.tif").mode == "I;16B"
    expected = GRADIENT.astype(np.float32) * np.float32(1 / 255)  # as the 8-bit image: times scale
    reference = _read(folders["8-bit png"], color="grey", resize=[2, 9], scale=1.0)[0, 0]
    for name, folder in folders.items():
        exact = not ("32-bit" in name or "float" in name)
        for color, channels in (("grey", 1), ("rgb", 3)):
            got = _read(folder, color=color)[0]
            np.testing.assert_allclose(
                got, np.repeat(expected[None], channels, 0), 0, 0 if exact else 1e-6, err_msg=name
            )
        # scale keeps its meaning: multiplies the 0..255 values of the 8-bit image
        got = _read(folder, color="grey", scale=1.0)[0, 0]
        np.testing.assert_allclose(got, GRADIENT.astype(np.float32), rtol=0, atol=0 if exact else 3e-4, err_msg=name)
        # resized, a deep image keeps its precision: within the 8-bit image's rounding
        got = _read(folder, color="grey", resize=[2, 9], scale=1.0)[0, 0]
        np.testing.assert_allclose(got, reference, rtol=0, atol=0.5 + 1e-3, err_msg=name)


@pytest.mark.parametrize("case", ["negative int16", "negative int32", "nan float"])
def test_pixels_with_no_place_on_the_scale_are_refused_naming_the_file(tmp_path, case):
    import tifffile

    values = {
        "negative int16": np.array([[0, -5, 300]], np.int16),
        "negative int32": np.array([[0, -5, 300]], np.int32),
        "nan float": np.array([[0.0, np.nan, 0.5]], np.float32),
    }[case]
    (tmp_path / "img").mkdir()
    tifffile.imwrite(tmp_path / "img" / "x.tif", values)
    message = r"x.tif has negative pixels" if "negative" in case else r"x.tif has pixels that are not finite"
    with pytest.raises(UserError, match=r"data: .*" + message):
        _read(tmp_path / "img", color="grey")


def test_palette_alpha_cmyk_and_1_bit_images_give_their_colours(tmp_path):
    """Modes of 8 bits per channel are converted by Pillow: a palette gives its colours, LA its grey
    (alpha dropped), CMYK Pillow's conversion (0 ink white, full black ink black), 1-bit 0 and 1."""
    folder = tmp_path / "modes"
    palette = Image.new("P", (3, 1))
    palette.putpalette([10, 20, 30, 200, 100, 0, 255, 255, 255] + [0] * 759)
    palette.putdata([0, 1, 2])
    colours = np.array([[10, 20, 30], [200, 100, 0], [255, 255, 255]], np.float32)
    for name, image in {
        "p.png": palette,
        "la.png": Image.fromarray(np.array([[[0, 255], [128, 0], [255, 10]]], np.uint8), "LA"),
        "cmyk.tif": Image.fromarray(np.array([[[0, 0, 0, 0], [0, 0, 0, 255], [255, 0, 0, 0]]], np.uint8), "CMYK"),
        "bits.png": Image.fromarray(np.array([[False, True, True]])),
    }.items():
        (folder / name[:-4]).mkdir(parents=True)
        image.save(folder / name[:-4] / name)
    rgb = {name: _read(folder / name, scale=1.0, layout="nhwc")[0, 0] for name in ("p", "la", "cmyk", "bits")}
    np.testing.assert_array_equal(rgb["p"], colours)
    np.testing.assert_array_equal(rgb["la"], np.repeat([[0.0], [128.0], [255.0]], 3, 1))
    np.testing.assert_array_equal(rgb["cmyk"], [[255, 255, 255], [0, 0, 0], [0, 255, 255]])
    np.testing.assert_array_equal(rgb["bits"], np.repeat([[0.0], [255.0], [255.0]], 3, 1))
    grey = _read(folder / "p", color="grey", scale=1.0)[0, 0, 0]
    r, g, b = colours.T.astype(np.int64)
    np.testing.assert_array_equal(grey, ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16).astype(np.float32))
    assert _read(folder / "bits", color="grey")[0, 0, 0].tolist() == [0.0, 1.0, 1.0]


# --- huge images: refused by their header, and a batch holds the samples plus one image per thread -------


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says width × height, a few hundred bytes on disk (its data is a few rows)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("resize", [None, [8, 8]])
def test_a_decompression_bomb_is_refused_naming_the_file(tmp_path, resize):
    _save(tmp_path / "img" / "a" / "ok.png", np.zeros((8, 8), np.uint8))
    _bomb_png(tmp_path / "img" / "a" / "bomb.png", 50_000, 50_000)
    with pytest.raises(UserError, match=r"data: .*bomb.png has 2,500,000,000 pixels, more than layerscope decodes"):
        layerscope.run(
            {
                "model": {"source": "demo:digits-cnn"},
                "data": {"source": "images", "path": str(tmp_path / "img"), "color": "grey", "resize": resize},
                "analyses": ANALYSES[:1],
            },
            out=tmp_path / "out",
            progress=False,
        )
    assert not (tmp_path / "out" / "results.json").exists()


def _cli_error_on_bomb(tmp_path, name: str, width: int, height: int, data_options: str = "") -> str:
    """The one user error ``layerscope run`` gives on a folder holding a *width* × *height* PNG bomb."""
    _bomb_png(tmp_path / "img" / name, width, height)
    (tmp_path / "spec.yaml").write_text(
        "model: {source: demo:digits-cnn}\n"
        f"data: {{source: images, path: img, color: grey, resize: [8, 8]{data_options}}}\n"
        "analyses: [{id: e, estimator: activation_entropy}]\n"
    )
    return one_user_error(run_in_subprocess(tmp_path / "spec.yaml", tmp_path / "out"), tmp_path / "out")


def test_a_decompression_bomb_is_exit_2_from_the_cli(tmp_path):
    err = _cli_error_on_bomb(tmp_path, "bomb.png", 50_000, 50_000)
    assert "bomb.png has 2,500,000,000 pixels, more than layerscope decodes at all (178,956,970" in err


def test_max_pixels_is_checked_from_the_header_and_can_be_raised(tmp_path):
    _save(tmp_path / "img" / "big.png", np.full((300, 400), 7, np.uint8))
    with pytest.raises(UserError, match=r"big.png has 400×300 = 120,000 pixels, more than data.max_pixels \(100,000\)"):
        _read(tmp_path / "img", color="grey", resize=[4, 4], max_pixels=100_000)
    assert _read(tmp_path / "img", color="grey", resize=[4, 4], max_pixels=120_000, scale=1.0).max() == 7.0
    with pytest.raises(ValueError, match="less than or equal to 178956970"):
        ImagesSource.Params(path=".", max_pixels=200_000_000)


def test_threads_decode_at_once_only_images_within_max_pixels(tmp_path, monkeypatch):
    """Four 300×300 images (90,000 pixels each) on four threads: with max_pixels 100,000 they are decoded
    one after another (a batch holds its samples and one decoded image, not one per thread: three
    12000×12000 PNGs took 2.3 GB), with 400,000 several at once."""
    import threading
    import time

    from layerscope.plugins.data.image_preprocessing import ImagePreprocessing

    for index in range(4):
        _save(tmp_path / "img" / f"{index}.png", np.full((300, 300), index, np.uint8))
    lock, decoding, most = threading.Lock(), [0], [0]
    original = ImagePreprocessing._pixels

    def counted(self, image, where):
        with lock:
            decoding[0] += 1
            most[0] = max(most[0], decoding[0])
        try:
            time.sleep(0.05)
            return original(self, image, where)
        finally:
            with lock:
                decoding[0] -= 1

    monkeypatch.setattr(ImagePreprocessing, "_pixels", counted)
    at_once = {}
    for max_pixels in (100_000, 400_000):
        most[0] = 0
        x = _read(tmp_path / "img", color="grey", resize=[4, 4], threads=4, max_pixels=max_pixels, scale=1.0)
        assert x[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
        at_once[max_pixels] = most[0]
    assert at_once[100_000] == 1 and at_once[400_000] > 1, at_once


# --- the folder scan and the manifest: one rule for links, byte-order marks, float labels -------------


def _run_images(tmp_path: Path, **data):
    return layerscope.run(
        {
            "model": {"source": "demo:digits-cnn"},
            "data": {"source": "images", "color": "grey", "resize": [8, 8], **data},
            "analyses": ANALYSES[:1],
        },
        out=tmp_path / "out",
        progress=False,
    )


def test_a_linked_image_leading_out_of_the_folder_is_refused_by_the_scan(tmp_path):
    """The scan read a linked file pointing outside data.path, which a manifest refuses: one rule now."""
    outside = _save(tmp_path / "outside.png", np.full((4, 4), 200, np.uint8))
    _save(tmp_path / "img" / "cat" / "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "img" / "cat" / "link.png").symlink_to(outside)
    with pytest.raises(UserError, match=r"data.path: .*img/cat/link.png is a link to .*outside.png, outside .*img"):
        _run_images(tmp_path, path=str(tmp_path / "img"))
    assert not (tmp_path / "out" / "results.json").exists()


def test_linked_sub_folders_inside_the_folder_are_read_and_links_out_or_back_refused(tmp_path):
    """Linked sub-folders were skipped by the scan without notice: one inside data.path is read like a
    folder (its name the class), one leading out of it or back to a folder above (a cycle) is refused."""
    _save(tmp_path / "img" / "cat" / "a.png", np.full((4, 4), 10, np.uint8))
    _save(tmp_path / "img" / "dog" / "b.png", np.full((4, 4), 20, np.uint8))
    (tmp_path / "img" / "kitten").symlink_to("cat", target_is_directory=True)
    source = ImagesSource(ImagesSource.Params(path="img", color="grey", scale=1.0), tmp_path)
    x, y = source.read(np.arange(len(source)))
    assert y.tolist() == ["cat", "dog", "kitten"] and x[:, 0, 0, 0].tolist() == [10.0, 20.0, 10.0]
    _save(tmp_path / "elsewhere" / "c.png", np.full((4, 4), 30, np.uint8))
    (tmp_path / "img" / "other").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(UserError, match=r"data.path: .*img/other is a link to .*elsewhere, outside .*img"):
        ImagesSource(ImagesSource.Params(path="img"), tmp_path)
    (tmp_path / "img" / "other").unlink()
    (tmp_path / "img" / "dog" / "up").symlink_to("..", target_is_directory=True)
    with pytest.raises(UserError, match=r"data.path: .*img/dog/up is a link back to .*img, a folder it is in"):
        ImagesSource(ImagesSource.Params(path="img"), tmp_path)


def test_a_scanned_link_out_of_the_folder_is_exit_2_from_the_cli(tmp_path):
    outside = _save(tmp_path / "outside.png", np.full((4, 4), 200, np.uint8))
    _save(tmp_path / "img" / "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "img" / "link.png").symlink_to(outside)
    (tmp_path / "spec.yaml").write_text(
        "model: {source: demo:digits-cnn}\n"
        "data: {source: images, path: img, color: grey, resize: [8, 8]}\n"
        "analyses: [{id: e, estimator: activation_entropy}]\n"
    )
    err = one_user_error(run_in_subprocess(tmp_path / "spec.yaml", tmp_path / "out"), tmp_path / "out")
    assert "link.png is a link to" in err and "outside.png, outside" in err


@pytest.mark.parametrize("manifest", ["csv", "json"])
def test_a_manifest_with_a_byte_order_mark_is_read(tmp_path, manifest):
    """A manifest saved as Excel's "CSV UTF-8" begins with a byte-order mark, which was read as part of
    the first column's name ("no column 'file'"); a JSON manifest with one was not valid JSON."""
    for index in range(2):
        _save(tmp_path / "img" / f"{index}.png", np.full((4, 4), index * 50, np.uint8))
    text = "file,label\n1.png,7\n0.png,2\n" if manifest == "csv" else json.dumps({"1.png": 7, "0.png": 2})
    (tmp_path / f"labels.{manifest}").write_text("\ufeff" + text, encoding="utf-8")
    source = ImagesSource(ImagesSource.Params(path="img", manifest=f"labels.{manifest}"), tmp_path)
    assert source.read_labels(np.arange(2)).tolist() == [7, 2]


def test_manifest_float_labels_that_are_not_whole_are_refused(tmp_path):
    """A CSV manifest's 0.5 gave the class name '0.5' (its JSON twin was refused): float labels are refused
    unless whole, and whole ones (1.0) are the integer classes, as in every source."""
    for index in range(4):
        _save(tmp_path / "img" / f"{index}.png", np.full((4, 4), index * 50, np.uint8))
    rows = "".join(f"{index}.png,{index % 2}.5\n" for index in range(4))
    (tmp_path / "labels.csv").write_text("file,label\n" + rows)
    with pytest.raises(UserError, match=r"sample \d has label \d\.5, not a whole number"):
        _run_images(tmp_path, path=str(tmp_path / "img"), manifest=str(tmp_path / "labels.csv"))
    (tmp_path / "labels.csv").write_text("file,label\n" + rows.replace(".5", ".0"))
    source = ImagesSource(ImagesSource.Params(path="img", manifest="labels.csv"), tmp_path)
    assert source.read_labels(np.arange(4)).tolist() == [0, 1, 0, 1]


def test_pillows_bomb_warning_is_not_shown_where_layerscope_checks_the_size(tmp_path):
    """An image of 100,000,000 pixels: Pillow warned (DecompressionBombWarning, with its source path) before
    layerscope's own message, and also when max_pixels was raised to read it."""
    import warnings

    from layerscope.plugins.data.image_preprocessing import opened_image

    bomb = _bomb_png(tmp_path / "img" / "bomb.png", 10_000, 10_000)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match=r"bomb.png has 10000×10000 = 100,000,000 pixels, more than data.max_pix"):
            _read(tmp_path / "img", color="grey", resize=[8, 8])
        with opened_image(bomb, max_pixels=150_000_000) as image:
            assert image.size == (10_000, 10_000)
    assert [str(w.message) for w in shown] == []


def test_an_image_larger_than_layerscope_decodes_is_not_told_to_raise_max_pixels(tmp_path):
    """max_pixels cannot be raised past 178,956,970 (Pillow refuses to open more): an image over that is
    not answered "raise it to read the image"."""
    err = _cli_error_on_bomb(tmp_path, "huge.png", 20_000, 10_000, ", max_pixels: 178956970")
    assert "huge.png has 200,000,000 pixels, more than layerscope decodes at all (178,956,970" in err
    assert "raise it" not in err and "Warning" not in err


def test_the_documented_defaults_of_the_images_source_are_the_codes(repo):
    """docs/data.md said threads defaults to 2; the code takes 4, or the CPU count when lower."""
    import os

    section = (repo / "docs" / "data.md").read_text().split("### images\n")[1].split("\n### ")[0]
    documented = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", section, re.M))
    fields = ImagesSource.Params.model_fields
    assert documented["threads"] == "min(4, CPUs)" and fields["threads"].default == min(4, os.cpu_count() or 1)
    assert int(documented["max_pixels"]) == fields["max_pixels"].default
    assert documented["labels"] == fields["labels"].default
