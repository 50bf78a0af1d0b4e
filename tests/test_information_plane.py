"""Known answers, a from-the-formula NumPy cross-check, and conformance."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import layerscope
from layerscope.graph.tensors import TensorInfo
from layerscope.plugins.information_plane.estimator import InformationPlane
from layerscope.plugins.information_plane.maths import (
    alignment_curve,
    gaussian_gram,
    joint_entropy,
    kernel_alignment,
    label_gram,
    mutual_information,
    normalise,
    pairwise_sq_distances,
    renyi_entropy,
)
from layerscope.testing import check_conformance, feed, make_batches, tensor_infos
from layerscope.util.errors import SpecError, UserError

from .conftest import blas_threads

ALPHAS = (1.0, 1.01, 2.0)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_identity_gram_gives_log2_n(alpha):
    assert renyi_entropy(torch.eye(100, dtype=torch.float64) / 100, alpha) == pytest.approx(math.log2(100), abs=1e-9)
    assert math.log2(100) == pytest.approx(6.6439, abs=1e-4)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_identical_samples_give_zero(alpha):
    x = torch.ones(50, 7)
    a = normalise(gaussian_gram(pairwise_sq_distances(x), 1.0))
    assert renyi_entropy(a, alpha) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_balanced_block_labels_give_log2_classes(alpha):
    labels = torch.arange(10).repeat_interleave(10)
    a_y = normalise(label_gram(labels, 0.1))
    assert renyi_entropy(a_y, alpha) == pytest.approx(math.log2(10), abs=1e-9)
    assert math.log2(10) == pytest.approx(3.3219, abs=1e-4)


def random_kernels(seed=0, n=60):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    t = torch.tanh(x @ torch.randn(5, 8, generator=generator, dtype=torch.float64))
    return (
        normalise(gaussian_gram(pairwise_sq_distances(x), 2.0)),
        normalise(gaussian_gram(pairwise_sq_distances(t), 1.5)),
    )


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_joint_entropy_and_mutual_information_bounds(alpha, seed):
    a, b = random_kernels(seed)
    s_a, s_b, s_ab = renyi_entropy(a, alpha), renyi_entropy(b, alpha), joint_entropy(a, b, alpha)
    assert max(s_a, s_b) - 1e-9 <= s_ab <= s_a + s_b + 1e-9
    mi = mutual_information(a, b, alpha)
    assert -1e-9 <= mi <= min(s_a, s_b) + 1e-9


def test_permutation_and_scale_invariance():
    a, b = random_kernels(3)
    order = torch.randperm(a.shape[0], generator=torch.Generator().manual_seed(0))
    permuted_a, permuted_b = a[order][:, order], b[order][:, order]
    assert mutual_information(permuted_a, permuted_b, 1.01) == pytest.approx(mutual_information(a, b, 1.01), abs=1e-9)
    assert renyi_entropy(normalise(7.5 * a), 1.01) == pytest.approx(renyi_entropy(a, 1.01), abs=1e-12)


def test_tensor_kernel_equals_flattened_and_hadamard_of_channel_kernels():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(40, 3, 4, 4, generator=generator, dtype=torch.float64)
    sigma = 6.0
    tensor_kernel = gaussian_gram(pairwise_sq_distances(x), sigma)
    flat = x.reshape(40, -1)
    direct = torch.exp(-(torch.cdist(flat, flat) ** 2) / sigma**2)
    per_channel = torch.ones(40, 40, dtype=torch.float64)
    for channel in range(3):
        per_channel = per_channel * gaussian_gram(pairwise_sq_distances(x[:, channel]), sigma)
    torch.testing.assert_close(tensor_kernel, direct, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(tensor_kernel, per_channel, atol=1e-10, rtol=1e-10)


def test_alignment_curve_matches_direct_alignment():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    labels = torch.arange(3).repeat(10)
    d2, k_y = pairwise_sq_distances(x), label_gram(labels, 0.1)
    sigmas = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    curve = alignment_curve(d2, k_y, sigmas)
    expected = [kernel_alignment(gaussian_gram(d2, float(s)), k_y) for s in sigmas]
    assert curve.tolist() == pytest.approx(expected, abs=1e-12)


# --- from the formula, in NumPy, the way the paper's code does it ---------------------------


def numpy_entropy(gram, alpha):
    a = gram / np.trace(gram)
    eigenvalues = np.clip(np.linalg.eigvalsh(a), 0, None)
    eigenvalues = eigenvalues[eigenvalues > 0]
    if alpha == 1:
        return float(-(eigenvalues * np.log2(eigenvalues)).sum())
    return float(np.log2((eigenvalues**alpha).sum()) / (1 - alpha))


def numpy_rbf(x, sigma):
    flat = x.reshape(len(x), -1).astype(np.float64)
    d2 = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / sigma**2)


def numpy_information_plane(x, t, y, sigma_x, sigma_t, sigma_y, alpha):
    k_x, k_t = numpy_rbf(x, sigma_x), numpy_rbf(t, sigma_t)
    one_hot = np.eye(int(y.max()) + 1)[y]
    k_y = numpy_rbf(one_hot, sigma_y)
    h = {name: numpy_entropy(k, alpha) for name, k in (("x", k_x), ("t", k_t), ("y", k_y))}
    i_xt = h["x"] + h["t"] - numpy_entropy(k_x * k_t, alpha)
    i_ty = h["t"] + h["y"] - numpy_entropy(k_t * k_y, alpha)
    return i_xt, i_ty, h["t"]


def ip_batches(n=300, batch=50, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    hidden = np.maximum(x @ rng.standard_normal((6, 2, 3, 3)).reshape(6, -1), 0).reshape(n, 2, 3, 3).astype(np.float32)
    y = rng.integers(0, 4, n)
    return x, hidden, y, make_batches({"h": hidden}, y, batch_size=batch, inputs=x)


def build(batches, **params):
    return InformationPlane(InformationPlane.Params(**params), tensor_infos(batches))


@pytest.mark.parametrize("alpha", [1.0, 1.01])
def test_matches_numpy_from_the_formula(alpha):
    x, hidden, y, batches = ip_batches()
    records = feed(build(batches, alpha=alpha, sigma=3.0, sigma_x=2.5, batch_size=50), batches).finalize()
    got = {r["metric"]: r["value"] for r in records if r["tensor"] == "h"}
    per_batch = np.array(
        [
            numpy_information_plane(x[s : s + 50], hidden[s : s + 50], y[s : s + 50], 2.5, 3.0, 0.1, alpha)
            for s in range(0, 300, 50)
        ]
    )
    assert got["I_XT"] == pytest.approx(per_batch[:, 0].mean(), abs=1e-8)
    assert got["I_TY"] == pytest.approx(per_batch[:, 1].mean(), abs=1e-8)
    assert got["H_T"] == pytest.approx(per_batch[:, 2].mean(), abs=1e-8)
    assert got["I_XT_std"] == pytest.approx(per_batch[:, 0].std(), abs=1e-8)
    assert got["sigma"] == 3.0


def test_alignment_width_is_the_argmax_and_smoothed_across_checkpoints():
    x, hidden, y, batches = ip_batches()
    first = feed(build(batches, batch_size=50, sigma_grid=50), batches)
    # σ* from the summed alignment curves, recomputed directly
    grid = torch.linspace(0.03, 10.0, 50, dtype=torch.float64)
    curves, distances = 0, []
    for s in range(0, 300, 50):
        d2 = pairwise_sq_distances(torch.from_numpy(hidden[s : s + 50]))
        mean_distance = float(d2.sqrt().sum() / (50 * 49))
        distances.append(mean_distance)
        curves = curves + alignment_curve(d2, label_gram(torch.from_numpy(y[s : s + 50]), 0.1), grid * mean_distance)
    expected = float(grid[int(torch.argmax(curves))]) * float(np.mean(distances))
    assert first.sigma_optimal["h"] == pytest.approx(expected, rel=1e-12)
    assert first.sigma_used["h"] == first.sigma_optimal["h"]
    # sigma_x defaults to the mean pairwise input distance
    input_distances = [
        float(pairwise_sq_distances(torch.from_numpy(x[s : s + 50])).sqrt().sum() / (50 * 49))
        for s in range(0, 300, 50)
    ]
    assert first.sigma_x_used["input"] == pytest.approx(np.mean(input_distances), rel=1e-12)
    # the next checkpoint uses its own σ* by default, and with smoothing: σ = 0.9 σ_prev + 0.1 σ*
    shifted = make_batches({"h": hidden * 2.0}, y, batch_size=50, inputs=x)
    for smoothing in (0.0, 0.9):
        second = build(shifted, batch_size=50, sigma_grid=50, **({"smoothing": smoothing} if smoothing else {}))
        second.carry_over(first)
        feed(second, shifted)
        assert second.sigma_optimal["h"] == pytest.approx(2.0 * first.sigma_optimal["h"], rel=1e-9)
        expected = smoothing * first.sigma_used["h"] + (1 - smoothing) * second.sigma_optimal["h"]
        assert second.sigma_used["h"] == pytest.approx(expected, rel=1e-12)


def summed_alignment_argmax(hidden, y, widths_of):
    """(index of the argmax, batches' mean d̄) of the alignment curves summed over batches of 50, each batch's
    widths given by *widths_of*(its d̄), recomputed directly."""
    curves, distances = 0, []
    for s in range(0, len(hidden), 50):
        d2 = pairwise_sq_distances(torch.from_numpy(hidden[s : s + 50]))
        distances.append(float(d2.sqrt().sum() / (50 * 49)))
        widths = torch.from_numpy(widths_of(distances[-1]))
        curves = curves + alignment_curve(d2, label_gram(torch.from_numpy(y[s : s + 50]), 0.1), widths)
    return int(torch.argmax(curves)), float(np.mean(distances))


def edge_warnings(estimator):
    return [w for w in estimator.collect_warnings() if "at an end of their" in w]


@pytest.mark.parametrize("scale", [1.0, 0.01])
def test_the_authors_absolute_grid_and_a_width_on_its_floor_is_warned(scale):
    """width_grid: absolute searches linspace(0.3, 10·d̄) per batch, as the authors' code: for a layer whose
    best width is below 0.3 (here 0.2, d̄ = 0.08) the chosen width sits on that floor, and a warning names it."""
    x, hidden, y, _ = ip_batches()
    hidden = (hidden * scale).astype(np.float32)
    batches = make_batches({"h": hidden}, y, batch_size=50, inputs=x)
    estimator = feed(build(batches, batch_size=50, sigma_grid=50, width_grid="absolute"), batches)
    index, mean_distance = summed_alignment_argmax(hidden, y, lambda d: np.linspace(0.3, 10 * d, 50))
    assert estimator.sigma_optimal["h"] == pytest.approx(np.linspace(0.3, 10 * mean_distance, 50)[index], rel=1e-12)
    if scale == 1.0:
        assert 0 < index < 49 and not edge_warnings(estimator)
    else:
        assert index == 0 and estimator.sigma_optimal["h"] == pytest.approx(0.3)
        (warning,) = edge_warnings(estimator)
        assert "absolute alignment grid" in warning and "h σ* = 0.3 (the first of 0.3…" in warning
        relative = feed(build(batches, batch_size=50, sigma_grid=50), batches)  # today's grid follows the scale
        assert not edge_warnings(relative)
        scaled = scale * estimator_default_sigma()
        assert relative.sigma_optimal["h"] == pytest.approx(scaled, rel=1e-6)  # float32 inputs


def estimator_default_sigma():
    x, hidden, y, batches = ip_batches()
    return feed(build(batches, batch_size=50, sigma_grid=50), batches).sigma_optimal["h"]


def test_a_width_at_the_end_of_a_narrow_relative_grid_is_warned():
    _, _, _, batches = ip_batches()
    estimator = feed(build(batches, batch_size=50, sigma_grid=20, grid_range=(20.0, 30.0)), batches)
    (warning,) = edge_warnings(estimator)
    assert "relative alignment grid" in warning and "(the first of" in warning


def test_smoothing_far_from_the_checkpoints_optimum_is_warned():
    """σ = 0.9·σ_prev + 0.1·σ* with σ* doubled is 0.55 σ*: more than a factor 1.25 away, warned; without
    smoothing, or with a width that stays, nothing is."""
    _, hidden, y, batches = ip_batches()
    first = feed(build(batches, batch_size=50, sigma_grid=50), batches)
    for factor, smoothing, warned in ((2.0, 0.9, True), (2.0, 0.0, False), (1.0, 0.9, False)):
        shifted = make_batches({"h": hidden * factor}, y, batch_size=50, inputs=ip_batches()[0])
        second = build(shifted, batch_size=50, sigma_grid=50, smoothing=smoothing)
        second.carry_over(first)
        feed(second, shifted)
        far = [w for w in second.collect_warnings() if "more than a factor 1.25" in w]
        assert bool(far) == warned
        if warned:
            used, best = second.sigma_used["h"], second.sigma_optimal["h"]
            assert used / best == pytest.approx(0.55, rel=1e-9)
            assert f"h σ = {used:.4g} against σ* = {best:.4g}" in far[0] and "smoothing 0.9" in far[0]


def test_grid_range_with_the_absolute_grid_is_refused():
    with pytest.raises(ValueError, match="grid_range sets the relative grid"):
        InformationPlane.Params(width_grid="absolute", grid_range=(0.1, 5.0))


def test_a_fixed_sigma_with_the_absolute_grid_is_refused():
    """The grid is what alignment searches: with a fixed sigma width_grid: absolute did nothing, silently."""
    with pytest.raises(ValueError, match="a fixed sigma searches none"):
        InformationPlane.Params(width_grid="absolute", sigma=0.5)
    assert InformationPlane.Params(sigma=0.5).width_grid == "relative"


def test_the_absolute_grid_runs_downward_below_a_tenth_of_its_floor_and_each_layer_is_warned_once():
    """d̄ = 0.008: the authors' linspace(0.3, 10·d̄) runs from 0.3 down to 0.08, σ* is its last (smallest) width,
    and the warning says the grid runs downward. At later checkpoints of the run (carry_over) a layer already
    named is not named again (Monitor logged it at every step); a new run names it again."""
    x, hidden, y, _ = ip_batches()
    hidden = (hidden * 0.001).astype(np.float32)
    batches = make_batches({"h": hidden}, y, batch_size=50, inputs=x)
    first = feed(build(batches, batch_size=50, sigma_grid=50, width_grid="absolute"), batches)
    index, mean_distance = summed_alignment_argmax(hidden, y, lambda d: np.linspace(0.3, 10 * d, 50))
    grid = np.linspace(0.3, 10 * mean_distance, 50)
    assert grid[-1] < 0.3 / 3 and index == 49
    assert first.sigma_optimal["h"] == pytest.approx(grid[-1], rel=1e-12)
    (warning,) = edge_warnings(first)
    assert f"h σ* = {grid[-1]:.4g} (the last of 0.3…{grid[-1]:.4g}, a grid that runs downward as 10·d̄ < 0.3)" in warning
    second = build(batches, batch_size=50, sigma_grid=50, width_grid="absolute")
    second.carry_over(first)
    feed(second, batches)
    assert second.sigma_optimal["h"] == first.sigma_optimal["h"] and not edge_warnings(second)
    assert edge_warnings(feed(build(batches, batch_size=50, sigma_grid=50, width_grid="absolute"), batches))


def test_softmax_is_applied_to_the_model_output():
    logits = torch.randn(10, 4, dtype=torch.float64)
    output = TensorInfo("logits", "Gemm", "out", "float32", ("N", 4), True, role="output")
    estimator = InformationPlane(InformationPlane.Params(sigma=1.0, sigma_x=1.0), [output])
    torch.testing.assert_close(
        estimator._tensor_distances("logits", logits), pairwise_sq_distances(torch.softmax(logits, dim=1))
    )
    plain = InformationPlane(InformationPlane.Params(sigma=1.0, sigma_x=1.0, softmax_output=False), [output])
    torch.testing.assert_close(plain._tensor_distances("logits", logits), pairwise_sq_distances(logits))


def test_incomplete_batches_are_not_used_and_warned():
    _, _, _, batches = ip_batches(n=130, batch=65)
    estimator = feed(build(batches, sigma=2.0, sigma_x=2.0, batch_size=50), batches)
    (n_batches,) = {r["batches"] for r in estimator.finalize() if r["metric"] == "I_XT"}
    assert n_batches == 2
    assert any("30 samples outside full batches of 50" in w for w in estimator.collect_warnings())


@pytest.mark.parametrize("sigma", [3.0, "alignment"])
def test_conformance(sigma):
    _, _, _, batches = ip_batches(n=200, batch=50)
    check_conformance(lambda: build(batches, sigma=sigma, batch_size=50, sigma_grid=40), batches, rtol=1e-9, atol=1e-9)


def test_spec_run_over_checkpoints(tmp_path):
    spec = {
        "model": {"source": "demo:digits-mlp", "checkpoints": ["epoch_01", "epoch_05", "epoch_10"]},
        "data": {"source": "digits", "split": "train", "limit": 400},
        "analyses": [{"id": "ip", "estimator": "information_plane", "params": {"sigma_grid": 60}}],
        "outputs": {"dir": str(tmp_path / "ip"), "formats": ["json", "plots"]},
    }
    results = layerscope.run(spec, progress=False)
    assert [m["label"] for m in results.models] == ["epoch_01", "epoch_05", "epoch_10"]
    layers = {r["layer"] for r in results.select(metric="I_XT")}
    assert layers == {"relu1", "relu2", "relu3", "out"}
    for record in results.select(metric="I_TY"):
        assert 0 <= record["value"] <= math.log2(10) + 1e-9
    for record in results.select(metric="I_XT"):
        assert 0 <= record["value"] <= math.log2(100) + 1e-9
    sigmas = {r["model"]: r["value"] for r in results.select(metric="sigma", layer="relu1")}
    optimal = {r["model"]: r["value"] for r in results.select(metric="sigma_optimal", layer="relu1")}
    assert sigmas == optimal  # no smoothing across checkpoints by default
    assert (tmp_path / "ip" / "plots" / "ip.png").stat().st_size > 10_000
    assert "plots/ip.svg" in results.artifacts


def test_needs_labels(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 64), np.float32))
    spec = {
        "model": {"source": "demo:digits-mlp"},
        "data": {"source": "npz", "path": str(tmp_path / "d.npz")},
        "analyses": [{"id": "ip", "estimator": "information_plane"}],
    }
    with pytest.raises(layerscope.UserError, match="needs labels"):
        layerscope.run(spec, write=False, progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_inner_products_over_blocks_equal_one_float64_product(dtype, monkeypatch):
    """X Xᵀ summed over feature blocks (numpy's syrk on the CPU, several blocks forced) equals one
    float64 product of the widened samples, and is exactly symmetric."""
    from layerscope.plugins.information_plane import maths as matrix_entropy

    monkeypatch.setattr(matrix_entropy, "DISTANCE_BLOCK", 7 * 64)  # 64 rows: blocks of 7 features
    rows = torch.randn(64, 300, generator=torch.Generator().manual_seed(5)).to(dtype)
    inner = matrix_entropy.inner_products(rows)
    wide = rows.to(torch.float64)
    assert inner.dtype == torch.float64 and torch.equal(inner, inner.T)
    torch.testing.assert_close(inner, wide @ wide.T, rtol=1e-13, atol=1e-12)


def test_one_blas_thread_limits_blas_for_the_block_only():
    from layerscope.engine.threads import _blas_libraries, one_blas_thread

    _blas_libraries.cache_clear()  # the libraries are found on first use: every one loaded by now

    before = blas_threads()
    with one_blas_thread():
        assert set(blas_threads().values()) == {1}
    assert blas_threads() == before


def test_a_batch_larger_than_the_data_batches_is_refused_never_zero_records(tmp_path):
    """The tester's case: data batches of 40 under the default batch_size 100 wrote 0 records and exited 0,
    with a warning that called every tensor constant. Now the spec is refused at the parameter, and data
    that holds fewer samples than one batch is a user error naming batch_size."""
    base = {"model": {"source": "demo:digits-mlp"}, "analyses": [{"id": "ip", "estimator": "information_plane"}]}
    for data, name in (({"batch_size": 40}, "data.batch_size (40)"), ({"limit": 60}, "data.limit (60)")):
        with pytest.raises(
            SpecError, match=rf"analyses.0.params.batch_size: batch_size 100 is larger than {re.escape(name)}"
        ):
            layerscope.validate({**base, "data": {"source": "digits", **data}})
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "few.npz", x=rng.random((40, 64), dtype=np.float32), y=rng.integers(0, 3, 40))
    spec = {**base, "data": {"source": "npz", "path": str(tmp_path / "few.npz")}}
    with pytest.raises(UserError, match="no batch of 100 samples came with the data .* 40 samples at most"):
        layerscope.run(spec, write=False, progress=False)
    spec["analyses"][0]["params"] = {"batch_size": 40, "sigma_grid": 10}
    assert layerscope.run(spec, write=False, progress=False).select(metric="I_XT")


def test_constant_inputs_are_refused_and_one_class_batches_warned(tmp_path):
    """The reviewer's cases: constant inputs failed in eigh ("error code 98", recorded as a plugin failure);
    batches of one class gave arbitrary widths without a word."""
    base = {"model": {"source": "demo:digits-mlp"}, "analyses": [{"id": "ip", "estimator": "information_plane"}]}
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "zeros.npz", x=np.zeros((100, 64), np.float32), y=rng.integers(0, 3, 100))
    with pytest.raises(UserError, match="every input sample of every batch is the same"):
        layerscope.run(
            {**base, "data": {"source": "npz", "path": str(tmp_path / "zeros.npz")}}, write=False, progress=False
        )
    np.savez(tmp_path / "one.npz", x=rng.random((100, 64), dtype=np.float32), y=np.zeros(100, np.int64))
    spec = {**base, "data": {"source": "npz", "path": str(tmp_path / "one.npz")}}
    spec["analyses"][0]["params"] = {"sigma_grid": 20}
    results = layerscope.run(spec, write=False, progress=False)
    assert any("every batch holds samples of one class" in w for w in results.warnings), results.warnings
    assert all(abs(r["value"]) < 1e-9 for r in results.select(metric="I_TY"))
