"""The plugin host: entry points, deterministic loading, registries and lifecycle hooks."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

import layerscope
from layerscope import Estimator, hookimpl
from layerscope.errors import UserError
from layerscope.plugin_host import load_plugins

BUILTINS = {"activation_entropy", "demo_zoo", "digits", "file_reporters", "npz", "onnx_file", "synthetic", "torch"}


def test_plugins_command_lists_builtins_and_contributions():
    out = subprocess.run([sys.executable, "-m", "layerscope", "plugins"], capture_output=True, text=True, check=True)
    listed = {p["name"]: p for p in json.loads(out.stdout)}
    assert BUILTINS <= set(listed)
    assert listed["activation_entropy"]["estimators"] == ["activation_entropy"]
    assert listed["file_reporters"]["reporters"] == ["csv", "json"]
    assert listed["demo_zoo"]["adapters"] == ["demo"] and listed["digits"]["version"] == layerscope.__version__


def test_load_plugins_env_selects_entry_points(monkeypatch):
    monkeypatch.setenv("LAYERSCOPE_LOAD_PLUGINS", "digits,npz")
    host = load_plugins()
    assert host.data_sources.names() == ["digits", "npz"] and host.estimators.names() == []
    monkeypatch.setenv("LAYERSCOPE_LOAD_PLUGINS", "")
    assert load_plugins().pm.get_plugins() == set()


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
    spec = {"model": {"source": "demo:digits-mlp"}, "data": {"source": "digits", "limit": 250, "batch_size": 100},
            "analyses": [{"id": "n", "estimator": "sample_count"}]}
    results = layerscope.run(spec, write=False, progress=False, plugins=(make_plugin(events),))
    assert {r["value"] for r in results.records} == {250.0}
    assert events == [("before", ("digits-mlp",)), ("batch", 100), ("batch", 100), ("batch", 50), ("after", 3)]


def test_duplicate_estimator_name_is_an_error():
    plugin = types.SimpleNamespace(register_estimators=hookimpl(
        lambda register: register(type("Dup", (Counting,), {"name": "activation_entropy"}))))
    with pytest.raises(UserError, match="registered by both"):
        load_plugins((plugin,))


def test_misspelt_hook_fails_loudly():
    plugin = types.ModuleType("typo_plugin")
    plugin.register_estimatorz = hookimpl(lambda register: None)
    with pytest.raises(UserError, match="typo_plugin.*unknown hook"):
        load_plugins((plugin,))
