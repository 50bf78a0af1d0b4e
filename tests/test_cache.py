"""``layerscope cache``: the entries runs leave in the cache folder with their sizes, pruning by age and total size
least recently used first, clearing, and never removing anything outside the cache or not layerscope's."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

import layerscope
from layerscope.cli.main import main
from layerscope.util.cache import UNFINISHED_AGE

DAY = 86400.0
FACTORY = Path(__file__).resolve().parents[1] / "specs" / "own-model" / "mlp.py"
SPEC = """
model: {python: "mlp:make_mlp"}
data: {source: digits, split: test, limit: 64}
analyses: [{id: entropy, estimator: activation_entropy}]
"""


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv("LAYERSCOPE_CACHE", str(folder))
    return folder


def listing(capsys) -> dict:
    capsys.readouterr()
    assert main(["cache", "list", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def entry(cache: Path, relative: str, size: int, age_days: float, now: float) -> Path:
    """A real file of *size* bytes at *relative*, its folder and the file last modified *age_days* ago."""
    path = cache / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    stamp = now - age_days * DAY
    for touched in (path, path.parent):
        os.utime(touched, (stamp, stamp))
    return path


def set_age(path: Path, age_days: float) -> None:
    """Make *path* and everything under it last modified *age_days* ago."""
    stamp = time.time() - age_days * DAY
    for inner in [path, *path.rglob("*")]:
        os.utime(inner, (stamp, stamp))


def test_a_runs_export_is_listed_with_its_size_and_marked_used_when_read_again(cache, tmp_path, capsys):
    shutil.copy(FACTORY, tmp_path / "mlp.py")
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    layerscope.run(str(spec), write=False, progress=False)
    (export,) = [e for e in listing(capsys)["entries"] if e["kind"] == "export"]
    folder = cache / export["path"]
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["about.json", "model.onnx"]
    assert export["bytes"] == sum((folder / name).stat().st_size for name in files) > 10_000
    assert export["about"] == "python:mlp:make_mlp (MLP)"
    set_age(folder, 40)
    assert listing(capsys)["entries"][0]["last_used"] < time.time() - 39 * DAY
    layerscope.run(str(spec), write=False, progress=False)  # reads the export back
    (export,) = [e for e in listing(capsys)["entries"] if e["kind"] == "export"]
    assert export["last_used"] > time.time() - 60


def test_prune_by_age_then_by_size_least_recently_used_first(cache, capsys):
    now = time.time()
    exports = [entry(cache, f"exports/{c * 64}/model.onnx", 1000, age, now) for c, age in (("a", 50), ("b", 5))]
    table = entry(cache, f"tables/{'c' * 32}/meta.json", 300, 20, now)
    lock = entry(cache, f"tables/{'c' * 32}.lock", 0, 20, now)
    digits = entry(cache, "data/digits-sklearn-1.7.2.npz", 200, 1, now)
    demo = entry(cache, "demo/digits-mlp-v1/epoch_01.onnx", 400, 2, now)
    assert listing(capsys)["bytes"] == 2900
    assert main(["cache", "prune", "--older-than", "30d", "--dry-run"]) == 0
    assert "would remove 1 entry, 1000 B; 4 entries, 1.9 KiB would be left" in capsys.readouterr().out
    assert exports[0].exists()
    assert main(["cache", "prune", "--older-than", "30d"]) == 0
    assert not exports[0].parent.exists() and exports[1].exists()
    # 1,900 bytes left; at most 1,000: the least recently used go first (the table with its lock, the export)
    assert main(["cache", "prune", "--max-size", "1000B"]) == 0
    assert not table.parent.exists() and not lock.exists() and not exports[1].parent.exists()
    assert digits.exists() and demo.exists()
    assert [e["kind"] for e in listing(capsys)["entries"]] == ["demo", "data"]
    assert main(["cache", "clear"]) == 0
    assert listing(capsys)["entries"] == [] and not any(cache.rglob("*.*"))  # the kinds' folders are left empty


def test_the_listing_fits_a_terminal_of_80_columns(cache, capsys, monkeypatch):
    """Hashes in entry names are cut to 12 hex digits (as git abbreviates commits): one line per entry."""
    monkeypatch.setenv("COLUMNS", "80")
    now = time.time()
    entry(cache, f"exports/{'8438aa4f6a57' + 'c' * 52}/model.onnx", 1000, 2, now)
    entry(cache, f"exports/.{'e7e536d53bca' + 'e' * 52}-1919ao84/model.onnx", 10, 2, now)  # an export being written
    entry(cache, f"tables/{'5b883e4233a5' + 'b' * 20}.lock", 0, 2, now)
    entry(cache, "data/digits-sklearn-1.7.2.npz", 200, 1, now)
    capsys.readouterr()
    assert main(["cache"]) == 0
    rows = [line.split("│")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    assert all(len("│".join(row)) + 2 <= 80 for row in rows)
    named = [(kind.strip(), name.strip()) for kind, name, *_ in rows if name.strip()]  # a cell's wrapped lines aside
    assert named == [
        ("unfinished", "exports/.e7e536d53bca…-1919ao84"),
        ("export", "exports/8438aa4f6a57…"),
        ("data", "data/digits-sklearn-1.7.2.npz"),
        ("table", "tables/5b883e4233a5….lock"),
    ]


def test_nothing_outside_the_cache_or_not_layerscopes_is_removed(cache, tmp_path, capsys):
    now = time.time()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    export = entry(cache, f"exports/{'d' * 64}/model.onnx", 10, 0, now)
    (export.parent / "link").symlink_to(outside)  # a link inside an entry, to a folder outside
    (cache / "tables").symlink_to(outside)  # a kind's folder that is a link: not the cache's
    (cache / "demo").mkdir()
    (cache / "demo" / "my-notes.txt").write_text("not an entry")
    (cache / "notes.txt").write_text("not layerscope's")
    fresh = entry(cache, f"exports/.{'e' * 64}-x1/model.onnx", 10, 0, now)  # an export being written
    stale = entry(cache, f"exports/.{'f' * 64}-x2/model.onnx", 10, UNFINISHED_AGE / DAY + 1, now)
    kinds = sorted(e["kind"] for e in listing(capsys)["entries"])
    assert kinds == ["export", "unfinished", "unfinished"]
    assert main(["cache", "clear"]) == 0
    assert not export.parent.exists() and not stale.parent.exists() and fresh.exists()
    assert (outside / "precious.txt").read_text() == "keep"
    assert (cache / "notes.txt").exists() and (cache / "demo" / "my-notes.txt").exists()


@pytest.mark.parametrize("where", ["home", "root", "above home"])
def test_a_cache_folder_that_is_home_or_above_it_is_refused(where, monkeypatch, tmp_path, capsys):
    home = tmp_path / "home" / "user"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    folder = {"home": home, "root": Path("/"), "above home": home.parent}[where]
    monkeypatch.setenv("LAYERSCOPE_CACHE", str(folder))
    (home / "thesis.tex").write_text("keep")
    for command in (["cache", "clear"], ["cache", "prune", "--max-size", "1B"], ["cache", "list"]):
        assert main(command) == 2
        refused = {"home": "the home folder", "root": "the root of the file system", "above home": "above the home"}
        assert refused[where] in capsys.readouterr().err
    assert (home / "thesis.tex").exists()


def test_prune_arguments_are_checked(cache, capsys):
    assert main(["cache", "prune"]) == 2
    assert "give --older-than AGE, --max-size SIZE or both" in capsys.readouterr().err
    assert main(["cache", "prune", "--older-than", "30 days"]) == 2
    assert "--older-than: '30 days' is not an age" in capsys.readouterr().err
    assert main(["cache", "prune", "--max-size", "lots"]) == 2
    assert "--max-size: 'lots' is not a size" in capsys.readouterr().err
    shutil.rmtree(cache)
    assert main(["cache"]) == 0  # no cache folder yet: nothing in it
    assert "0 entries, 0 B" in capsys.readouterr().out
