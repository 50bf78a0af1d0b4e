"""Known answers and conformance for activation_entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerscope.plugins.activation_entropy.estimator import (
    ActivationEntropy,
    attention_entropy_bits,
    binary_entropy_bits,
    counts_entropy_bits,
    mean_binary_entropy_bits,
)
from layerscope.testing import check_conformance, exact_on_pattern, feed, make_batches, tensor_infos


def build(batches, **params):
    return ActivationEntropy(ActivationEntropy.Params(**params), tensor_infos(batches))


def value(records, metric="entropy", cls="all", tensor="t"):
    (match,) = [r["value"] for r in records if r["metric"] == metric and r["class"] == cls and r["tensor"] == tensor]
    return match


def test_binary_entropy_function():
    p = torch.tensor([0.0, 0.5, 1.0, 0.25])
    expected = [0.0, 1.0, 0.0, -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))]
    assert binary_entropy_bits(p).tolist() == pytest.approx(expected, abs=1e-12)
    assert mean_binary_entropy_bits(torch.tensor([2.0, 4.0]), 4) == pytest.approx((0.5, 1.0))


def test_constant_pattern_has_zero_entropy():
    on = exact_on_pattern([1, 0, 1, 1, 0], samples=200)
    records = feed(build(batches := make_batches({"t": on}, batch_size=64)), batches).finalize()
    assert value(records) == 0.0


def test_fair_coins_give_one_bit_per_neuron():
    on = exact_on_pattern([0.5] * 16, samples=400)
    records = feed(build(batches := make_batches({"t": on}, batch_size=64)), batches).finalize()
    assert value(records) == pytest.approx(1.0, abs=1e-12)
    assert value(records, "entropy_sum") == pytest.approx(16.0, abs=1e-12)


def test_mixed_frequencies_exact_mean():
    fractions = [0.25, 0.5, 0.0, 0.75]
    on = exact_on_pattern(fractions, samples=400) * 3.0 - 1.0  # on = 2.0, off = -1.0
    records = feed(build(batches := make_batches({"t": on}, batch_size=50)), batches).finalize()
    h = float(binary_entropy_bits(torch.tensor(fractions)).mean())
    assert value(records) == pytest.approx(h, abs=1e-12)


def test_per_class_entropies():
    # class 0 always on, class 1 on half of the time: class 0 → 0 bits, class 1 → 1 bit, all → H_b(3/4)
    on = np.concatenate([np.ones((100, 4)), exact_on_pattern([0.5] * 4, 100)]).astype(np.float32)
    labels = np.repeat([0, 1], 100)
    records = feed(build(batches := make_batches({"t": on}, labels, batch_size=30)), batches).finalize()
    assert value(records, cls=0) == 0.0
    assert value(records, cls=1) == pytest.approx(1.0)
    assert value(records) == pytest.approx(float(binary_entropy_bits(torch.tensor(0.75))))


def test_threshold_parameter():
    values = np.tile(np.array([[0.2, 0.7]], dtype=np.float32), (10, 1))
    values[::2] = 0.4
    records = feed(build(batches := make_batches({"t": values}, batch_size=4), threshold=0.5), batches).finalize()
    assert value(records) == pytest.approx(0.5)  # neuron 1 on half the time → 1 bit, neuron 0 never → 0


def test_histogram_uniform_gives_log2_bins():
    # values spread evenly over [0, 1): every one of 8 bins gets the same count
    values = (np.arange(800, dtype=np.float32) / 800).reshape(-1, 1)
    records = feed(
        build(batches := make_batches({"t": values}, batch_size=64), variant="histogram", bins=8), batches
    ).finalize()
    assert value(records) == pytest.approx(3.0, abs=1e-9)


def test_histogram_with_fixed_range_is_single_pass():
    values = (np.arange(400, dtype=np.float32) / 400).reshape(-1, 1)
    estimator = build(
        batches := make_batches({"t": values}, batch_size=64), variant="histogram", bins=4, range=(0.0, 1.0)
    )
    assert estimator.passes == 1
    assert value(feed(estimator, batches).finalize()) == pytest.approx(2.0, abs=1e-9)


def test_pattern_entropy_counts_whole_vectors():
    # four equally frequent 2-bit patterns → 2 bits; counts_entropy_bits agrees
    patterns = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    values = np.tile(patterns, (25, 1))
    records = feed(build(batches := make_batches({"t": values}, batch_size=16), variant="pattern"), batches).finalize()
    assert value(records) == pytest.approx(2.0)
    assert value(records, "distinct_patterns") == 4
    assert counts_entropy_bits([1, 1, 1, 1, 1, 1, 1, 1]) == pytest.approx(3.0)


def test_channels_reduce_spatial_axes():
    # (N, 2, 3, 3): channel 0 mean positive in every sample, channel 1 in half → mean H = 0.5
    values = np.zeros((40, 2, 3, 3), dtype=np.float32)
    values[:, 0] = 1.0
    values[::2, 1] = 1.0
    records = feed(build(batches := make_batches({"t": values}, batch_size=8), neurons="channels"), batches).finalize()
    assert value(records) == pytest.approx(0.5)


def test_rejects_inverted_range():
    with pytest.raises(ValueError):
        ActivationEntropy.Params(variant="histogram", range=(1.0, 0.0))


@pytest.mark.parametrize("variant", ["binary", "histogram", "pattern"])
def test_conformance(variant):
    rng = np.random.default_rng(0)
    relu = np.maximum(rng.standard_normal((230, 6, 2, 2)), 0).astype(np.float32)
    dense = np.tanh(rng.standard_normal((230, 5))).astype(np.float32)
    labels = rng.integers(0, 4, size=230)
    batches = make_batches({"conv": relu, "fc": dense}, labels, batch_size=40)
    check_conformance(lambda: build(batches, variant=variant, bins=20), batches)


def test_counts_kept_narrow_stay_exact_past_every_dtype_bound():
    """On-counts are kept as uint8 up to 255 samples of a class, int16 up to 32,767, then int32 (ResNet-50's
    9 million neurons × 11 classes in int32 were 400 MB of state): a class of 33,000 samples crosses both
    bounds, streamed and merged in any order, and its entropy equals numpy's on the whole matrix."""
    from layerscope.plugins.activation_entropy.estimator import count_dtype

    rng = np.random.default_rng(3)
    rows = 33_000
    frequencies = np.array([0.0, 0.002, 0.3, 0.5, 0.999, 1.0])
    values = (rng.random((rows, frequencies.size)) < frequencies).astype(np.float32) - 0.5
    labels = np.where(np.arange(rows) < rows - 100, 7, 2)
    batches = make_batches({"t": values}, labels, batch_size=1500)
    check_conformance(lambda: build(batches, variant="binary"), batches)
    estimator = feed(build(batches[:1], variant="binary"), batches[:1])
    assert {c.dtype for c in estimator.on_counts["t"].values()} == {torch.int16}  # 1,500 samples of class 7
    records = feed(build(batches, variant="binary"), batches).finalize()
    assert estimator.on_counts["t"].keys() == {7}  # the pooled counts are the classes' total, not kept apart
    for cls, rows_of in (("all", slice(None)), (7, labels == 7), (2, labels == 2)):
        p = (values[rows_of] > 0).mean(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = np.nan_to_num(-p * np.log2(p) - (1 - p) * np.log2(1 - p))
        assert value(records, cls=cls) == pytest.approx(h.mean(), abs=1e-12)
    assert [count_dtype(n) for n in (0, 255, 256, 32767, 32768, 2**31 - 1, 2**31)] == [
        torch.uint8,
        torch.uint8,
        torch.int16,
        torch.int16,
        torch.int32,
        torch.int32,
        torch.int64,
    ]


@settings(max_examples=200, deadline=None)
@given(threshold=st.floats(-1e6, 1e6, allow_nan=False), seed=st.integers(0, 2**16))
def test_the_float32_threshold_is_the_exact_real_comparison(threshold, seed):
    """Values at and around the threshold's float32 neighbours compare as they would in float64."""
    from layerscope.plugins.activation_entropy.estimator import strictly_above

    near = np.float32(threshold)
    neighbours = [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))]
    random = np.random.default_rng(seed).normal(threshold, abs(threshold) * 1e-6 + 1e-3, 64).astype(np.float32)
    values = torch.from_numpy(np.concatenate([np.array(neighbours, np.float32), random, [np.nan, np.inf, -np.inf]]))
    assert torch.equal(strictly_above(values, threshold), values.double() > threshold)
    assert torch.equal(strictly_above(values.half().float(), threshold), values.half().float().double() > threshold)


def test_entropy_lookup_by_count_equals_the_direct_computation():
    from layerscope.plugins.activation_entropy.estimator import binary_entropy_bits, mean_binary_entropy_bits

    counts = torch.from_numpy(np.random.default_rng(3).integers(0, 38, 100_000))
    direct = binary_entropy_bits(counts.to(torch.float64) / 37)
    for held in (counts, counts.to(torch.uint8), counts.to(torch.int16), counts.to(torch.int32)):
        mean, total = mean_binary_entropy_bits(held, 37)
        assert mean == pytest.approx(float(direct.mean()), rel=1e-13)
        assert total == pytest.approx(float(direct.sum()), rel=1e-13)


@pytest.mark.parametrize(
    ("rows", "neurons", "classes"),
    [(37, 7, 4), (37, 2**14 - 1, 4), (37, 2**14, 4), (37, 40_000, 4), (600, 13, 2), (1000, 64, 1), (300, 9, 30)],
)
def test_on_counts_by_class_are_exact(rows, neurons, classes):
    """On narrow and wide matrices (add_on_counts adds rows one by one from 2^14 neurons), hundreds of
    rows of one class, many classes and a non-contiguous on/off matrix, added into uint8 counts that already
    hold some, against a plain column sum."""
    from layerscope.plugins.activation_entropy.estimator import add_on_counts, class_rows, pooled_counts

    generator = torch.Generator().manual_seed(rows * neurons)
    on = torch.rand(neurons, rows, generator=generator).T > 0.3  # a transposed view
    labels = torch.randint(0, classes, (rows,), generator=generator) * 7 - 3  # codes need not start at 0
    before = torch.randint(0, 3, (neurons,), generator=generator)
    counted = {}
    for key, chosen in class_rows(labels, rows):
        assert chosen == torch.nonzero(labels == key).flatten().tolist()
        counted[key] = before.to(torch.int16 if len(chosen) > 252 else torch.uint8)
        add_on_counts(counted[key], on, chosen)
        assert torch.equal(counted[key].to(torch.int64), before + on[labels == key].sum(0))
    assert set(counted) == set(labels.unique().tolist())
    pooled = pooled_counts(counted)
    assert pooled.dtype == torch.int64 and torch.equal(pooled, len(counted) * before + on.sum(0))
    assert class_rows(None, rows) == [("all", None)]
    everything = torch.zeros(neurons, dtype=torch.int16)
    add_on_counts(everything, on)
    assert torch.equal(everything.to(torch.int64), on.sum(0))


def attention_maps(samples=30, heads=3, tokens=7, seed=0):
    """Causal softmax attention (sample × head × query × key) over sequences of random lengths, padded keys
    masked as an attention mask does (probability 0), with labels and the (sample × token) mask."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, tokens + 1, samples)
    real = np.arange(tokens)[None] < lengths[:, None]
    scores = rng.standard_normal((samples, heads, tokens, tokens)) * 2
    allowed = real[:, None, None, :] & np.tril(np.ones((tokens, tokens), bool))[None, None]
    scores = np.where(allowed, scores, -np.inf)
    with np.errstate(invalid="ignore"):
        probabilities = np.exp(scores - scores.max(-1, keepdims=True))
        probabilities = np.nan_to_num(probabilities / probabilities.sum(-1, keepdims=True))
    return probabilities.astype(np.float32), real, lengths, rng.integers(0, 3, samples)


def test_attention_entropy_per_real_query_and_head_against_numpy():
    """H = −Σ_k p log2 p over the real keys, for the real queries only, per head; rows of a causal map put
    query i's mass on keys 0..i, so the first query of every sequence has 0 bits and none exceeds log2 (i+1)."""
    probabilities, real, lengths, _ = attention_maps()
    rows, sample = attention_entropy_bits(
        torch.from_numpy(probabilities), torch.from_numpy(real), torch.from_numpy(real)
    )
    expected, owners = [], []
    for n, length in enumerate(lengths):
        for query in range(length):
            p = probabilities[n, :, query, :length].astype(np.float64)
            p = p / p.sum(-1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                expected.append(-np.where(p > 0, p * np.log2(p), 0.0).sum(-1))
            owners.append(n)
    np.testing.assert_allclose(rows.numpy(), np.array(expected), rtol=0, atol=1e-6)
    assert sample.tolist() == owners
    first = np.cumsum(np.concatenate([[0], lengths[:-1]]))
    assert np.abs(rows.numpy()[first]).max() < 1e-6


def test_uniform_attention_over_k_keys_and_a_single_key():
    uniform = torch.full((2, 1, 4, 5), 0.2)
    rows, _ = attention_entropy_bits(uniform)
    torch.testing.assert_close(rows, torch.full((8, 1), math.log2(5), dtype=torch.float64))
    one_hot = torch.zeros(1, 2, 3, 3)
    one_hot[..., 1] = 1.0
    rows, _ = attention_entropy_bits(one_hot)
    assert rows.abs().max() == 0.0
    nan = uniform.clone()
    nan[0, 0, 2, 1] = float("nan")
    rows, sample = attention_entropy_bits(nan)
    assert len(rows) == 7 and sample.tolist() == [0, 0, 0, 1, 1, 1, 1]  # the NaN row is left out


def build_attention(batches, **params):
    estimator = build(batches, **params)
    estimator.attention_maps = {"att"}  # what bind_graph finds for an attention softmax of a graph
    return estimator


def test_attention_records_are_per_class_means_over_real_queries_and_conform():
    probabilities, real, lengths, labels = attention_maps(samples=60)
    batches = make_batches({"att": probabilities}, labels, batch_size=16)
    records = feed(build_attention(batches), batches).finalize()
    rows, sample = attention_entropy_bits(torch.from_numpy(probabilities))  # no token mask: every query is real
    for key in ("all", 0, 1, 2):
        chosen = rows if key == "all" else rows[torch.from_numpy(labels)[sample] == key]
        assert value(records, cls=key, tensor="att") == pytest.approx(float(chosen.mean()), abs=1e-12)
        heads = [r for r in records if r["metric"] == "head_entropy" and r["class"] == key]
        assert [h["value"] for h in heads] == pytest.approx(chosen.mean(dim=0).tolist(), abs=1e-12)
        assert {h["keys"] for h in heads} == {probabilities.shape[-1]}
    check_conformance(lambda: build_attention(batches), batches)
