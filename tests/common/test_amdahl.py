"""Tests of the Amdahl's-law fit and the thread choice."""

from __future__ import annotations

import pytest

from edgefleet.common.amdahl import amdahl_speedup, choose_threads, fit_parallel_fraction


@pytest.mark.parametrize("p", [0.0, 0.3, 0.75, 0.95, 1.0])
def test_fit_recovers_p(p: float) -> None:
    speedups = {n: amdahl_speedup(p, n) for n in range(1, 9)}
    assert fit_parallel_fraction(speedups) == pytest.approx(p, abs=1e-3)


def test_fit_noisy_speedups() -> None:
    speedups = {n: amdahl_speedup(0.8, n) * (1.02 if n % 2 else 0.98) for n in range(1, 9)}
    assert fit_parallel_fraction(speedups) == pytest.approx(0.8, abs=0.03)


def test_fit_clips_superlinear() -> None:
    assert fit_parallel_fraction({1: 1.0, 2: 2.4, 4: 5.0}) == 1.0


def test_fit_clips_slowdown() -> None:
    assert fit_parallel_fraction({1: 1.0, 2: 0.7, 4: 0.5}) == 0.0


def test_fit_single_thread_only() -> None:
    assert fit_parallel_fraction({1: 1.0}) == 0.0


def test_fit_rejects_bad_speedup() -> None:
    with pytest.raises(ValueError, match="speed-up at 2 threads"):
        fit_parallel_fraction({1: 1.0, 2: -1.0})


def test_choose_smallest_within_share() -> None:
    # p = 0.9: speed-ups 1, 1.82, 2.5, 3.08; 90% of 3.08 is 2.77, so 4 threads is the smallest that reaches it.
    latencies = {n: 100.0 / amdahl_speedup(0.9, n) for n in range(1, 5)}
    choice = choose_threads(latencies)
    assert choice.threads == 4
    assert choice.parallel_fraction == pytest.approx(0.9, abs=1e-3)


def test_choose_stops_at_plateau() -> None:
    # The speed-up flattens after 2 threads, so the third and fourth threads are not worth it.
    choice = choose_threads({1: 10.0, 2: 5.5, 3: 5.2, 4: 5.1})
    assert choice.threads == 2


def test_choose_serial_model() -> None:
    choice = choose_threads({1: 10.0, 2: 10.5, 3: 11.0})
    assert choice.threads == 1
    assert choice.parallel_fraction == 0.0


def test_choose_lower_share_fewer_threads() -> None:
    latencies = {n: 100.0 / amdahl_speedup(0.9, n) for n in range(1, 5)}
    assert choose_threads(latencies, share=0.5).threads == 2


def test_choose_requires_baseline() -> None:
    with pytest.raises(ValueError, match="1-thread baseline"):
        choose_threads({2: 5.0, 4: 3.0})


def test_choose_rejects_share() -> None:
    with pytest.raises(ValueError, match="share must be in"):
        choose_threads({1: 5.0}, share=1.5)
