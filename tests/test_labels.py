"""Labels are classes: integers as they are, whole floats as integers, strings by name; anything else is refused."""

from __future__ import annotations

import numpy as np
import pytest

import layerscope
from layerscope.cli.main import main
from layerscope.data.labels import ClassLabels
from layerscope.testing import assert_records_close
from layerscope.util.errors import UserError

from .conftest import write_spec

NAMES = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])


def digits(n: int = 240):
    from layerscope.plugins.data.digits import load_digits_split

    x, y = load_digits_split("test")
    return x[:n], y[:n]


def analyse(tmp_path, y, name: str):
    x, _ = digits(len(y))
    np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    spec = {
        "model": {"source": "demo:digits-gap"},
        "data": {"source": "npz", "path": str(tmp_path / f"{name}.npz"), "batch_size": 60},
        "analyses": [
            {"id": "ent", "estimator": "activation_entropy"},
            {"id": "ip", "estimator": "information_plane", "params": {"batch_size": 60, "sigma_grid": 20}},
            {"id": "agg", "estimator": "aggregation_distribution", "params": {"plot_channels": 0}},
            {
                "id": "md",
                "estimator": "mean_dimension",
                "on": {"role": "output"},
                "params": {"pairs": 20, "nll": True, "features": "patches:4"},
            },
        ],
    }
    return layerscope.run(spec, write=False, progress=False)


def test_string_labels_are_classes_named_in_the_records(tmp_path):
    _, y = digits()
    by_number = analyse(tmp_path, y, "numbers")
    by_name = analyse(tmp_path, NAMES[y], "names")
    assert not by_name.failures and not by_number.failures
    assert {r["class"] for r in by_name.records if "class" in r} == {"all", *NAMES[np.unique(y)]}
    # the sorted names give codes eight=0, five=1, four=2 …: the nll target differs from the digit, so
    # compare everything but the loss, with the class renamed
    renamed = [
        {**r, "class": NAMES[r["class"]]} if isinstance(r.get("class"), int) else r
        for r in by_number.records
        if r["tensor"] != "nll"
    ]
    assert_records_close([r for r in by_name.records if r["tensor"] != "nll"], renamed, rtol=0, atol=1e-9)


def test_whole_float_labels_equal_integer_labels(tmp_path):
    _, y = digits(120)
    assert analyse(tmp_path, y.astype(np.float64), "floats").records == analyse(tmp_path, y, "ints").records


@pytest.mark.parametrize(
    "labels, message",
    [
        (lambda y: y + 0.5, r"sample \d+ has label \d+\.5, not a whole number"),
        (lambda y: np.where(np.arange(len(y)) == 7, np.nan, y.astype(float)), r"sample 7 has label nan, NaN or Inf"),
        (lambda y: np.eye(10)[y], r"one class per sample \(shape \(N,\)\), not shape \[120, 10\]; for one-hot"),
        (lambda y: np.array(["a", 1, None], dtype=object)[y % 3], r"holds Python objects \(dtype object\)"),
    ],
)
def test_labels_that_are_not_classes_are_user_errors_naming_source_and_key(tmp_path, capsys, labels, message):
    x, y = digits(120)
    np.savez(tmp_path / "d.npz", x=x, targets=labels(y), allow_pickle=True)
    spec = write_spec(
        tmp_path,
        "model: {source: demo:digits-cnn}\n"
        "data: {source: npz, path: d.npz, y_key: targets, shuffle: false}\n"
        "analyses: [{id: ent, estimator: activation_entropy}]\n"
        f"outputs: {{dir: {tmp_path / 'out'}}}\n",
    )
    assert main(["run", str(spec), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "targets" in err and "d.npz" in err, err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out" / "results.json").exists()


def test_class_labels_encode_and_decode():
    strings = ClassLabels(("cat", "dog"))
    assert strings.encode(np.array(["dog", "cat", "dog"]), "here").tolist() == [1, 0, 1]
    assert strings.encode(np.array([b"cat"]), "here").tolist() == [0]
    assert strings.decode(1) == "dog" and strings.decode("all") == "all"
    with pytest.raises(UserError, match="'bird' is not one of the run's classes"):
        strings.encode(np.array(["bird"]), "here")
    with pytest.raises(UserError, match="mixes string and numeric"):
        strings.encode(np.array([1, 2]), "here")
    numbers = ClassLabels()
    assert numbers.encode(np.array([[3.0], [1.0]]), "here").tolist() == [3, 1]
    assert numbers.encode(np.array([True, False]), "here").tolist() == [1, 0]
    assert numbers.decode(3) == 3


def test_nll_with_labels_outside_the_outputs_is_a_user_error(tmp_path):
    x, y = digits(60)
    np.savez(tmp_path / "d.npz", x=x, y=y + 10)
    spec = {
        "model": {"source": "demo:digits-gap"},
        "data": {"source": "npz", "path": str(tmp_path / "d.npz")},
        "analyses": [
            {
                "id": "md",
                "estimator": "mean_dimension",
                "on": {"role": "output"},
                "params": {"pairs": 10, "nll": True, "features": "patches:4"},
            }
        ],
    }
    with pytest.raises(UserError, match=r"indices of the model's 10 outputs, but a label's class index is 1\d"):
        layerscope.run(spec, write=False, progress=False)
