"""Built-in data sources: sizes, labels, determinism, and the sample order."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerscope.data.source import iter_batches, sample_order
from layerscope.plugins.data.digits import DigitsSource
from layerscope.plugins.data.npz import NpzSource
from layerscope.plugins.data.synthetic import SyntheticSource
from layerscope.util.errors import UserError


def test_digits_splits():
    sizes = {
        split: len(DigitsSource(DigitsSource.Params(split=split), Path("."))) for split in ("all", "train", "test")
    }
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


def test_synthetic_uniform_samples_lie_in_their_bounds_with_the_uniform_moments():
    params = SyntheticSource.Params(samples=4000, shape=[5], classes=0, distribution="uniform", low=-2.0, high=6.0)
    x = SyntheticSource(params, Path("."), seed=3).read(np.arange(4000))[0]
    assert x.dtype == np.float32 and x.shape == (4000, 5) and -2.0 <= x.min() and x.max() < 6.0
    assert abs(float(x.mean()) - 2.0) < 0.1 and abs(float(x.var()) - 8.0**2 / 12) < 0.2  # (b - a)² / 12
    np.testing.assert_array_equal(SyntheticSource(params, Path("."), seed=3).read(np.array([7]))[0], x[[7]])


@pytest.mark.parametrize(
    "params, message",
    [
        ({"distribution": "uniform", "std": 2.0}, "std does not apply to distribution: uniform"),
        ({"low": 1.0}, "low does not apply to distribution: normal"),
        ({"distribution": "uniform", "low": 1.0, "high": 1.0}, r"low \(1.0\) must be below high"),
    ],
)
def test_synthetic_distribution_parameters_are_checked(params, message):
    with pytest.raises(ValueError, match=message):
        SyntheticSource.Params(**params)


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


# --- npz arrays are read lazily and checked from their headers ------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:"))


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_reads_rows_lazily_equal_to_numpy(tmp_path, compressed):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3000, 2, 5, 7)).astype(np.float32), rng.integers(0, 9, 3000)
    (np.savez_compressed if compressed else np.savez)(tmp_path / "d.npz", x=x, y=y)
    source = NpzSource(NpzSource.Params(path="d.npz"), tmp_path)
    assert len(source) == 3000 and source.x[None].shape == (3000, 2, 5, 7)
    for indices in (np.array([0, 1]), np.array([2999, 5, 17]), np.arange(3000)[::-7]):
        got_x, got_y = source.read(indices)
        np.testing.assert_array_equal(got_x, x[indices])
        np.testing.assert_array_equal(got_y, y[indices])


def test_a_compressed_npz_bomb_is_never_held_in_memory(tmp_path):
    """256 MiB of zeros compress to a few hundred KiB; opening, reading the first and a late batch stay flat."""
    rows = 2**16
    np.savez_compressed(tmp_path / "bomb.npz", x=np.zeros((rows, 1024), np.float32), y=np.zeros(rows, np.int64))
    assert (tmp_path / "bomb.npz").stat().st_size < 2**20
    before = _rss()
    source = NpzSource(NpzSource.Params(path="bomb.npz"), tmp_path)
    assert source.read(np.array([0, 1]))[0].shape == (2, 1024)
    assert _rss() - before < 64 * 2**20  # the prefix only
    assert source.read(np.arange(rows - 100, rows))[0].shape == (100, 1024)
    assert _rss() - before < 64 * 2**20  # decompressed to a memory-mapped temporary file, not into memory


def test_npz_object_arrays_are_refused_without_unpickling(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 64), np.float32), y=np.array(["a", 1, None, 2.5], dtype=object))
    with pytest.raises(UserError, match=r"array 'y' .* holds Python objects \(dtype object\)"):
        NpzSource(NpzSource.Params(path="d.npz"), tmp_path)


def test_synthetic_sizes_are_checked_before_allocation():
    with pytest.raises(UserError, match=r"data.shape: one sample of shape \[100000, 100000\] needs 37.3 GiB"):
        SyntheticSource(SyntheticSource.Params(samples=2, shape=[100_000, 100_000]), Path("."))


def test_digits_are_read_from_the_cache_without_scikit_learn(tmp_path):
    """The first load caches every split as plain arrays; later processes read them without importing
    scikit-learn, and a damaged cache file is rebuilt with the same values."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LAYERSCOPE_CACHE": str(tmp_path)}
    probe = (
        "import sys; from layerscope.plugins.data.digits import load_digits_split; "
        "x, y = load_digits_split('train'); print(x.shape, int(y.sum()), round(float(x.sum()), 3), "
        "'sklearn' in sys.modules)"
    )

    def load() -> str:
        return subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
        ).stdout.split()

    first = load()
    assert first[-1] == "True"  # built from scikit-learn
    (cached,) = (tmp_path / "data").glob("digits-sklearn-*.npz")
    assert load() == first[:-1] + ["False"]
    cached.write_bytes(b"not an npz")
    assert load() == first
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, _, y_train, _ = train_test_split(
        (digits.data / 16).astype(np.float32), digits.target, test_size=0.25, stratify=digits.target, random_state=0
    )
    assert first[:2] == [f"({len(x_train)},", "64)"]
    assert int(first[2]) == int(y_train.sum()) and float(first[3]) == round(float(x_train.sum()), 3)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),
    width=st.sampled_from([(1,), (3,), (2, 5)]),
    dtype=st.sampled_from(["float32", "int64", "bool", "float16"]),
    data=st.data(),
)
def test_rows_of_a_stored_npz_member_are_read_exactly(tmp_path_factory, rows, width, dtype, data):
    """Shuffled, repeated, consecutive and negative indices read in place equal numpy's own reading."""
    import zipfile

    from layerscope.plugins.data.npz_arrays import NpyMember

    array = (np.arange(rows * math.prod(width)).reshape(rows, *width) % 7).astype(dtype)
    path = tmp_path_factory.mktemp("npz") / "a.npz"
    np.savez(path, x=array)
    indices = np.array(data.draw(st.lists(st.integers(-rows, rows - 1), max_size=3 * rows)), dtype=np.int64)
    with zipfile.ZipFile(path) as archive:
        member = NpyMember(path, archive, "x")
    got = member[indices]
    assert got.dtype == array.dtype and np.array_equal(got, array[indices])


def test_a_truncated_stored_npz_is_a_user_error(tmp_path):
    import zipfile

    from layerscope.plugins.data.npz_arrays import NpyMember

    path = tmp_path / "a.npz"
    np.savez(path, x=np.ones((100, 64), np.float32))
    with zipfile.ZipFile(path) as archive:
        member = NpyMember(path, archive, "x")
    with open(path, "r+b") as handle:
        handle.truncate(member._data_offset() + 10 * 64 * 4)
    assert np.array_equal(member[[0, 9]], np.ones((2, 64), np.float32))
    with pytest.raises(UserError, match="data.path: .*a.npz ends before the data its header announces"):
        member[[5, 50]]
