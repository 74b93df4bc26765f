"""Amdahl's-law fit of measured multi-thread speed-ups and the thread count chosen from it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# The thread count chosen is the smallest one whose measured speed-up reaches this share of the best.
DEFAULT_SHARE = 0.9


@dataclass(frozen=True)
class ThreadChoice:
    """The Amdahl fit of one latency-by-threads series and the thread count chosen from it."""

    threads: int  # The chosen thread count.
    parallel_fraction: float  # Fitted p of speedup(n) = 1 / ((1 - p) + p / n), in [0, 1].
    speedups: dict[int, float]  # Measured speed-up over one thread, by thread count.
    best_speedup: float
    share: float


def amdahl_speedup(parallel_fraction: float, threads: float) -> float:
    """Return Amdahl's speed-up 1 / ((1 - p) + p / n) for parallel fraction p on n threads.

    Raises ValueError for p outside [0, 1] or n < 1.
    """
    if not 0.0 <= parallel_fraction <= 1.0:
        raise ValueError(f"parallel_fraction must be in [0, 1], got {parallel_fraction!r}")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads!r}")
    return 1.0 / ((1.0 - parallel_fraction) + parallel_fraction / threads)


def fit_parallel_fraction(speedups: Mapping[int, float]) -> float:
    """Fit p of Amdahl's law to measured speed-ups by least squares; return p clipped to [0, 1].

    The squared error sum_n (s_n - 1 / ((1 - p) + p / n))^2 is minimised over p in [0, 1] by a
    grid search with steps of 0.005, refined around the best point to steps of 0.00005, because
    the model is non-linear in p. Thread
    counts of 1 carry no information and are ignored; with no other count the fit returns 0.
    Raises ValueError for a thread count below 1 or a speed-up that is not a positive finite number.
    """
    points: list[tuple[int, float]] = []
    for threads, speedup in speedups.items():
        if threads < 1:
            raise ValueError(f"thread counts must be at least 1, got {threads}")
        if not (math.isfinite(speedup) and speedup > 0):
            raise ValueError(f"speed-up at {threads} threads must be a positive number, got {speedup!r}")
        if threads > 1:
            points.append((threads, speedup))
    if not points:
        return 0.0

    counts = np.array([n for n, _ in points], dtype=float)
    measured = np.array([s for _, s in points])

    def errors(candidates: np.ndarray) -> np.ndarray:
        predicted = 1.0 / ((1.0 - candidates[:, None]) + candidates[:, None] / counts[None, :])
        return np.asarray(((measured[None, :] - predicted) ** 2).sum(axis=1))

    coarse = np.linspace(0.0, 1.0, 201)
    best = float(coarse[int(np.argmin(errors(coarse)))])
    fine = np.linspace(max(0.0, best - 0.005), min(1.0, best + 0.005), 201)
    return float(fine[int(np.argmin(errors(fine)))])


def choose_threads(latency_by_threads: Mapping[int, float], *, share: float = DEFAULT_SHARE) -> ThreadChoice:
    """Fit Amdahl's law to latencies measured at several thread counts and choose a thread count.

    latency_by_threads maps a thread count to a latency (p50 in ms, say) and must include 1 thread.
    The choice is the smallest thread count whose measured speed-up t(1) / t(n) is at least share
    times the best measured speed-up, so extra threads are spent only where they still pay off.
    Raises ValueError without a 1-thread entry, for a non-positive latency, or a share outside (0, 1].
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share!r}; use 0.9 to accept 90% of the best speed-up")
    if 1 not in latency_by_threads:
        raise ValueError(
            f"latencies at threads {sorted(latency_by_threads)} lack the 1-thread baseline; measure 1 thread too"
        )
    for threads, latency in latency_by_threads.items():
        if not (math.isfinite(latency) and latency > 0):
            raise ValueError(f"latency at {threads} threads must be a positive number, got {latency!r}")
    baseline = latency_by_threads[1]
    speedups = {threads: baseline / latency for threads, latency in sorted(latency_by_threads.items())}
    best = max(speedups.values())
    chosen = min(threads for threads, speedup in speedups.items() if speedup >= share * best)
    return ThreadChoice(
        threads=chosen,
        parallel_fraction=fit_parallel_fraction(speedups),
        speedups=speedups,
        best_speedup=best,
        share=share,
    )
