"""Measure LatencySketch add cost, quantile error against numpy, merge cost and serialized size."""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from edgefleet.common.sketch import LatencySketch

QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)


def _latencies(name: str, size: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    if name == "lognormal":
        values = rng.lognormal(mean=1.5, sigma=0.8, size=size)
    else:  # bimodal: a fast path around 4 ms and a slow path around 80 ms, 3 to 1.
        fast = rng.normal(4.0, 0.5, size - size // 4)
        slow = rng.normal(80.0, 10.0, size // 4)
        values = np.abs(np.concatenate([fast, slow])) + 0.01
        rng.shuffle(values)
    return [float(v) for v in values]


def _measure_add(values: list[float], accuracy: float) -> tuple[LatencySketch, float]:
    """Return the filled sketch and the best of three runs in CPU nanoseconds per add."""
    best = float("inf")
    sketch = LatencySketch(accuracy)
    for _ in range(3):
        sketch = LatencySketch(accuracy)
        add = sketch.add
        start = time.process_time_ns()
        for value in values:
            add(value)
        best = min(best, (time.process_time_ns() - start) / len(values))
    return sketch, best


def _measure_merge(values: list[float], accuracy: float, parts: int) -> float:
    """Return CPU microseconds per merge of one part's sketch into a running total."""
    sketches = []
    for chunk in np.array_split(np.array(values), parts):
        sketch = LatencySketch(accuracy)
        for value in chunk.tolist():
            sketch.add(value)
        sketches.append(sketch)
    total = LatencySketch(accuracy)
    start = time.process_time_ns()
    for sketch in sketches:
        total.merge(sketch)
    return (time.process_time_ns() - start) / parts / 1e3


def main() -> None:
    """Print the benchmark figures for each distribution."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=1_000_000, help="samples per distribution")
    parser.add_argument("--accuracy", type=float, default=0.01, help="relative accuracy of the sketch")
    parser.add_argument("--merge-parts", type=int, default=1_000, help="sketches merged in the merge test")
    args = parser.parse_args()

    print(f"python {platform.python_version()} on {platform.machine()} ({platform.processor() or 'cpu'})")
    # Process CPU time rather than wall-clock time, so other load on a shared machine inflates it less.
    print(f"samples={args.samples} relative_accuracy={args.accuracy}; times are process CPU time")
    for name in ("lognormal", "bimodal"):
        values = _latencies(name, args.samples, seed=1)
        sketch, ns_per_add = _measure_add(values, args.accuracy)
        exact = np.array(values)
        errors = []
        for q in QUANTILES:
            truth = float(np.quantile(exact, q, method="lower"))
            errors.append(abs(sketch.quantile(q) - truth) / truth)
        merge_us = _measure_merge(values, args.accuracy, args.merge_parts)
        print(
            f"\n{name}: {ns_per_add:.0f} ns per add, {len(sketch.bucket_counts())} buckets, "
            f"{len(sketch.to_bytes())} bytes serialized"
        )
        for q, error in zip(QUANTILES, errors, strict=True):
            print(f"  p{q * 100:g}: relative error {error:.4%}")
        print(f"  max relative error {max(errors):.4%} (bound {args.accuracy:.2%})")
        print(
            f"  merge: {merge_us:.1f} us per sketch ({args.merge_parts} sketches of "
            f"{args.samples // args.merge_parts} samples)"
        )


if __name__ == "__main__":
    main()
