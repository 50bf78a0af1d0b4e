"""Every user error exits 2 with one clear message and leaves no results.json."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from layerscope.cli.main import main

from .conftest import write_spec
from .waiting import wait_until

SPEC = """\
version: 1
model: {{source: {model}}}
data: {data}
analyses:
  - id: ent
    estimator: activation_entropy
{extra}outputs: {{dir: {out}}}
"""


def run_cli(tmp_path, capsys, model="tiny.onnx", data="{source: digits, limit: 50}", extra="", command="run"):
    out = tmp_path / "out"
    spec = write_spec(tmp_path, SPEC.format(model=model, data=data, extra=extra, out=out))
    code = main([command, str(spec)])
    return code, capsys.readouterr().err, out


def assert_user_error(code, err, out, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("layerscope: error:")
    for needle in needles:
        assert needle in err, err
    assert not (out / "results.json").exists()


def test_ok_run_writes_results(tmp_path, capsys, tiny_onnx):
    code, err, out = run_cli(tmp_path, capsys)
    assert code == 0, err
    assert (out / "results.json").exists() and (out / "records.csv").exists()


def test_unknown_key_and_type_errors_all_at_once(tmp_path, capsys, tiny_onnx):
    spec = write_spec(
        tmp_path,
        "model: {source: tiny.onnx, sorce: x}\ndata: {batch_size: zero}\n"
        "analyses:\n  - {id: a, estimator: activation_entropy, params: {varient: binary}}\n",
    )
    code = main(["validate", str(spec)])
    err = capsys.readouterr().err
    assert code == 2
    assert "spec.yaml:1:28: model.sorce: unknown key 'sorce'. Did you mean 'source'?" in err
    assert "spec.yaml:2:8: data.batch_size:" in err
    assert "spec.yaml:4:53: analyses.0.params.varient: unknown key 'varient'. Did you mean 'variant'?" in err


def test_unknown_estimator_did_you_mean(tmp_path, capsys, tiny_onnx):
    spec = write_spec(tmp_path, "model: {source: tiny.onnx}\nanalyses:\n  - id: a\n    estimator: activation_entrpy\n")
    assert main(["run", str(spec)]) == 2
    assert (
        "spec.yaml:4:5: analyses.0.estimator: unknown estimator 'activation_entrpy'. "
        "Did you mean 'activation_entropy'?" in capsys.readouterr().err
    )


def test_invalid_yaml(tmp_path, capsys):
    spec = write_spec(tmp_path, "model: {source: [unclosed\n")
    assert main(["validate", str(spec)]) == 2
    assert "invalid YAML" in capsys.readouterr().err


def test_yaml_cannot_construct_python_objects(tmp_path, capfd):
    spec = write_spec(tmp_path, "model: !!python/object/apply:os.system ['echo pwned']\n")
    assert main(["validate", str(spec)]) == 2
    captured = capfd.readouterr()  # file descriptors: the shell os.system would start writes to fd 1, not sys.stdout
    assert "invalid YAML" in captured.err and "pwned" not in captured.out, captured


def test_missing_spec_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "spec file not found" in capsys.readouterr().err


def test_missing_model_file(tmp_path, capsys):
    assert_user_error(*run_cli(tmp_path, capsys, model="missing.onnx"), "file not found", "missing.onnx")
    assert not (tmp_path / "out").exists()  # the output folder the run created is removed again


def test_non_onnx_bytes(tmp_path, capsys):
    (tmp_path / "fake.onnx").write_text("this is not a protobuf, it is a text file pretending")
    assert_user_error(*run_cli(tmp_path, capsys, model="fake.onnx"), "fake.onnx", "not")


def test_npz_without_x(tmp_path, capsys, tiny_onnx):
    np.savez(tmp_path / "data.npz", features=np.zeros((10, 64), np.float32))
    assert_user_error(*run_cli(tmp_path, capsys, data="{source: npz, path: data.npz}"), "has no array 'x'", "features")


def test_nan_in_data(tmp_path, capsys, tiny_onnx):
    x = np.random.default_rng(0).standard_normal((20, 64)).astype(np.float32)
    x[7, 3] = np.nan
    np.savez(tmp_path / "data.npz", x=x)
    assert_user_error(
        *run_cli(tmp_path, capsys, data="{source: npz, path: data.npz, shuffle: false}"), "sample 7 contains NaN or Inf"
    )
    assert not (tmp_path / "out").exists()  # failed during the run: the folder it created is removed again


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize(
    "source, message",
    [
        ("npz", "data.path: file not found: {folder}/absent"),
        ("images", "data.path: {folder}/absent is not a folder"),
        ("table", "data.path: file not found: {folder}/absent"),
    ],
)
def test_a_data_path_error_names_its_line(tmp_path, capsys, tiny_onnx, source, message, command):
    code, err, out = run_cli(tmp_path, capsys, data=f"{{source: {source}, path: absent}}", command=command)
    column = len(f"data: {{source: {source}, ") + 1  # where `path` begins on line 3
    assert_user_error(code, err, out)
    assert err == f"layerscope: error: {tmp_path / 'spec.yaml'}:3:{column}: {message.format(folder=tmp_path)}\n"


def test_a_data_error_found_while_running_names_its_line(tmp_path, capsys, tiny_onnx):
    """An npz whose array's header announces 50 samples and whose data holds 10: planning reads the first
    sample, the run finds the rest missing."""
    import io
    import zipfile

    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": (50, 64)})
    member.write(np.ones((10, 64), np.float32).tobytes())
    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("x.npy", member.getvalue())
    code, err, out = run_cli(tmp_path, capsys, data="{source: npz,\n       path: data.npz, shuffle: false}")
    assert_user_error(code, err, out, f"spec.yaml:4:8: data.path: {path} ends before the data its header announces")


def test_a_table_label_error_names_its_line(tmp_path, capsys, tiny_onnx):
    rows = "".join(f"{','.join(['0'] * 64)},{'' if i == 3 else i % 2}\n" for i in range(8))
    (tmp_path / "t.csv").write_text(",".join([f"f{i}" for i in range(64)] + ["y"]) + "\n" + rows)
    data = "\n  source: table\n  path: t.csv\n  label: y\n"
    code, err, out = run_cli(tmp_path, capsys, data=data, command="validate")
    assert_user_error(code, err, out, "spec.yaml:6:3: data.label: column 'y' is empty in row 4")


def test_a_message_is_located_only_at_a_key_the_spec_has():
    from layerscope.spec.yaml_locations import load_yaml

    doc = load_yaml("data:\n  path: x.npz\nanalyses:\n  - id: a\n    params: {k: 3}\n", "s.yaml")
    assert doc.locate("data.path: file not found") == "s.yaml:2:3: data.path: file not found"
    assert doc.locate("data.label: no column 'y'") == "s.yaml:1:1: data.label: no column 'y'"  # the section
    assert doc.locate("analyses.0.params.k: too large") == "s.yaml:5:14: analyses.0.params.k: too large"
    assert doc.locate("model.source: no such file") == "model.source: no such file"  # no model key here
    assert doc.locate("s.yaml:2:3: data.path: located already") == "s.yaml:2:3: data.path: located already"
    assert doc.locate("no key: a sentence") == "no key: a sentence"


def test_selector_matching_nothing(tmp_path, capsys, tiny_onnx):
    code, err, out = run_cli(tmp_path, capsys, extra="    on: {op_type: Sigmoidd}\n")
    assert_user_error(code, err, out, "analyses.0.on", "matches no tensor")


def test_validate_checks_selectors_with_the_model(tmp_path, capsys, tiny_onnx):
    code, err, out = run_cli(tmp_path, capsys, extra="    on: {name: nope}\n", command="validate")
    assert_user_error(code, err, out, "spec.yaml:7:5: analyses.0.on", "matches no tensor")


def test_wrong_input_shape(tmp_path, capsys, tiny_onnx):
    np.savez(tmp_path / "data.npz", x=np.zeros((10, 7), np.float32))
    assert_user_error(*run_cli(tmp_path, capsys, data="{source: npz, path: data.npz}"), "shape [7]", "expects [64]")


def test_unknown_demo_model(tmp_path, capsys):
    assert_user_error(*run_cli(tmp_path, capsys, model="demo:digits-cn"), "Did you mean 'digits-cnn'")


def test_memory_budget_below_one_sample(tmp_path, capsys, tiny_onnx):
    code, err, out = run_cli(tmp_path, capsys, extra="", data="{source: digits, limit: 20}")
    assert code == 0
    spec = write_spec(
        tmp_path,
        SPEC.format(model="tiny.onnx", data="{source: digits}", extra="", out=out) + "runtime: {memory_budget: 16}\n",
        name="small.yaml",
    )
    (out / "results.json").unlink()
    assert main(["run", str(spec)]) == 2
    assert "memory_budget" in capsys.readouterr().err
    assert not (out / "results.json").exists()


@pytest.mark.skipif(__import__("glob").glob("/dev/nvidia[0-9]*"), reason="a GPU is present")
def test_cuda_requested_without_gpu(tmp_path, capsys, tiny_onnx):
    code, err, out = run_cli(tmp_path, capsys, extra="runtime: {device: cuda}\n")
    assert_user_error(code, err, out, "runtime.device: cuda")


# --- denial of service from a spec or a file: bounded, located, never a hang ------------------------------------------


def run_subprocess(*args, timeout=120):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "layerscope", *args], capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stderr


def billion_laughs() -> str:
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for previous, name in zip("abcdefgh", "bcdefghi"):
        text += f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]\n"
    return text


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "model: {source: demo:digits-cnn}\nanalyses: [{id: e, estimator: activation_entropy}]\n" + billion_laughs(),
            r"spec.yaml:\d+:\d+: the spec has more than 100000 values once aliases are expanded",
        ),
        (
            "model: {source: demo:digits-cnn}\nanalyses: [{id: e, estimator: activation_entropy}]\nunknown:\n  "
            + billion_laughs().replace("\n", "\n  "),
            r"more than 100000 values once aliases are expanded",
        ),
        (
            "model: " + "[" * 100_000 + "]" * 100_000 + "\n",
            r"spec.yaml:1:1: the spec has more than 50 levels of nesting",
        ),
        (
            "model: {source: demo:digits-cnn}\nanalyses: [{id: e\x01, estimator: activation_entropy}]\n",
            r"spec.yaml:2:18: invalid YAML: character 0x0001 is not allowed",
        ),
        (
            "model: {source: \x1b[31mdemo}\nanalyses: [{id: e, estimator: activation_entropy}]\n",
            r"spec.yaml:1:17: invalid YAML: character 0x001b is not allowed",
        ),
        (
            "model: {source: demo:digits-cnn}\nanalyses: [{id: e, estimator: activation_entropy, params: "
            "{variant: histogram, bins: 100000000000}}]\n",
            r"spec.yaml:2:\d+: analyses.0.params.bins: .*less than or equal",
        ),
        (
            "# " + "x" * 2**21 + "\nmodel: {source: demo:digits-cnn}\n",
            r"spec.yaml: the file has \d+ bytes; a spec has at most",
        ),
    ],
    ids=[
        "alias-bomb",
        "alias-bomb-under-unknown-key",
        "nested-brackets",
        "control-character",
        "escape-code",
        "absurd-bins",
        "huge-file",
    ],
)
def test_hostile_specs_fail_fast_with_a_location(tmp_path, text, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text, encoding="utf-8")
    code, err = run_subprocess("validate", str(spec))
    assert code == 2 and "Traceback" not in err, err
    assert re.search(message, err), err


@pytest.mark.parametrize("where", ["model", "data", "spec"])
def test_a_fifo_is_refused_not_read(tmp_path, tiny_onnx, where):
    fifo = tmp_path / ("pipe.onnx" if where == "model" else "pipe.npz" if where == "data" else "pipe.yaml")
    os.mkfifo(fifo)
    model, data = (fifo, "{source: digits}") if where == "model" else (tiny_onnx, f"{{source: npz, path: {fifo}}}")
    spec = (
        fifo
        if where == "spec"
        else write_spec(tmp_path, SPEC.format(model=model, data=data, extra="", out=tmp_path / "out"))
    )
    code, err = run_subprocess("run", str(spec), timeout=60)
    assert code == 2 and "Traceback" not in err, err
    assert "is not a regular file" in err and "pipe" in err, err


# --- the outputs folder: one run at a time, all files or none -------------------------------------------------------


def test_a_second_run_on_a_locked_folder_is_refused(tmp_path, capsys, tiny_onnx):
    from filelock import FileLock

    out = tmp_path / "out"
    out.mkdir()
    with FileLock(out / ".layerscope.lock", timeout=0):  # what a running layerscope holds
        assert_user_error(*run_cli(tmp_path, capsys), "another layerscope run is writing to", "--out")
    code, err, _ = run_cli(tmp_path, capsys)
    assert code == 0, err


def test_a_run_leaves_no_lock_file_when_it_ends(tmp_path, capsys, tiny_onnx):
    """The lock file is removed after a run that succeeded, a report, and a run that failed in a folder it kept."""
    code, err, out = run_cli(tmp_path, capsys)
    assert code == 0 and not (out / ".layerscope.lock").exists(), err
    assert main(["report", str(out), "--formats", "csv"]) == 0 and not (out / ".layerscope.lock").exists()
    written = sorted(p.name for p in out.iterdir())
    code, err, _ = run_cli(tmp_path, capsys, data="{source: npz, path: missing.npz}")
    assert code == 2 and sorted(p.name for p in out.iterdir()) == written, err


@pytest.mark.slow
def test_two_concurrent_runs_on_one_folder(tmp_path, capsys):
    import subprocess
    import sys

    spec = write_spec(
        tmp_path,
        "model: {source: demo:digits-mlp, checkpoints: all}\n"
        "analyses: [{id: ip, estimator: information_plane}]\n"
        f"outputs: {{dir: {tmp_path / 'out'}}}\n",
        name="slow.yaml",
    )
    first = subprocess.Popen(
        [sys.executable, "-m", "layerscope", "run", str(spec), "--quiet"], stderr=subprocess.PIPE, text=True
    )
    # its first checkpoint is saved: the run is under way and holds the folder's lock
    wait_until(
        lambda: (tmp_path / "out" / ".layerscope-resume").exists() or first.poll() is not None,
        timeout=120,
        what="the first run to save its first checkpoint (or end)",
    )
    assert first.poll() is None, first.stderr.read()
    assert main(["run", str(spec), "--quiet"]) == 2
    assert "another layerscope run is writing to" in capsys.readouterr().err
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert len(__import__("json").loads((tmp_path / "out" / "results.json").read_text())["models"]) == 10


@pytest.mark.parametrize(
    "out, cause",
    [
        ("/sys/kernel", r"Permission denied|Operation not permitted"),
        ("{tmp}/a-file/out", r"Not a directory|File exists"),
    ],
)
def test_an_unwritable_outputs_folder_is_a_user_error_before_the_run(tmp_path, capsys, tiny_onnx, out, cause):
    (tmp_path / "a-file").write_text("in the way")
    spec = write_spec(
        tmp_path,
        SPEC.format(model="tiny.onnx", data="{source: digits, limit: 50}", extra="", out=out.format(tmp=tmp_path)),
    )
    assert main(["run", str(spec), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(rf"outputs.dir: cannot write to .*: ({cause})", err), err


@pytest.mark.slow
def test_a_write_failing_midway_leaves_the_previous_results_intact(tmp_path, capsys, tiny_onnx):
    """A file-size limit makes the OS refuse the writes of the second run part-way (EFBIG, as a full disk
    refuses with ENOSPC): the first run's files stay byte for byte, and nothing of the second appears."""
    import subprocess
    import sys

    out = tmp_path / "out"
    first = write_spec(
        tmp_path,
        SPEC.format(
            model="tiny.onnx", data="{source: digits, limit: 50}", extra="", out=f"{out}, formats: [json, csv, plots]"
        ),
        name="first.yaml",
    )
    assert main(["run", str(first), "--quiet"]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    second = write_spec(
        tmp_path,
        SPEC.format(
            model="tiny.onnx",
            data="{source: digits}",
            extra="    params: {variant: histogram}\n",
            out=f"{out}, formats: [json, csv, plots]",
        ),
        name="second.yaml",
    )
    limit = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)); "
        "from layerscope.cli.main import main; sys.exit(main(['run', sys.argv[1], '--quiet']))"
    )
    done = subprocess.run([sys.executable, "-c", limit, str(second)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert re.search(r"outputs.dir: cannot write to .*: File too large", done.stderr), done.stderr
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # no staging folder left, no file replaced


def write_npz_bomb(path, rows: int, features: int) -> None:
    """An .npz whose float32 'x' (rows × features zeros) is deflated as it is written: a few MiB on disk,
    rows·features·4 bytes once inflated, and never in this process's memory."""
    import zipfile

    header = {"descr": "<f4", "fortran_order": False, "shape": (rows, features)}
    chunk = bytes(features * 4 * 1024)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for _ in range(rows // 1024):
                member.write(chunk)
        with archive.open("y.npy", "w") as member:
            np.save(member, np.zeros(rows, np.int64))


@pytest.mark.slow
def test_a_spec_error_is_reported_before_a_compressed_npz_is_inflated(tmp_path, tiny_onnx):
    import subprocess
    import sys

    write_npz_bomb(tmp_path / "bomb.npz", rows=2**22, features=64)  # 1 GiB of float32 once inflated
    np.savez(tmp_path / "small.npz", x=np.zeros((64, 64), np.float32), y=np.zeros(64, np.int64))
    assert (tmp_path / "bomb.npz").stat().st_size < 8 * 2**20

    def peak_rss(data: str) -> tuple[int, int, str]:
        spec = write_spec(
            tmp_path,
            SPEC.format(
                model="tiny.onnx",
                data=f"{{source: npz, path: {data}}}",
                extra="    on: {name: no-such-tensor}\n",
                out=tmp_path / "out",
            ),
            name=f"{data}.yaml",
        )
        report = (
            "import resource, sys\nfrom layerscope.cli.main import main\ntry:\n    code = main(['run', sys.argv[1]])\n"
            "finally:\n    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\nsys.exit(code)\n"
        )
        done = subprocess.run([sys.executable, "-c", report, str(spec)], capture_output=True, text=True, timeout=300)
        return done.returncode, int(done.stdout.split()[-1]), done.stderr

    code, small_peak, err = peak_rss("small.npz")
    assert code == 2 and "matches no tensor" in err, err
    code, bomb_peak, err = peak_rss("bomb.npz")
    assert code == 2 and "matches no tensor" in err and "Traceback" not in err, err
    assert bomb_peak - small_peak < 128 * 2**20, (small_peak, bomb_peak)  # not the 1 GiB array


def test_a_failed_run_removes_only_the_empty_folders_it_created(tmp_path):
    from layerscope.results.outputs import output_folder

    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), output_folder(tmp_path / "kept" / "a" / "b"):
        raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any((tmp_path / "kept").iterdir())
    with pytest.raises(RuntimeError), output_folder(tmp_path / "new") as out:
        (out.path / "notes.txt").write_text("written during the run")
        raise RuntimeError
    assert (tmp_path / "new" / "notes.txt").read_text() == "written during the run"
    with output_folder(tmp_path / "fine"):
        pass
    assert (tmp_path / "fine").is_dir()  # a run that succeeded keeps its folder


def test_npz_y_key_given_by_name_must_exist(tmp_path, capsys, tiny_onnx):
    """A misspelt y_key was read as 'no labels': the run gave only class-all records, and an estimator
    that needs labels blamed the estimator. Left at its default y, an absent array still means no labels."""
    np.savez(tmp_path / "data.npz", x=np.zeros((10, 64), np.float32), lab=np.zeros(10, np.int64))
    code, err, out = run_cli(tmp_path, capsys, data="{source: npz, path: data.npz, y_key: labels}")
    column = len("data: {source: npz, path: data.npz, ") + 1  # where `y_key` begins on line 3
    assert_user_error(code, err, out)
    assert err == (
        f"layerscope: error: {tmp_path / 'spec.yaml'}:3:{column}: data.y_key: {tmp_path / 'data.npz'} "
        "has no array 'labels' (it has: x, lab)\n"
    )
    code, err, _ = run_cli(tmp_path, capsys, data="{source: npz, path: data.npz}")
    assert code == 0, err


@pytest.mark.parametrize(
    "on, message",
    [
        ("{layr: a1}", "5:10: analyses.0.on.layr: unknown key 'layr'. Did you mean 'layer'?"),
        ("{layer: a1, inner: maybe}", "5:21: analyses.0.on.inner: give true or false, not 'maybe'"),
        ('{layer: a1, inner: "yes"}', "5:21: analyses.0.on.inner: give true or false, not 'yes'"),
        (
            "[{layer: a1}, {op_typ: Relu}]",
            "5:24: analyses.0.on.1.op_typ: unknown key 'op_typ'. Did you mean 'op_type'?",
        ),
    ],
)
def test_a_selector_error_is_one_message_at_its_key(tmp_path, capsys, on, message):
    """pydantic reported each member of on's union (a list, 'all', a selector): three lines, no
    did-you-mean; and a quoted "yes" was read as true."""
    spec = write_spec(
        tmp_path,
        f"model: {{source: tiny.onnx}}\nanalyses:\n  - id: a\n    estimator: activation_entropy\n    on: {on}\n",
    )
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"spec.yaml:{message}\n" in err and err.count("analyses.0.on") == 1, err


def test_validate_counts_one_tensor_in_the_singular(tmp_path, capsys, tiny_onnx):
    spec = write_spec(tmp_path, SPEC.format(model="tiny.onnx", data="{}", extra="    on: {role: output}\n", out="out"))
    assert main(["validate", str(spec)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("ent selects 1 tensor")


@pytest.mark.parametrize(
    "runtime, analysis, message",
    [
        ("{workers: true}", "", "4:11: runtime.workers: Input should be a valid integer, not true"),
        ('{workers: "2"}', "", '4:11: runtime.workers: Input should be a valid integer, not "2"'),
        ("{retries: true}", "", "4:11: runtime.retries: Input should be a valid integer, not true"),
        ("{engine: ray, ship: 1}", "", "4:24: runtime.ship: Input should be a valid boolean, not 1"),
        ("{shards: 0}", "", "4:11: runtime.shards: give a whole number of shards above 0, or auto, not 0"),
        ("{shards: autos}", "", '4:11: runtime.shards: give a whole number of shards above 0, or auto, not "autos"'),
        ("{ship: true}", "", "4:11: runtime.ship: ship is only used with engine: ray"),
        ("{engine: ray, address: ''}", "", "4:24: runtime.address: String should have at least 1 character"),
        ("{engine: true}", "", "4:11: runtime.engine: Input should be 'local' or 'ray', not true"),
        ("{}", "{bins: true}", "3:60: analyses.0.params.bins: Input should be a valid integer, not true"),
        ("{}", "{sigma: x}", "3:59: analyses.0.params.sigma: Input should be a valid number or 'alignment', not \"x\""),
    ],
)
def test_a_value_of_the_wrong_type_is_one_message_never_read_as_another(tmp_path, capsys, runtime, analysis, message):
    """pydantic read `workers: true` as one worker, `"2"` as 2 and `ship: 1` as true, and printed the
    error of each member of a union (`shards: 0`) on a line of its own."""
    estimator = "information_plane" if "sigma" in analysis else "activation_entropy"
    params = f", params: {analysis}" if analysis else ""
    spec = write_spec(
        tmp_path,
        "model: {source: tiny.onnx}\ndata: {source: digits}\n"
        f"analyses: [{{id: a, estimator: {estimator}{params}}}]\nruntime: {runtime}\n",
    )
    assert main(["validate", str(spec), "--no-model"]) == 2
    err = capsys.readouterr().err
    assert err == f"layerscope: error: {spec}:{message}\n", err


def test_a_wrong_data_batch_size_is_not_compared_as_a_number(tmp_path, capsys):
    """`data.batch_size: true` also gave "batch_size 100 is larger than data.batch_size (True)"."""
    spec = write_spec(
        tmp_path,
        "model: {source: tiny.onnx}\ndata: {source: digits, batch_size: true}\n"
        "analyses: [{id: ip, estimator: information_plane, params: {batch_size: 100}}]\n",
    )
    assert main(["validate", str(spec), "--no-model"]) == 2
    err = capsys.readouterr().err
    assert err == f"layerscope: error: {spec}:2:24: data.batch_size: Input should be a valid integer, not true\n", err
