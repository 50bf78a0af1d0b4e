"""Reports from a stored results.json: every estimator's plot, the HTML page in headless Chromium,
and byte-identical rebuilds."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "results.json"
ESTIMATORS = {
    "entropy": "activation_entropy",
    "ip": "information_plane",
    "sig": "nonlinearity_signature",
    "md": "mean_dimension",
    "agg": "aggregation_distribution",
}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(FIXTURE, folder / "results.json")
    return folder


def report(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerscope", "report", str(folder)], capture_output=True, text=True)


def test_fixture_covers_every_estimator():
    import json

    analyses = {a["id"]: a["estimator"] for a in json.loads(FIXTURE.read_text())["analyses"]}
    assert analyses == ESTIMATORS


@pytest.mark.slow
def test_every_estimator_plot_from_stored_results(run_dir):
    done = report(run_dir)
    assert done.returncode == 0, done.stderr
    for analysis in ESTIMATORS:
        png, svg = run_dir / "plots" / f"{analysis}.png", run_dir / "plots" / f"{analysis}.svg"
        assert png.stat().st_size > 15_000 and svg.stat().st_size > 15_000, analysis
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(ESTIMATORS)
    assert "Reconstructed method" in page and '<table class="sortable">' in page
    assert (run_dir / "records.csv").exists()


@pytest.mark.slow
def test_rebuilding_gives_the_same_report(run_dir):
    assert report(run_dir).returncode == 0
    first = {p.name: p.read_bytes() for p in [run_dir / "report.html", *sorted((run_dir / "plots").iterdir())]}
    assert report(run_dir).returncode == 0
    second = {p.name: p.read_bytes() for p in [run_dir / "report.html", *sorted((run_dir / "plots").iterdir())]}
    assert first == second


def test_default_plot_for_an_estimator_without_its_plugin(run_dir, monkeypatch):
    monkeypatch.setenv("LAYERSCOPE_LOAD_PLUGINS", "file_reporters,plots,html")
    done = report(run_dir)
    assert done.returncode == 0, done.stderr
    assert (run_dir / "plots" / "ip.png").stat().st_size > 10_000  # the default metric-by-layer plot


def render_in_chromium(page: Path, tmp_path: Path) -> tuple[int, list[str], object]:
    """Open *page* in headless Chromium: (images loaded, console errors, screenshot pixels)."""
    from matplotlib.image import imread

    url = page.as_uri()
    profile = ["--user-data-dir=" + str(tmp_path / "profile"), "--window-size=1280,2000"]
    dom = subprocess.run(
        [
            CHROMIUM,
            *CHROMIUM_FLAGS,
            *profile,
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    loaded = re.search(r'data-images-loaded="(\d+)"', dom.stdout)
    assert loaded, dom.stdout[:500]
    console_errors = [
        line for line in dom.stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "ERROR" in line)
    ]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, *profile, "--virtual-time-budget=5000", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
    )
    return int(loaded.group(1)), console_errors, imread(str(shot))


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    assert report(run_dir).returncode == 0
    loaded, console_errors, pixels = render_in_chromium(run_dir / "report.html", tmp_path)
    assert loaded == len(ESTIMATORS) and console_errors == []
    assert pixels.shape[:2] == (2000, 1280) and pixels.std() > 0.05  # a rendered page, not a blank one
