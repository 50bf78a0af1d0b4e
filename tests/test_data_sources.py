"""Built-in data sources: sizes, labels, determinism, and the sample order."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from layerscope.data import iter_batches, sample_order
from layerscope.plugins.data.digits import DigitsSource
from layerscope.plugins.data.npz import NpzSource
from layerscope.plugins.data.synthetic import SyntheticSource


def test_digits_splits():
    sizes = {split: len(DigitsSource(DigitsSource.Params(split=split), Path("."))) for split in ("all", "train", "test")}
    assert sizes == {"all": 1797, "train": 1347, "test": 450}
    x, y = DigitsSource(DigitsSource.Params(layout="image"), Path(".")).read(np.arange(5))
    assert x.shape == (5, 1, 8, 8) and 0.0 <= x.min() and x.max() <= 1.0 and y.tolist() == [0, 1, 2, 3, 4]


def test_synthetic_samples_do_not_depend_on_order_or_batching():
    source = SyntheticSource(SyntheticSource.Params(samples=50, shape=[3, 2], classes=4), Path("."), seed=7)
    x_all, y_all = source.read(np.arange(50))
    x_some, y_some = source.read(np.array([49, 3]))
    np.testing.assert_array_equal(x_some, x_all[[49, 3]])
    np.testing.assert_array_equal(y_some, y_all[[49, 3]])
    assert x_all.shape == (50, 3, 2) and set(y_all.tolist()) <= {0, 1, 2, 3} and len(set(y_all.tolist())) > 1
    assert abs(float(x_all.mean())) < 0.3 and 0.8 < float(x_all.std()) < 1.2
    other_seed = SyntheticSource(source.params, Path("."), seed=8).read(np.arange(2))[0]
    assert not np.allclose(other_seed, x_all[:2])


def test_npz_keys(tmp_path):
    np.savez(tmp_path / "d.npz", inputs=np.ones((6, 4), np.float32), targets=np.arange(6))
    source = NpzSource(NpzSource.Params(path="d.npz", x_key="inputs", y_key="targets"), tmp_path)
    x, y = source.read(np.array([5, 0]))
    assert x.shape == (2, 4) and y.tolist() == [5, 0] and source.has_labels


def test_sample_order_and_batches():
    order = sample_order(10, limit=7, shuffle=True, seed=0)
    assert len(order) == 7 and len(set(order.tolist())) == 7
    assert sample_order(5, None, False, 0).tolist() == [0, 1, 2, 3, 4]
    source = SyntheticSource(SyntheticSource.Params(samples=10, classes=0), Path("."))
    starts = [(start, len(x), y) for start, x, y in iter_batches(source, order, 3)]
    assert starts == [(0, 3, None), (3, 3, None), (6, 1, None)]
