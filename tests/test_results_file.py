"""A results.json edited by hand or by another tool: checked when loaded, never a traceback, never a file
written outside the run folder, never a hang or a file read whole without bound."""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from layerscope import Results
from layerscope.cli.main import main
from layerscope.results import schema

FIXTURE = Path(__file__).parent / "fixtures" / "results.json"


@pytest.fixture(scope="module")
def original() -> dict:
    return json.loads(FIXTURE.read_text())


def write_run(folder: Path, content: dict | str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = content if isinstance(content, str | bytes) else json.dumps(content)
    (folder / "results.json").write_bytes(data.encode() if isinstance(data, str) else data)
    return folder


def user_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("layerscope: error:") and err.count("\n") == 1, err
    return err


def tampered(original: dict, change) -> dict:
    data = copy.deepcopy(original)
    change(data)
    return data


def _set(path: tuple, value):
    def change(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _drop(path: tuple):
    def change(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return change


VARIANTS = {
    "records not a list": (_set(("records",), {"a": 1}), "records: Input should be a valid list"),
    "value a string": (_set(("records", 0, "value"), "0.5"), "records.0.value:"),
    "value null": (_set(("records", 3, "value"), None), "records.3.value:"),
    "records null": (_set(("records",), None), "records: Input should be a valid list"),
    "spec a list": (_set(("spec",), [1, 2]), "spec: Input should be a valid dictionary"),
    "outputs formats a string": (_set(("spec", "outputs", "formats"), "html"), "spec.outputs.formats:"),
    "model label missing": (_drop(("models", 0, "label")), "models.0.label: required key is missing"),
    "records missing": (_drop(("records",)), "records: required key is missing"),
    "analysis id a path": (
        _set(("analyses", 1, "id"), "../../../escaped_x"),
        "analyses.1.id: an analysis id '../../../escaped_x' may hold only",
    ),
    "record id a path": (
        _set(("records", 0, "analysis"), "../x"),
        "records.0.analysis: an analysis id '../x' may hold only",
    ),
    "artifact outside": (_set(("artifacts",), ["../../x.png"]), "artifacts.0: Value error, '../../x.png' is not"),
    "extra key an object": (_set(("records", 0, "class"), {"nested": 1}), "records.0: Value error, 'class' must be"),
    "step a string": (_set(("records", 0, "step"), "3"), "records.0.step:"),
    "tensor shape wrong": (_set(("models", 0, "tensors", 0, "shape"), {"x": 1}), "models.0.tensors.0.shape:"),
    "value too large to draw": (_set(("records", 0, "value"), 1.7e308), "records.0.value: must be a finite number"),
    "a layer name of a megabyte": (_set(("records", 0, "layer"), "x" * 10**6), "not a results file: a text of"),
    "a long name": (_set(("records", 0, "layer"), "x" * 5000), "records.0.layer: String should have at most 1000"),
    "params nested 600 deep": (_set(("analyses", 0, "params"), _nested(600)), "nested more than 64 levels deep"),
    "a lone surrogate": (_set(("records", 0, "layer"), "\ud800"), "a text that is not Unicode"),
    "an analysis twice": (
        _set(("analyses", 1, "id"), "entropy"),
        "analyses: the id 'entropy' is given to more than one analysis",
    ),
    "records of no analysis": (
        _set(("records", 0, "analysis"), "nowhere"),
        "records: the analysis 'nowhere' is not among the analyses",
    ),
}


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("command", ["report", "compare"])
def test_every_tampered_variant_is_one_user_error(tmp_path, capsys, original, name, command):
    change, needle = VARIANTS[name]
    run = write_run(tmp_path / "run", tampered(original, change))
    argv = (
        ["report", str(run)]
        if command == "report"
        else ["compare", str(run), str(FIXTURE.parent), "--out", str(tmp_path / "cmp")]
    )
    err = user_error(capsys, argv)
    assert needle.replace("Value error, ", "") in err, err
    assert not (tmp_path / "cmp").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and os.listdir(run) == ["results.json"]


TEXT_VARIANTS = {
    "NaN": ('{"layerscope": "0.1.0", "value": NaN}', "NaN is not a number JSON allows"),
    "Infinity": ('{"layerscope": -Infinity}', "-Infinity is not a number JSON allows"),
    "huge number": ('{"layerscope": 1e999}', "1e999 is too large for a number"),
    "huge integer": ('{"layerscope": ' + "9" * 5000 + "}", "not a results file:"),
    "deep nesting": ("[" * 100_000 + "]" * 100_000, "not a results file: nested too deeply"),
    "top-level list": ("[1, 2]", "the top level must be an object"),
    "not JSON": ("{'layerscope': 1}", "cannot read results"),
    "not UTF-8": (b"\xff\xfe{}", "cannot read results"),
    "empty": ("", "cannot read results"),
}


@pytest.mark.parametrize("name", TEXT_VARIANTS)
def test_malformed_json_is_one_user_error(tmp_path, capsys, name):
    content, needle = TEXT_VARIANTS[name]
    run = write_run(tmp_path / "run", content)
    assert needle in user_error(capsys, ["report", str(run)])


def test_a_path_in_an_analysis_id_writes_nothing_outside(tmp_path, capsys, original):
    """The tester's case: analyses[].id = ../../../escaped_x made `report` and `compare` write escaped_x.png
    three folders up; now the file is refused, and the reporter itself refuses a path leading out."""
    nested = tmp_path / "a" / "b" / "c"
    data = tampered(original, _set(("analyses", 1, "id"), "../../../escaped_x"))
    for record in data["records"]:
        if record["analysis"] == original["analyses"][1]["id"]:
            record["analysis"] = "../../../escaped_x"
    run = write_run(nested / "run", data)
    user_error(capsys, ["report", str(run)])
    user_error(capsys, ["compare", str(run), "--out", str(nested / "cmp")])
    assert not list(tmp_path.rglob("escaped_x*"))

    from layerscope.util.errors import UserError
    from layerscope.util.files import inside

    with pytest.raises(UserError, match="not a path inside"):
        inside(nested, "../escaped_x.png")
    (nested / "link").symlink_to(tmp_path)
    with pytest.raises(UserError, match="not a path inside"):
        inside(nested, "link/escaped_x.png")
    assert inside(nested, "plots/ip.png") == nested / "plots" / "ip.png"


def test_a_fifo_is_refused_without_blocking(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "results.json")
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(err=user_error(capsys, ["report", str(run)])), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "layerscope report blocked on a FIFO"
    assert "is not a regular file" in outcome["err"]


def test_a_file_beyond_the_size_cap_is_refused_before_it_is_read(tmp_path, capsys, monkeypatch):
    run = write_run(tmp_path / "run", FIXTURE.read_text())
    monkeypatch.setattr(schema, "MAX_RESULTS_BYTES", 1000)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("the file was read"))
    assert "larger than a results file can be (at most 0 MiB)" in user_error(capsys, ["report", str(run)])


def test_a_good_file_still_rebuilds_its_reports(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE.parent, run, ignore=shutil.ignore_patterns("*.py"))
    assert main(["report", str(run), "--formats", "csv"]) == 0, capsys.readouterr().err
    assert (run / "records.csv").exists()
    assert len(Results.load(run).records) == len(json.loads(FIXTURE.read_text())["records"])


def test_compare_refuses_to_write_over_a_run_it_compares(tmp_path, capsys):
    """The reviewer's case: `compare ca cb --out ca` replaced ca's results.json by the comparison."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURE.parent, run, ignore=shutil.ignore_patterns("*.py"))
    before = (run / "results.json").read_bytes()
    err = user_error(capsys, ["compare", str(run), str(FIXTURE.parent), "--out", str(run)])
    assert f"--out: {run} is one of the runs compared" in err
    assert (run / "results.json").read_bytes() == before


def test_report_rebuilds_a_comparison_with_its_figures(tmp_path, capsys):
    """`report` on a compare folder kept only results.json (the comparison named no formats): it rebuilds
    the figures and the report the comparison wrote."""
    out = tmp_path / "compared"
    assert main(["compare", str(FIXTURE.parent), str(FIXTURE.parent), "--out", str(out), "--formats", "html"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert main(["report", str(out)]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == written and "report.html" in written
