"""Mergeable DDSketch-style quantile sketch for latencies in milliseconds."""

from __future__ import annotations

import logging
import math
import operator

from google.protobuf.message import DecodeError

from edgefleet.v1 import common_pb2

logger = logging.getLogger(__name__)

# Module-level aliases save an attribute lookup per call on the add() hot path.
_ceil = math.ceil
_log = math.log
_INF = math.inf

DEFAULT_RELATIVE_ACCURACY = 0.01
# Samples at or below this many milliseconds go to the zero bucket and read back as 0.0.
MIN_TRACKABLE_MS = 1e-6
# n buckets span a factor of gamma^n between the smallest and the largest tracked value. At the
# default 1% accuracy 2048 buckets span about 6e17, which no real latency range reaches, but at
# 0.1% they span only about 60, so finer accuracies need a larger max_buckets.
DEFAULT_MAX_BUCKETS = 2048


class LatencySketch:
    """Quantile sketch with bounded relative error over positive latencies in milliseconds.

    Bucket i counts the samples in (gamma^(i-1), gamma^i] with gamma = (1 + a) / (1 - a) for the
    relative accuracy a. A quantile reads back as 2 * gamma^i / (gamma + 1), which is within a
    relative error of a of every value in bucket i. So quantile(q) is within a relative error of a
    of the exact sample of rank floor(q * (count - 1)), which numpy returns for method="lower".
    Samples at or below MIN_TRACKABLE_MS count in a zero bucket that reads back as 0.0.

    At most ``max_buckets`` buckets are kept: when a new sample would widen the range past that,
    the lowest buckets are folded into the lowest kept one, so only the low quantiles lose
    accuracy. Because the kept range only moves up, the folded state does not depend on the order
    of samples or merges. Quantile, min, max and mean of an empty sketch are NaN.
    """

    __slots__ = (
        "_count",
        "_counts",
        "_gamma",
        "_inverse_log_gamma",
        "_max",
        "_max_buckets",
        "_min",
        "_offset",
        "_relative_accuracy",
        "_sum",
        "_zero_count",
    )

    def __init__(
        self, relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY, *, max_buckets: int = DEFAULT_MAX_BUCKETS
    ) -> None:
        """Create an empty sketch; raise ValueError unless 0 < relative_accuracy < 1 and max_buckets >= 1."""
        if not 0.0 < relative_accuracy < 1.0:
            raise ValueError(
                f"relative_accuracy must be in (0, 1), got {relative_accuracy!r}; use 0.01 for 1% error"
            )
        if max_buckets < 1:
            raise ValueError(f"max_buckets must be at least 1, got {max_buckets!r}")
        self._relative_accuracy = float(relative_accuracy)
        self._gamma = (1.0 + relative_accuracy) / (1.0 - relative_accuracy)
        self._inverse_log_gamma = 1.0 / math.log(self._gamma)
        self._max_buckets = max_buckets
        self._counts: list[int] = []  # _counts[k] is the count of bucket _offset + k.
        self._offset = 0
        self._zero_count = 0
        self._count = 0
        self._sum = 0.0
        self._min = math.inf
        self._max = -math.inf

    @property
    def relative_accuracy(self) -> float:
        """Maximum relative error of a quantile."""
        return self._relative_accuracy

    @property
    def max_buckets(self) -> int:
        """Bound on the number of non-zero buckets kept."""
        return self._max_buckets

    @property
    def count(self) -> int:
        """Number of samples added."""
        return self._count

    @property
    def zero_count(self) -> int:
        """Number of samples at or below MIN_TRACKABLE_MS."""
        return self._zero_count

    @property
    def sum(self) -> float:
        """Sum of the samples in milliseconds."""
        return self._sum

    @property
    def min(self) -> float:
        """Smallest sample in milliseconds, NaN when empty."""
        return self._min if self._count else math.nan

    @property
    def max(self) -> float:
        """Largest sample in milliseconds, NaN when empty."""
        return self._max if self._count else math.nan

    @property
    def mean(self) -> float:
        """Mean of the samples in milliseconds, NaN when empty."""
        return self._sum / self._count if self._count else math.nan

    def add(self, value_ms: float) -> None:
        """Record one latency; raise ValueError for a negative, NaN or infinite value."""
        if value_ms > MIN_TRACKABLE_MS:
            if value_ms == _INF:
                raise ValueError("latency must be finite, got inf; record failed calls as errors instead")
            index = _ceil(_log(value_ms) * self._inverse_log_gamma)
            position = index - self._offset
            counts = self._counts
            if 0 <= position < len(counts):
                counts[position] += 1
            else:
                self._add_outside(index, 1)
        elif value_ms >= 0.0:
            self._zero_count += 1
        else:
            # NaN fails both comparisons above and lands here with the negative values.
            raise ValueError(f"latency must be a non-negative number of milliseconds, got {value_ms!r}")
        self._count += 1
        self._sum += value_ms
        if value_ms < self._min:
            self._min = value_ms
        if value_ms > self._max:
            self._max = value_ms

    def merge(self, other: LatencySketch) -> None:
        """Add every sample of other to this sketch; raise ValueError if the accuracies differ."""
        if other._relative_accuracy != self._relative_accuracy:
            raise ValueError(
                f"cannot merge a sketch with relative_accuracy {other._relative_accuracy!r} into one with "
                f"{self._relative_accuracy!r}; build both with the same accuracy"
            )
        if other._count == 0:
            return
        if other._counts:
            other_top = other._offset + len(other._counts) - 1
            self._add_outside(other._offset, 0)
            self._add_outside(other_top, 0)
            # Buckets of other below the kept range fold into the lowest kept bucket.
            other_counts = other._counts
            below = max(self._offset - other._offset, 0)
            if below:
                self._counts[0] += sum(other_counts[:below])
                other_counts = other_counts[below:]
            start = other._offset + below - self._offset
            end = start + len(other_counts)
            self._counts[start:end] = map(operator.add, self._counts[start:end], other_counts)
        self._zero_count += other._zero_count
        self._count += other._count
        self._sum += other._sum
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)

    def quantile(self, q: float) -> float:
        """Return the estimated q-quantile in milliseconds, or NaN when the sketch is empty.

        Raises ValueError unless 0 <= q <= 1.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q!r}; use 0.99 for p99")
        if self._count == 0:
            return math.nan
        rank = math.floor(q * (self._count - 1))
        if rank == 0:
            return self._min
        if rank == self._count - 1:
            return self._max
        if rank < self._zero_count:
            return 0.0
        seen = self._zero_count
        index = self._offset + len(self._counts) - 1
        for position, bucket_count in enumerate(self._counts):
            seen += bucket_count
            if seen > rank:
                index = self._offset + position
                break
        estimate = 2.0 * self._gamma**index / (self._gamma + 1.0)
        # Clamping to the exact extremes keeps the estimate inside the data and never adds error.
        return min(max(estimate, self._min), self._max)

    def bucket_counts(self) -> dict[int, int]:
        """Return the non-zero buckets as {bucket index: count}; the zero bucket is not included."""
        return {self._offset + k: c for k, c in enumerate(self._counts) if c}

    def _add_outside(self, index: int, increment: int) -> None:
        """Widen the bucket range to hold index, folding the lowest buckets when it grows too wide."""
        counts = self._counts
        if not counts:
            self._offset = index
            self._counts = [increment]
            return
        top = self._offset + len(counts) - 1
        if index < self._offset:
            if top - index + 1 > self._max_buckets:
                # The range is full: the sample goes to the lowest kept bucket.
                lowest_kept = top - self._max_buckets + 1
                self._extend_down(lowest_kept)
                self._counts[lowest_kept - self._offset] += increment
                return
            self._extend_down(index)
        elif index > top:
            counts.extend([0] * (index - top))
            lowest_kept = index - self._max_buckets + 1
            if lowest_kept > self._offset:
                folded = sum(counts[: lowest_kept - self._offset])
                del counts[: lowest_kept - self._offset]
                counts[0] += folded
                self._offset = lowest_kept
                logger.debug("latency sketch folded buckets below index %d", lowest_kept)
        self._counts[index - self._offset] += increment

    def _extend_down(self, index: int) -> None:
        if index < self._offset:
            self._counts[:0] = [0] * (self._offset - index)
            self._offset = index

    def to_proto(self) -> common_pb2.LatencySketch:
        """Return the sketch as an edgefleet.v1.LatencySketch message without empty buckets at either end."""
        counts = self._counts
        first = 0
        while first < len(counts) and counts[first] == 0:
            first += 1
        last = len(counts)
        while last > first and counts[last - 1] == 0:
            last -= 1
        return common_pb2.LatencySketch(
            relative_accuracy=self._relative_accuracy,
            bucket_offset=self._offset + first if last > first else 0,
            counts=counts[first:last],
            zero_count=self._zero_count,
            count=self._count,
            sum_ms=self._sum,
            min_ms=self._min if self._count else 0.0,
            max_ms=self._max if self._count else 0.0,
        )

    @classmethod
    def from_proto(
        cls, message: common_pb2.LatencySketch, *, max_buckets: int = DEFAULT_MAX_BUCKETS
    ) -> LatencySketch:
        """Build a sketch from a message; raise ValueError if its fields contradict each other."""
        sketch = cls(message.relative_accuracy, max_buckets=max_buckets)

        bucket_total = sum(message.counts)
        if message.count != message.zero_count + bucket_total:
            raise ValueError(
                f"invalid LatencySketch: count {message.count} != zero_count {message.zero_count} "
                f"+ bucket counts {bucket_total}"
            )
        if message.count and not (0.0 <= message.min_ms <= message.max_ms < math.inf):
            raise ValueError(
                f"invalid LatencySketch: min_ms {message.min_ms!r} and max_ms {message.max_ms!r} "
                "must satisfy 0 <= min_ms <= max_ms < inf"
            )
        if not math.isfinite(message.sum_ms) or message.sum_ms < 0.0:
            raise ValueError(f"invalid LatencySketch: sum_ms must be finite and >= 0, got {message.sum_ms!r}")

        if len(message.counts) > max_buckets:
            # Fold the lowest buckets exactly as add() would have.
            top = message.bucket_offset + len(message.counts) - 1
            sketch._offset = top - max_buckets + 1
            cut = len(message.counts) - max_buckets
            sketch._counts = list(message.counts[cut:])
            sketch._counts[0] += sum(message.counts[:cut])
        else:
            sketch._offset = message.bucket_offset
            sketch._counts = list(message.counts)

        sketch._zero_count = message.zero_count
        sketch._count = message.count
        sketch._sum = message.sum_ms
        if message.count:
            sketch._min = message.min_ms
            sketch._max = message.max_ms
        return sketch

    def to_bytes(self) -> bytes:
        """Return the serialized edgefleet.v1.LatencySketch message."""
        return self.to_proto().SerializeToString()

    @classmethod
    def from_bytes(cls, data: bytes, *, max_buckets: int = DEFAULT_MAX_BUCKETS) -> LatencySketch:
        """Parse a serialized edgefleet.v1.LatencySketch; raise ValueError if it is not one or is invalid."""
        message = common_pb2.LatencySketch()
        try:
            message.ParseFromString(data)
        except DecodeError as error:
            raise ValueError(f"invalid serialized LatencySketch ({len(data)} bytes): {error}") from error
        return cls.from_proto(message, max_buckets=max_buckets)

    def __repr__(self) -> str:
        return (
            f"LatencySketch(relative_accuracy={self._relative_accuracy!r}, count={self._count}, "
            f"buckets={len(self._counts)})"
        )
