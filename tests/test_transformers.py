"""Models with several inputs, token ids and attention: a closed-form attention model, padding, and one
test per model family (transformers' BERT, GPT-2, ViT, T5 encoder from small configs with random
weights; an LSTM classifier), each exported through the torch adapter and analysed from a spec.

transformers is imported by the tests that build its models (:func:`tiny`), not when the module is
collected: the other tests need only torch, and importing transformers takes seconds."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import layerscope
from layerscope.testing import assert_records_close
from layerscope.util.errors import UserError

HEADS, WIDTH = 2, 8


class IdenticalKeys(nn.Module):
    """One attention layer whose keys are one learnt vector at every position: each query's scores are
    equal across the real keys, so its attention probabilities are exactly 1/L over a sequence's L real
    tokens and 0 at padding (masked with -1e9)."""

    def __init__(self, vocab: int = 50):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, WIDTH)
        self.query, self.value = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.key = nn.Parameter(torch.randn(HEADS, WIDTH // HEADS))
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        hidden = self.embed(input_ids)
        batch, tokens, _ = hidden.shape
        split = (batch, tokens, HEADS, WIDTH // HEADS)
        query = self.query(hidden).view(split).transpose(1, 2)
        value = self.value(hidden).view(split).transpose(1, 2)
        keys = self.key[None, :, None, :].expand(batch, HEADS, tokens, WIDTH // HEADS)
        scores = query @ keys.transpose(-1, -2) / math.sqrt(WIDTH // HEADS)
        scores = scores + (1.0 - attention_mask[:, None, None, :].to(scores.dtype)) * -1e9
        mixed = (scores.softmax(dim=-1) @ value).transpose(1, 2).reshape(batch, tokens, WIDTH)
        features = self.mlp(mixed)
        mask = attention_mask[:, :, None].to(features.dtype)
        return self.head((features * mask).sum(1) / mask.sum(1))


def token_data(tmp_path, samples: int = 48, tokens: int = 16, padded_to: int | None = None, seed: int = 0):
    """Token ids and masks of random lengths 3..tokens (padding after the real tokens), labels 0..2,
    saved as an npz; *padded_to* appends padded positions. Returns (path, lengths, labels)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, tokens + 1, samples)
    mask = (np.arange(tokens)[None] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, 50, (samples, tokens)) * mask
    if padded_to:
        extra = np.zeros((samples, padded_to - tokens), np.int64)
        ids, mask = np.concatenate([ids, extra], 1), np.concatenate([mask, extra], 1)
    labels = rng.integers(0, 3, samples)
    path = tmp_path / f"tokens{padded_to or tokens}.npz"
    np.savez(path, ids=ids, mask=mask, y=labels)
    return path, lengths, labels


def token_spec(model, path, analyses, batch_size: int = 16) -> dict:
    return {
        "model": {"source": model},
        "data": {
            "source": "npz",
            "path": str(path),
            "inputs": {"input_ids": "ids", "attention_mask": "mask"},
            "batch_size": batch_size,
            "shuffle": False,
        },
        "analyses": analyses,
    }


def binary_entropy(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def test_uniform_attention_over_k_real_keys_gives_log2_k(tmp_path):
    """The default for attention maps: the Shannon entropy of each real query's attention over the real keys.
    With identical keys each of a sequence's L real queries attends uniformly to its L real keys: log2 L bits
    for every head, so per class the mean over real queries is Σ L·log2 L / Σ L."""
    path, lengths, labels = token_data(tmp_path)
    analyses = [{"id": "att", "estimator": "activation_entropy", "on": {"attention": "probabilities"}}]
    results = layerscope.run(token_spec(IdenticalKeys(), path, analyses), write=False, progress=False)
    records = [r for r in results.records if r["analysis"] == "att"]
    for key in (0, 1, 2, "all"):
        chosen = lengths if key == "all" else lengths[labels == key]
        expected = float((chosen * np.log2(chosen)).sum() / chosen.sum())
        (entropy,) = [r for r in records if r["class"] == key and r["metric"] == "entropy"]
        heads = [r for r in records if r["class"] == key and r["metric"] == "head_entropy"]
        assert entropy["value"] == pytest.approx(expected, abs=1e-6)  # float32 probabilities
        assert [h["head"] for h in heads] == list(range(HEADS))
        assert all(h["value"] == pytest.approx(expected, abs=1e-6) for h in heads)
        assert entropy["samples"] == chosen.sum() and entropy["variant"] == "attention"
        assert entropy["keys"] == lengths.max()


def test_uniform_attention_gives_the_closed_form_binary_entropy_as_neurons(tmp_path):
    """With attention: as_neurons, the binary variant: every real query-key pair has probability 1/L; above a
    threshold of 0.095 a head is on exactly for sequences of L ≤ 10, so per class p = Σ L²[L ≤ 10] / Σ L² over
    its sequences (each has L² real pairs), the same for both heads."""
    path, lengths, labels = token_data(tmp_path)
    analyses = [
        {
            "id": "att",
            "estimator": "activation_entropy",
            "on": {"attention": "probabilities"},
            "params": {"threshold": 0.095, "attention": "as_neurons"},
        }
    ]
    results = layerscope.run(token_spec(IdenticalKeys(), path, analyses), write=False, progress=False)
    entropy = {r["class"]: r["value"] for r in results.records if r["metric"] == "entropy"}
    for key in (0, 1, 2, "all"):
        chosen = lengths if key == "all" else lengths[labels == key]
        p = float((chosen**2 * (chosen <= 10)).sum() / (chosen**2).sum())
        assert entropy[key] == pytest.approx(binary_entropy(p), abs=1e-12)
    assert results.models[0]["token_mask"] == "attention_mask"
    assert [i["dtype"] for i in results.models[0]["inputs"]] == ["int64", "int64"]
    assert "real query-key pair" in results.analyses[0]["tokens"]


def test_padding_changes_no_record(tmp_path):
    """The same sequences with 8 extra padded positions give the same records: every estimator that runs
    on token ids, on hidden states, MLP activations and attention."""
    analyses = [
        {"id": "entropy", "estimator": "activation_entropy"},
        {"id": "attention", "estimator": "activation_entropy", "on": {"attention": "probabilities"}},
        {
            "id": "attention-binary",
            "estimator": "activation_entropy",
            "on": {"attention": "probabilities"},
            "params": {"attention": "as_neurons"},
        },
        {"id": "histogram", "estimator": "activation_entropy", "params": {"variant": "histogram"}},
        {"id": "signature", "estimator": "nonlinearity_signature"},
    ]
    runs = []
    for padded_to in (None, 24):
        path, _, _ = token_data(tmp_path, padded_to=padded_to)
        runs.append(layerscope.run(token_spec(IdenticalKeys(), path, analyses), write=False, progress=False))
    short, long = runs
    assert {r["analysis"] for r in short.records} == {a["id"] for a in analyses}
    assert any(r["op_type"] == "attention softmax" for r in short.records if r["analysis"] == "signature")
    assert_records_close(long.records, short.records, rtol=1e-9, atol=1e-9)


def test_token_data_mismatches_name_the_input(tmp_path):
    import onnx

    from layerscope.adapters.torch_export import export_to_onnx

    path, _, _ = token_data(tmp_path)
    spec = token_spec(IdenticalKeys(), path, [{"id": "e", "estimator": "activation_entropy"}])
    spec["data"]["inputs"] = {"input_ids": "ids"}
    with pytest.raises(
        UserError,
        match=r"the data's inputs \(input_ids\) do not fit the model's forward"
        r"\(input_ids, attention_mask\): missing a required argument",
    ):
        layerscope.run(spec, write=False, progress=False)
    example = {"input_ids": np.ones((2, 4), np.int64), "attention_mask": np.ones((2, 4), np.int64)}
    onnx.save(export_to_onnx(IdenticalKeys(), example), tmp_path / "attention.onnx")
    spec["model"]["source"] = str(tmp_path / "attention.onnx")
    with pytest.raises(
        UserError,
        match=r"no array for model input\(s\) attention_mask \(model inputs: input_ids "
        r"\(int64, batch×",
    ):
        layerscope.run(spec, write=False, progress=False)
    spec["data"]["inputs"] = {"input_ids": "ids", "attention_mask": "mask", "extra": "y"}
    with pytest.raises(UserError, match=r"'extra' is not a data input of the model"):
        layerscope.run(spec, write=False, progress=False)
    spec["data"]["inputs"] = {"input_ids": "ids", "attention_mask": "mask"}
    np.savez(path, ids=np.full((4, 16), 1.5), mask=np.ones((4, 16)), y=np.zeros(4))
    with pytest.raises(UserError, match=r"input 'input_ids' from data source 'npz .*' holds non-integral values"):
        layerscope.run(spec, write=False, progress=False)
    path, _, _ = token_data(tmp_path)
    spec = token_spec(IdenticalKeys(), path, [{"id": "md", "estimator": "mean_dimension"}])
    with pytest.raises(UserError, match=r"mean_dimension perturbs the features of one float model input.*input_ids"):
        layerscope.run(spec, write=False, progress=False)


def tiny(kind: str):
    """A transformers model of family *kind* from a small config, random weights (no download); the
    calling test is skipped without transformers."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 32, "intermediate_size": 64}
    if kind == "bert":
        return transformers.BertForSequenceClassification(
            transformers.BertConfig(vocab_size=50, max_position_embeddings=64, num_labels=3, **common)
        )
    if kind == "gpt2":
        return transformers.GPT2Model(
            transformers.GPT2Config(
                vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
            )
        )
    if kind == "t5":
        return transformers.T5EncoderModel(
            transformers.T5Config(vocab_size=50, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)
        )
    return transformers.ViTModel(transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, **common))


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, layer",
    [
        ("bert", "bert.encoder.layer.1.intermediate.intermediate_act_fn"),
        ("gpt2", "h.1.mlp.act"),
        ("t5", "encoder.block.1.layer.1.DenseReluDense.act"),
    ],
)
def test_token_models_from_transformers(tmp_path, kind, layer):
    """BERT, GPT-2 and T5's encoder (exported through torch's default decompositions) on token ids and
    masks: the MLP activations and every layer's attention softmax, layer names the module paths."""
    path, _, _ = token_data(tmp_path, samples=32)
    analyses = [
        {"id": "entropy", "estimator": "activation_entropy"},
        {"id": "signature", "estimator": "nonlinearity_signature"},
    ]
    results = layerscope.run(token_spec(tiny(kind), path, analyses), write=False, progress=False)
    signature = [r for r in results.records if r["analysis"] == "signature" and r["metric"] == "affinity_score"]
    assert layer in {r["layer"] for r in results.records if r["analysis"] == "entropy"}
    assert sum(r["op_type"] == "attention softmax" for r in signature) == 2  # one per layer
    assert [r["position"] for r in signature] == sorted(r["position"] for r in signature)
    assert all(0 <= r["value"] <= 1 for r in signature)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_attention_entropy_equals_that_of_transformers_own_attention_maps(tmp_path, kind):
    """Each layer's default attention record is the mean over real queries of the entropy of transformers'
    own (eager) attention probabilities over the real keys; GPT-2's causal mask is in the probabilities. The
    binary pattern entropy of the same maps is a constant of the masks (0 for BERT: every probability is
    above 0; for GPT-2 the causal mask alone decides which are 0)."""
    path, _, _ = token_data(tmp_path, samples=32)
    model = tiny(kind)
    analyses = [
        {"id": "dist", "estimator": "activation_entropy", "on": {"attention": "probabilities"}},
        {
            "id": "bin",
            "estimator": "activation_entropy",
            "on": {"attention": "probabilities"},
            "params": {"attention": "as_neurons"},
        },
    ]
    results = layerscope.run(token_spec(model, path, analyses), write=False, progress=False)
    pooled = [r for r in results.records if r["class"] == "all" and r["metric"] == "entropy"]
    got = [r["value"] for r in pooled if r["analysis"] == "dist"]
    data = np.load(path)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        maps = model.eval()(
            input_ids=torch.from_numpy(data["ids"]),
            attention_mask=torch.from_numpy(data["mask"]),
            output_attentions=True,
        ).attentions
    expected = []
    for attention in maps:
        per_query = []
        for n, length in enumerate(data["mask"].sum(axis=1)):
            p = attention[n, :, :length, :length].double().numpy()
            p = p / p.sum(-1, keepdims=True)
            per_query.append(-(p * np.log2(np.where(p > 0, p, 1.0))).sum(-1).T)  # queries × heads
        expected.append(float(np.concatenate(per_query).mean()))
    assert got == pytest.approx(expected, abs=1e-5)
    binary = {round(r["value"], 9) for r in pooled if r["analysis"] == "bin"}
    assert len(binary) == 1 and (binary == {0.0}) == (kind == "bert")


@pytest.mark.slow
def test_a_glob_over_gpt2_modules_selects_one_tensor_per_layer(tmp_path):
    """GPT-2's activation module computes its tanh-form GELU in eight ops: ``*mlp.act*`` selects the
    module's output, one tensor per layer; ``inner: true`` adds the seven steps inside it."""
    path, _, _ = token_data(tmp_path, samples=8)
    analyses = [
        {"id": "act", "estimator": "activation_entropy", "on": {"glob": "*mlp.act*"}},
        {"id": "inside", "estimator": "activation_entropy", "on": {"glob": "*mlp.act*", "inner": True}},
    ]
    spec = token_spec(tiny("gpt2"), path, analyses)
    assert layerscope.validate(spec)[-1].endswith("act selects 2 tensors, inside selects 16 tensors")
    results = layerscope.run({**spec, "analyses": analyses[:1]}, write=False, progress=False)
    assert [t["layer"] for t in results.models[0]["tensors"]] == ["h.0.mlp.act", "h.1.mlp.act"]


@pytest.mark.slow
def test_vit_runs_every_image_estimator(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "images.npz", x=rng.random((24, 3, 16, 16), dtype=np.float32), y=rng.integers(0, 2, 24))
    analyses = [
        {"id": "entropy", "estimator": "activation_entropy"},
        {"id": "signature", "estimator": "nonlinearity_signature"},
        {"id": "ip", "estimator": "information_plane", "params": {"batch_size": 12}},
        {"id": "md", "estimator": "mean_dimension", "on": {"role": "output"}, "params": {"features": "patches:4"}},
    ]
    spec = {
        "model": {"source": tiny("vit")},
        "data": {"source": "npz", "path": str(tmp_path / "images.npz"), "batch_size": 12},
        "analyses": analyses,
    }
    results = layerscope.run(spec, write=False, progress=False)
    assert {r["analysis"] for r in results.records} == {"entropy", "signature", "ip", "md"}
    assert "layers.0.mlp.activation_fn" in {r["layer"] for r in results.records}


FACTORY = """
import torch, transformers

def bert():
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=64))
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_bert_from_a_python_factory_through_the_cli(tmp_path):
    path, _, _ = token_data(tmp_path, samples=16)
    (tmp_path / "models.py").write_text(FACTORY)
    (tmp_path / "spec.yaml").write_text(f"""
model: {{source: "python:models:bert"}}
data: {{source: npz, path: {path.name}, inputs: {{input_ids: ids, attention_mask: mask}}, batch_size: 8}}
analyses:
  - {{id: attention, estimator: nonlinearity_signature, on: {{attention: probabilities}}}}
outputs: {{dir: out, formats: [json]}}
""")
    check = subprocess.run(
        [sys.executable, "-m", "layerscope", "validate", "spec.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    assert "inputs input_ids (int64, batch×" in check.stdout
    run = subprocess.run(
        [sys.executable, "-m", "layerscope", "run", "spec.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    records = json.loads((tmp_path / "out" / "results.json").read_text())["records"]
    assert {r["layer"].split("/")[0] for r in records} == {"encoder.layer.0.attention.self"}


class LSTMClassifier(nn.Module):
    def __init__(self, recurrent=nn.LSTM):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = recurrent(6, 12, batch_first=True)
        self.head = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.slow
@pytest.mark.parametrize("recurrent", [nn.LSTM, nn.GRU])
def test_recurrent_models_are_analysed_where_observable(tmp_path, recurrent, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "seq.npz", x=rng.standard_normal((40, 5, 6), dtype=np.float32), y=rng.integers(0, 3, 40))
    spec = {
        "model": {"source": LSTMClassifier(recurrent)},
        "data": {"source": "npz", "path": str(tmp_path / "seq.npz"), "batch_size": 20},
        "analyses": [
            {"id": "e", "estimator": "activation_entropy"},
            {"id": "s", "estimator": "nonlinearity_signature"},
        ],
    }
    results = layerscope.run(spec, write=False, progress=False)
    assert {r["layer"] for r in results.records} == {"head.1"}  # the gates live inside the fused op
    from layerscope.adapters.torch_export import export_to_onnx
    from layerscope.cli.inspect import inspect_model

    onnx_path = tmp_path / "rnn.onnx"
    import onnx

    onnx.save(export_to_onnx(LSTMClassifier(recurrent), rng.standard_normal((2, 5, 6)).astype(np.float32)), onnx_path)
    inspect_model(str(onnx_path))
    assert f"{recurrent.__name__} node" in capsys.readouterr().out
