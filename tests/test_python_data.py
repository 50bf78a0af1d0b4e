"""Data handed over from Python: ``layerscope.run(spec, data=...)`` with arrays, named arrays, torch
datasets and DataLoaders gives the records the same samples give through npz; bad objects are named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

import layerscope
from layerscope.plugins.data.digits import load_digits_split
from layerscope.util.errors import SpecError, UserError

ANALYSES = [
    {"id": "entropy", "estimator": "activation_entropy"},
    {"id": "signature", "estimator": "nonlinearity_signature"},
]


def _spec(**data) -> dict:
    return {
        "model": {"source": "demo:digits-mlp"},
        "data": {"batch_size": 50, "shuffle": True, **data},
        "analyses": ANALYSES,
    }


def _records(spec, data=None) -> list[dict]:
    return layerscope.run(spec, data=data, write=False, progress=False).records


def _same(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        assert {k: v for k, v in a.items() if k != "value"} == {k: v for k, v in b.items() if k != "value"}
        assert a["value"] == pytest.approx(b["value"], rel=1e-12, abs=1e-12)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_split("test")
    return x[:150], y[:150]


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("npz")
    np.savez(folder / "d.npz", x=digits[0], y=digits[1])
    return _records(_spec(source="npz", path=str(folder / "d.npz")))


class PairDataset(Dataset):
    """Items (x, y) as torch tensors, like most user datasets."""

    def __init__(self, x, y):
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return self.x[index], self.y[index]


class DictDataset(PairDataset):
    """Items as mappings with the label under "label" (the Hugging Face convention)."""

    def __getitem__(self, index):
        return {"x": self.x[index].numpy(), "label": int(self.y[index])}


@pytest.mark.parametrize(
    "kind", ["arrays", "tensors", "dataset", "dict-dataset", "tensor-dataset", "loader", "dict-spec"]
)
def test_python_data_gives_the_npz_records(kind, digits, reference):
    x, y = digits
    spec = _spec()
    data = {
        "arrays": (x, y),
        "tensors": (torch.from_numpy(x), torch.from_numpy(y)),
        "dataset": PairDataset(x, y),
        "dict-dataset": DictDataset(x, y),
        "tensor-dataset": TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
        "loader": DataLoader(PairDataset(x, y), batch_size=7, shuffle=True),
    }.get(kind)
    if kind == "dict-spec":  # the object as data.source of a dict spec
        spec = _spec(source=(x, y))
    _same(_records(spec, data), reference)


def test_string_labels_and_named_inputs_from_python(digits, reference):
    x, y = digits
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    records = _records(_spec(), data=({"x": x}, names[y].tolist()))
    by_class = {r.get("class") for r in records}
    assert "seven" in by_class and 7 not in by_class
    assert len(records) == len(reference)


def test_python_data_in_worker_processes_equals_one_process(digits, reference):
    spec = {**_spec(), "runtime": {"workers": 2, "shards": 2}}
    _same(_records(spec, data=digits), reference)


class Endless(IterableDataset):
    def __iter__(self):
        yield from ()


class Failing(PairDataset):
    def __getitem__(self, index):
        if index == 3:
            raise KeyError("no such file: 3.png")
        return super().__getitem__(index)


class Ragged(PairDataset):
    def __getitem__(self, index):
        return self.x[index][: 64 - index % 2], self.y[index]


@pytest.mark.parametrize(
    "data, message",
    [
        ("digits.npz", r"a str is not data layerscope reads; give an array, \(x, y\)"),
        ({"input": np.zeros((5, 64)), "mask": np.zeros((4, 64))}, r"same number of samples .*input: 5, mask: 4"),
        ((np.zeros((5, 64)), np.zeros(4)), "4 labels for 5 samples"),
        ((np.zeros((5, 64)), np.array([None] * 5)), "the labels holds Python objects"),
        (DataLoader(Endless()), "cannot be read by index"),
        (
            Failing(np.zeros((10, 64), np.float32), np.zeros(10, np.int64)),
            r"reading item 3 of the dataset failed: KeyError: 'no such file: 3.png'",
        ),
        (Ragged(np.zeros((10, 64), np.float32), np.zeros(10, np.int64)), r"differ in shape \(\[64\] and \[63\]"),
        (PairDataset(np.zeros((0, 64), np.float32), np.zeros(0, np.int64)), "the dataset has no samples"),
        (
            DataLoader(
                PairDataset(np.zeros((10, 64), np.float32), np.zeros(10, np.int64)), collate_fn=lambda items: items
            ),
            r"a collated batch is a sequence of \d+ parts|the batch cannot be read as an array",
        ),
        ((np.zeros((4, 64)), [[1, 2], [3]] * 2), r"the labels cannot be read as an array"),
    ],
)
def test_bad_python_data_is_a_user_error_naming_it(data, message):
    spec = {**_spec(shuffle=False), "analyses": [{"id": "entropy", "estimator": "activation_entropy"}]}
    with pytest.raises(UserError, match=message):
        layerscope.run(spec, data=data, write=False, progress=False)


def test_labels_needed_but_not_given():
    spec = {**_spec(), "analyses": [{"id": "ip", "estimator": "information_plane", "params": {"batch_size": 50}}]}
    with pytest.raises(UserError, match="'information_plane' needs labels, but the data source 'python' has none"):
        layerscope.validate(spec, data=np.zeros((5, 64), np.float32), with_model=False)


def test_dict_spec_errors_name_the_key_path_not_a_line():
    with pytest.raises(SpecError) as caught:
        layerscope.validate({**_spec(), "data": {"batch_size": -1}}, with_model=False)
    assert str(caught.value).splitlines()[0].startswith("<spec>: data.batch_size: ")
    assert ":1:1" not in str(caught.value)


class OpenedHere(PairDataset):
    """A dataset that cannot be rebuilt in another process (as one holding an open handle)."""

    def __setstate__(self, state):
        raise RuntimeError("this dataset holds a handle that only its own process can use")


@pytest.mark.slow
def test_objects_worker_processes_cannot_take_are_user_errors(digits):
    x, y = digits
    spec = {
        **_spec(),
        "analyses": [{"id": "entropy", "estimator": "activation_entropy"}],
        "runtime": {"workers": 2, "shards": 2},
    }
    with pytest.raises(UserError, match=r"runtime.workers: the run cannot be sent to worker processes \(.*lambda"):
        layerscope.run(
            spec,
            data=DataLoader(PairDataset(x, y), collate_fn=lambda items: default_collate(items)),
            write=False,
            progress=False,
        )
    with pytest.raises(
        UserError,
        match=r"runtime.workers: a worker process could not rebuild the run "
        r"\(RuntimeError: this dataset holds a handle",
    ):
        layerscope.run(spec, data=OpenedHere(x, y), write=False, progress=False)
