"""The plugin host: entry points, deterministic loading, registries and lifecycle hooks."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

import layerscope
from layerscope import Estimator, hookimpl
from layerscope.host.loader import load_plugins
from layerscope.util.errors import SpecError, UserError

BUILTINS = {"activation_entropy", "demo_zoo", "digits", "file_reporters", "npz", "onnx_file", "synthetic", "torch"}


def test_plugins_command_lists_builtins_and_contributions():
    out = subprocess.run([sys.executable, "-m", "layerscope", "plugins"], capture_output=True, text=True, check=True)
    listed = {p["name"]: p for p in json.loads(out.stdout)}
    assert BUILTINS <= set(listed)
    assert listed["activation_entropy"]["estimators"] == ["activation_entropy"]
    assert listed["file_reporters"]["reporters"] == ["csv"]
    assert listed["demo_zoo"]["adapters"] == ["demo"] and listed["digits"]["version"] == layerscope.__version__
    assert (
        listed["digits"]["distribution"] == "layerscope"
        and listed["digits"]["module"] == "layerscope.plugins.data.digits"
    )
    # the example third-party package appears under the distribution the user installed
    assert {k: listed["linear_cka"][k] for k in ("distribution", "version", "module")} == {
        "distribution": "layerscope-cka",
        "version": "0.1.0",
        "module": "layerscope_cka",
    }


def plugins_command(*args: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "layerscope", "plugins", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )  # tables unwrapped


def test_plugins_table_names_the_packages():
    done = plugins_command("--table")
    assert done.returncode == 0 and "layerscope-cka" in done.stdout and "linear_cka" in done.stdout, done.stderr


def test_plugins_name_describes_an_estimators_parameters():
    (entry,) = json.loads(plugins_command("activation_entropy").stdout)
    assert entry["kind"] == "estimator" and entry["distribution"] == "layerscope"
    assert entry["default_selector"] == {"activation": "output"} and entry["needs_labels"] is False
    assert entry["passes"] == 1 and entry["reconstructed"].startswith("Wang et al. 2019")
    parameters = {p["name"]: p for p in entry["parameters"]}
    assert parameters["variant"] == {
        "name": "variant",
        "type": "binary | histogram | pattern",
        "default": "binary",
        "description": parameters["variant"]["description"],
    }
    assert parameters["range"]["type"] == "tuple[float, float] | None" and parameters["range"]["default"] is None
    assert all(p.get("description") for p in entry["parameters"])
    (ip,) = json.loads(plugins_command("information_plane").stdout)
    assert ip["needs_labels"] is True and ip["passes"] == 2 and ip["reconstructed"] is None
    table = plugins_command("activation_entropy", "--table").stdout
    assert "tuple[float, float] | None" in table and "estimator: activation_entropy" in table


@pytest.mark.parametrize(
    "name, kind, snippet",
    [
        ("npz", "data source", "data:\n  source: npz\n  path: <str>\n"),
        ("csv", "reporter", "outputs:\n  formats: [json, csv]\n"),
        ("onnx", "adapter", "model:\n  source: <a model this adapter claims>\n"),
    ],
)
def test_plugins_name_describes_data_sources_reporters_and_adapters(name, kind, snippet):
    (entry,) = json.loads(plugins_command(name).stdout)
    assert entry["kind"] == kind and entry["spec"] == snippet and entry["summary"]


def test_plugins_name_of_a_plugin_lists_its_contributions_and_unknown_names_get_did_you_mean():
    described = json.loads(plugins_command("file_reporters").stdout)
    assert [d["name"] for d in described] == ["csv"]
    done = plugins_command("activation_entrop")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "Did you mean 'activation_entropy'?" in done.stderr


def test_every_estimators_spec_snippet_runs():
    import yaml

    host = load_plugins()
    from layerscope.host.describe import describe_contribution

    for name in host.estimators.names():
        snippet = yaml.safe_load(describe_contribution(host, "estimators", name)["spec"])
        spec = {
            "model": {"source": "demo:digits-gap"},
            "data": {"source": "digits", "limit": 40, "batch_size": 20},
            **snippet,
        }
        if name == "information_plane":
            spec["analyses"][0]["params"] = {"batch_size": 20, "sigma_grid": 10}
        results = layerscope.run(spec, write=False, progress=False)
        assert results.records and not results.failures, name


def test_a_closed_pipe_is_not_an_error():
    done = subprocess.run(
        f"{sys.executable} -m layerscope plugins --table | head -c 10", shell=True, capture_output=True, text=True
    )
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr


def test_load_plugins_env_selects_entry_points(monkeypatch):
    monkeypatch.setenv("LAYERSCOPE_LOAD_PLUGINS", "digits,npz")
    host = load_plugins()
    assert host.data_sources.names() == ["digits", "npz"] and host.estimators.names() == []
    monkeypatch.setenv("LAYERSCOPE_LOAD_PLUGINS", "")
    assert load_plugins().pm.get_plugins() == set()


def test_results_json_is_written_by_core_without_any_reporter_plugin(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERSCOPE_LOAD_PLUGINS", "demo_zoo,digits,activation_entropy")
    spec = {
        "model": {"source": "demo:digits-mlp"},
        "data": {"limit": 100},
        "analyses": [{"id": "e", "estimator": "activation_entropy"}],
        "outputs": {"dir": str(tmp_path), "formats": ["json"]},
    }
    assert layerscope.validate(spec, with_model=False)
    results = layerscope.run(spec, progress=False)
    assert json.loads((tmp_path / "results.json").read_text())["records"] == results.records and results.records
    with pytest.raises(layerscope.SpecError, match=r"outputs.formats.1: unknown reporter 'csv'"):
        layerscope.validate({**spec, "outputs": {"formats": ["json", "csv"]}}, with_model=False)
    # the default formats (json, csv) ask for csv only when a plugin provides it
    assert layerscope.validate({k: v for k, v in spec.items() if k != "outputs"}, with_model=False)


class Counting(Estimator):
    """A minimal third-party estimator: the number of samples seen per tensor."""

    name = "sample_count"
    default_selector = {"op_type": "Relu"}

    def setup(self):
        self.add_state("counts", {}, "sum")

    def update(self, batch):
        for name, value in batch.tensors.items():
            self.counts[name] = self.counts.get(name, 0) + value.shape[0]

    def finalize(self):
        return [self.record(name, "samples", n) for name, n in self.counts.items()]


def make_plugin(events):
    plugin = types.SimpleNamespace()
    plugin.register_estimators = hookimpl(lambda register: register(Counting))
    plugin.before_run = hookimpl(lambda spec, models: events.append(("before", tuple(models))))
    plugin.after_batch = hookimpl(lambda model, batch_index, samples: events.append(("batch", samples)))
    plugin.after_run = hookimpl(lambda results: events.append(("after", len(results.records))))
    return plugin


def test_third_party_estimator_and_lifecycle_hooks():
    events = []
    spec = {
        "model": {"source": "demo:digits-mlp"},
        "data": {"source": "digits", "limit": 250, "batch_size": 100},
        "analyses": [{"id": "n", "estimator": "sample_count"}],
    }
    results = layerscope.run(spec, write=False, progress=False, plugins=(make_plugin(events),))
    assert {r["value"] for r in results.records} == {250.0}
    assert events == [("before", ("digits-mlp",)), ("batch", 100), ("batch", 100), ("batch", 50), ("after", 3)]


def test_duplicate_estimator_name_is_an_error():
    plugin = types.SimpleNamespace(
        register_estimators=hookimpl(
            lambda register: register(type("Dup", (Counting,), {"name": "activation_entropy"}))
        )
    )
    with pytest.raises(UserError, match="registered by both"):
        load_plugins((plugin,))


def test_misspelt_hook_is_named_and_the_plugin_left_out(capsys):
    plugin = types.ModuleType("typo_plugin")
    plugin.register_estimatorz = hookimpl(lambda register: register(Counting))
    host = load_plugins((plugin,))
    assert "typo_plugin" in capsys.readouterr().err
    assert "register_estimatorz" in host.load_errors["typo_plugin"]
    assert "sample_count" not in host.estimators and "activation_entropy" in host.estimators
    assert any("typo_plugin" in line for line in host.load_warnings())


class Exploding(Counting):
    name = "exploding"

    def update(self, batch):
        raise RuntimeError("boom")


def test_an_estimator_raising_in_update_leaves_the_other_analyses_complete(tmp_path):
    plugin = types.ModuleType("fragile_plugin")
    plugin.register_estimators = hookimpl(lambda register: register(Exploding))
    spec = {
        "model": {"source": "demo:digits-mlp"},
        "data": {"source": "digits", "limit": 200},
        "analyses": [{"id": "bad", "estimator": "exploding"}, {"id": "good", "estimator": "activation_entropy"}],
        "outputs": {"dir": str(tmp_path)},
    }
    results = layerscope.run(spec, progress=False, plugins=(plugin,))
    assert {r["analysis"] for r in results.records} == {"good"}
    (failure,) = results.failures
    assert failure["analysis"] == "bad" and failure["plugin"] == "fragile_plugin" and failure["phase"] == "update"
    assert "RuntimeError: boom" in failure["error"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["failures"] == results.failures
    assert any("fragile_plugin" in w for w in saved["warnings"])


def test_a_plugin_raising_while_registering_is_named():
    def broken(register):
        raise ImportError("missing dependency xyz")

    plugin = types.ModuleType("needy_plugin")
    plugin.register_estimators = hookimpl(broken)
    host = load_plugins((plugin,))
    assert "missing dependency xyz" in host.load_errors["needy_plugin"]
    assert "activation_entropy" in host.estimators


def test_third_party_adapter_data_source_reporter_and_error_hook(tmp_path):
    import numpy as np

    from layerscope import Adapter, Checkpoint, DataSource, LoadedModel, Reporter
    from layerscope.testing.models import tiny_mlp

    class TinyAdapter(Adapter):
        name = "tiny"

        def claims(self, section):
            return section.source == "tiny:mlp"

        def checkpoints(self, section, spec):
            return [Checkpoint("tiny", None)]

        def load(self, checkpoint, spec, example):
            return LoadedModel(tiny_mlp(), checkpoint.label, "tiny:mlp", framework="test")

    class Ramp(DataSource):
        name = "ramp"

        def __len__(self):
            return 40

        @property
        def has_labels(self):
            return False

        def read(self, indices):
            return np.linspace(-1, 1, 64, dtype=np.float32)[None, :] * (np.asarray(indices)[:, None] - 20) / 20, None

    class Lines(Reporter):
        name = "lines"

        def write(self, results, out_dir):
            (out_dir / "lines.txt").write_text("\n".join(f"{r['metric']} {r['value']}" for r in results.records))
            return ["lines.txt"]

    errors = []
    plugin = types.ModuleType("kit_plugin")
    plugin.register_adapters = hookimpl(lambda register: register(TinyAdapter))
    plugin.register_data_sources = hookimpl(lambda register: register(Ramp))
    plugin.register_reporters = hookimpl(lambda register: register(Lines))
    plugin.on_run_error = hookimpl(lambda error: errors.append(error))
    spec = {
        "model": {"source": "tiny:mlp"},
        "data": {"source": "ramp", "batch_size": 16},
        "analyses": [{"id": "e", "estimator": "activation_entropy"}],
        "outputs": {"dir": str(tmp_path), "formats": ["json", "lines"]},
    }
    results = layerscope.run(spec, progress=False, plugins=(plugin,))
    assert results.models[0]["framework"] == "test" and results.runtime["samples"] == 40
    assert "lines.txt" in results.artifacts and (tmp_path / "lines.txt").read_text().startswith("entropy")
    spec["analyses"][0]["on"] = {"name": "nothing"}
    with pytest.raises(UserError):
        layerscope.run(spec, progress=False, plugins=(plugin,))
    assert len(errors) == 1 and "matches no tensor" in str(errors[0])


def test_adapters_own_the_keys_of_the_model_section(tmp_path):
    """A third-party adapter validates its own keys; built-in adapters name the keys they read."""
    from pydantic import Field

    from layerscope import Adapter, Checkpoint, LoadedModel
    from layerscope.model.adapter import ModelParams
    from layerscope.testing.models import tiny_mlp

    class ZooParams(ModelParams):
        variant: int = Field(1, ge=1, description="which tiny model")

    class ZooAdapter(Adapter):
        name = "zoo"
        Params = ZooParams

        def claims(self, section):
            return section.source == "zoo"

        def checkpoints(self, params, spec):
            return [Checkpoint(f"zoo-{params.variant}", params.variant)]

        def load(self, checkpoint, spec, example):
            return LoadedModel(tiny_mlp(), checkpoint.label, "zoo", framework="test")

    plugin = types.ModuleType("zoo_plugin")
    plugin.register_adapters = hookimpl(lambda register: register(ZooAdapter))
    base = {"data": {"source": "digits", "limit": 50}, "analyses": [{"id": "e", "estimator": "activation_entropy"}]}
    results = layerscope.run(
        {**base, "model": {"source": "zoo", "variant": 3}}, write=False, progress=False, plugins=(plugin,)
    )
    assert [m["label"] for m in results.models] == ["zoo-3"]

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model:\n  source: demo:digits-mlp\n  weights: net.pt\nanalyses: [{id: e, estimator: activation_entropy}]\n"
    )
    with pytest.raises(SpecError) as error:
        layerscope.validate(str(spec), with_model=False)
    assert str(error.value) == (
        f"{spec}:3:3: model.weights: unknown key 'weights'. (the 'demo' adapter reads: source, checkpoints)"
    )
    spec.write_text(
        "model:\n  python: nets:make\n  wieghts: net.pt\nanalyses: [{id: e, estimator: activation_entropy}]\n"
    )
    with pytest.raises(
        SpecError,
        match=r"spec.yaml:3:3: model.wieghts: unknown key 'wieghts'. Did you mean 'weights'"
        r"\? \(the 'torch' adapter reads: source, python, weights, checkpoints\)",
    ):
        layerscope.validate(str(spec), with_model=False)
    spec.write_text(
        "model: {source: demo:digits-mlp, weights: net.pt}\ndata: {batch_size: 0}\n"
        "analyses: [{id: e, estimator: activation_entropy}]\n"
    )
    with pytest.raises(SpecError) as error:  # with a structural error elsewhere, both are reported
        layerscope.validate(str(spec), with_model=False)
    assert "model.weights: unknown key" in str(error.value) and "data.batch_size" in str(error.value)
    with pytest.raises(SpecError, match="model.source: required key is missing"):
        layerscope.validate(
            {"model": {}, "analyses": [{"id": "e", "estimator": "activation_entropy"}]}, with_model=False
        )


def test_two_adapters_claiming_one_model_is_an_error_naming_both_plugins():
    from layerscope import Adapter

    class Greedy(Adapter):
        name = "greedy"

        def claims(self, section):
            return True

    plugin = types.ModuleType("greedy_plugin")
    plugin.register_adapters = hookimpl(lambda register: register(Greedy))
    spec = {"model": {"source": "demo:digits-mlp"}, "analyses": [{"id": "e", "estimator": "activation_entropy"}]}
    with pytest.raises(
        SpecError,
        match="model.source: 2 adapters claim 'demo:digits-mlp': 'demo' of plugin "
        "'demo_zoo', 'greedy' of plugin 'greedy_plugin'",
    ):
        layerscope.validate(spec, plugins=(plugin,), with_model=False)
