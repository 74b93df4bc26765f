"""Tests for the DDSketch-style latency sketch against exact numpy quantiles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.common.sketch import MIN_TRACKABLE_MS, LatencySketch
from edgefleet.v1 import common_pb2

QUANTILES = (0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)
# Bucket indexes come from a floating-point log, so a value a few ulps above a bucket boundary can
# land in the bucket below it. This slack covers that rounding and nothing more.
ROUNDING_SLACK = 1e-9


def _distributions() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    fast = rng.normal(4.0, 0.5, 15_000)
    slow = rng.normal(80.0, 10.0, 5_000)
    return {
        "lognormal": rng.lognormal(mean=1.5, sigma=0.8, size=20_000),
        "bimodal": np.abs(np.concatenate([fast, slow])) + 0.01,
        "exponential": rng.exponential(12.0, 20_000) + 1e-3,
        "loguniform": np.exp(rng.uniform(math.log(1e-4), math.log(1e5), 20_000)),
        "constant": np.full(1_000, 3.25),
    }


def _sketch_of(values: np.ndarray | list[float], accuracy: float = 0.01, **kwargs: int) -> LatencySketch:
    sketch = LatencySketch(accuracy, **kwargs)
    for value in values:
        sketch.add(float(value))
    return sketch


def _relative_error(estimate: float, exact: float) -> float:
    return abs(estimate - exact) / exact if exact else abs(estimate)


@pytest.mark.parametrize("name", sorted(_distributions()))
@pytest.mark.parametrize("accuracy", [0.001, 0.01, 0.05])
def test_quantile_within_accuracy(name: str, accuracy: float) -> None:
    values = _distributions()[name]
    # At 0.1% accuracy the default 2048 buckets span only a factor of about 60, too little for
    # these distributions, so the bound is raised to keep every bucket.
    sketch = _sketch_of(values, accuracy, max_buckets=20_000)
    for q in QUANTILES:
        exact = float(np.quantile(values, q, method="lower"))
        error = _relative_error(sketch.quantile(q), exact)
        assert error <= accuracy * (1 + ROUNDING_SLACK), f"q={q}: {sketch.quantile(q)} vs {exact}"


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(min_value=1e-4, max_value=1e7), min_size=1, max_size=300),
    q=st.floats(min_value=0.0, max_value=1.0),
)
def test_quantile_within_accuracy_property(values: list[float], q: float) -> None:
    sketch = _sketch_of(values)
    exact = float(np.quantile(np.array(values), q, method="lower"))
    assert _relative_error(sketch.quantile(q), exact) <= 0.01 * (1 + ROUNDING_SLACK)


def test_extremes_are_exact() -> None:
    values = _distributions()["lognormal"]
    sketch = _sketch_of(values)
    assert sketch.quantile(0.0) == values.min()
    assert sketch.quantile(1.0) == values.max()
    assert sketch.min == values.min()
    assert sketch.max == values.max()


def test_summary_statistics() -> None:
    values = [1.0, 2.5, 4.0, 8.5]
    sketch = _sketch_of(values)
    assert sketch.count == 4
    assert sketch.sum == 16.0
    assert sketch.mean == 4.0
    assert sketch.relative_accuracy == 0.01


def test_empty_sketch_is_nan() -> None:
    sketch = LatencySketch()
    assert sketch.count == 0
    assert math.isnan(sketch.quantile(0.5))
    assert math.isnan(sketch.min)
    assert math.isnan(sketch.max)
    assert math.isnan(sketch.mean)


def test_zero_bucket() -> None:
    sketch = _sketch_of([0.0, MIN_TRACKABLE_MS / 2, MIN_TRACKABLE_MS, 5.0, 6.0])
    assert sketch.zero_count == 3
    assert sketch.quantile(0.5) == 0.0
    assert sketch.bucket_counts() != {}
    assert sum(sketch.bucket_counts().values()) == 2


def test_merge_equals_single_sketch() -> None:
    values = _distributions()["bimodal"]
    whole = _sketch_of(values)
    merged = LatencySketch()
    for part in np.array_split(values, 3):
        merged.merge(_sketch_of(part))
    assert merged.bucket_counts() == whole.bucket_counts()
    assert merged.zero_count == whole.zero_count
    assert merged.count == whole.count
    assert merged.min == whole.min
    assert merged.max == whole.max
    # Float addition is not associative, so only the sum may differ, by rounding.
    assert math.isclose(merged.sum, whole.sum, rel_tol=1e-12)
    assert [merged.quantile(q) for q in QUANTILES] == [whole.quantile(q) for q in QUANTILES]


def test_merge_empty_and_into_empty() -> None:
    filled = _sketch_of([1.0, 2.0, 3.0])
    empty = LatencySketch()
    empty.merge(filled)
    filled.merge(LatencySketch())
    assert empty.bucket_counts() == filled.bucket_counts()
    assert empty.count == 3
    assert filled.count == 3


def test_merge_with_itself_doubles() -> None:
    sketch = _sketch_of([1.0, 2.0, 0.0])
    before = sketch.bucket_counts()
    sketch.merge(sketch)
    assert sketch.bucket_counts() == {index: 2 * count for index, count in before.items()}
    assert sketch.zero_count == 2
    assert sketch.count == 6


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(
        st.lists(st.floats(min_value=0.0, max_value=1e9), max_size=40),
        min_size=1,
        max_size=5,
    ),
    max_buckets=st.integers(min_value=1, max_value=40),
)
def test_merge_order_independent_when_folding(parts: list[list[float]], max_buckets: int) -> None:
    whole = _sketch_of([value for part in parts for value in part], max_buckets=max_buckets)
    merged = LatencySketch(max_buckets=max_buckets)
    for part in reversed(parts):
        merged.merge(_sketch_of(part, max_buckets=max_buckets))
    assert merged.bucket_counts() == whole.bucket_counts()
    assert merged.zero_count == whole.zero_count
    assert merged.count == whole.count


def test_merge_rejects_other_accuracy() -> None:
    with pytest.raises(ValueError, match=r"0\.05.*0\.01"):
        LatencySketch(0.01).merge(LatencySketch(0.05))


def test_bucket_bound_folds_lowest() -> None:
    values = [10.0**exponent for exponent in range(-5, 7)] * 10
    sketch = _sketch_of(values, max_buckets=50)
    assert len(sketch.bucket_counts()) <= 50
    assert sum(sketch.bucket_counts().values()) == len(values)
    assert sketch.count == len(values)
    # Folding only moves low samples up, so the high quantiles keep their accuracy.
    assert _relative_error(sketch.quantile(0.99), 1e6) <= 0.01
    assert _relative_error(sketch.quantile(0.95), 1e6) <= 0.01


def test_proto_round_trip() -> None:
    sketch = _sketch_of([*_distributions()["lognormal"][:1000].tolist(), 0.0])
    message = sketch.to_proto()
    restored = LatencySketch.from_proto(message)
    assert restored.to_proto() == message
    assert restored.bucket_counts() == sketch.bucket_counts()
    assert restored.sum == sketch.sum
    assert restored.min == sketch.min
    assert restored.max == sketch.max
    assert [restored.quantile(q) for q in QUANTILES] == [sketch.quantile(q) for q in QUANTILES]


def test_proto_fields() -> None:
    message = _sketch_of([0.0, 1.0, 1.0, 2.0]).to_proto()
    assert isinstance(message, common_pb2.LatencySketch)
    assert message.relative_accuracy == 0.01
    assert message.zero_count == 1
    assert message.count == 4
    assert message.sum_ms == 4.0
    assert message.min_ms == 0.0
    assert message.max_ms == 2.0
    assert sum(message.counts) == 3
    assert message.counts[0] != 0
    assert message.counts[-1] != 0


def test_bytes_round_trip() -> None:
    sketch = _sketch_of([0.5, 1.5, 250.0])
    data = sketch.to_bytes()
    restored = LatencySketch.from_bytes(data)
    assert restored.to_bytes() == data
    assert restored.quantile(0.5) == sketch.quantile(0.5)


def test_empty_round_trip() -> None:
    restored = LatencySketch.from_bytes(LatencySketch(0.02).to_bytes())
    assert restored.count == 0
    assert restored.relative_accuracy == 0.02
    assert math.isnan(restored.quantile(0.5))


def test_from_proto_folds_to_bound() -> None:
    message = _sketch_of([10.0**exponent for exponent in range(-3, 5)]).to_proto()
    restored = LatencySketch.from_proto(message, max_buckets=20)
    assert len(restored.bucket_counts()) <= 20
    assert sum(restored.bucket_counts().values()) == 8
    assert (
        restored.bucket_counts()
        == _sketch_of([10.0**exponent for exponent in range(-3, 5)], max_buckets=20).bucket_counts()
    )


@pytest.mark.parametrize("value", [-1.0, -1e-9, math.nan, math.inf, -math.inf])
def test_add_rejects_bad_value(value: float) -> None:
    sketch = LatencySketch()
    with pytest.raises(ValueError, match="latency must be"):
        sketch.add(value)
    assert sketch.count == 0


@pytest.mark.parametrize("q", [-0.1, 1.01, math.nan])
def test_quantile_rejects_bad_q(q: float) -> None:
    with pytest.raises(ValueError, match=r"quantile must be in \[0, 1\]"):
        _sketch_of([1.0]).quantile(q)


@pytest.mark.parametrize("accuracy", [0.0, 1.0, -0.1, math.nan])
def test_constructor_rejects_accuracy(accuracy: float) -> None:
    with pytest.raises(ValueError, match="relative_accuracy must be in"):
        LatencySketch(accuracy)


def test_from_bytes_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="invalid serialized LatencySketch"):
        LatencySketch.from_bytes(b"\xff\xff\xff\xff")


def test_from_proto_rejects_bad_count() -> None:
    message = _sketch_of([1.0, 2.0]).to_proto()
    message.count = 5
    with pytest.raises(ValueError, match="count 5"):
        LatencySketch.from_proto(message)


def test_from_proto_rejects_bad_extremes() -> None:
    message = _sketch_of([1.0, 2.0]).to_proto()
    message.min_ms = 3.0
    with pytest.raises(ValueError, match=r"min_ms 3\.0"):
        LatencySketch.from_proto(message)


def test_from_proto_rejects_missing_accuracy() -> None:
    with pytest.raises(ValueError, match="relative_accuracy must be in"):
        LatencySketch.from_proto(common_pb2.LatencySketch())
