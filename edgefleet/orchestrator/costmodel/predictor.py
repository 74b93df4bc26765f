"""Latency and memory predictors: the analytic prior and its calibration from measured latencies."""

from __future__ import annotations

import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from edgefleet.common.amdahl import choose_threads
from edgefleet.common.hardware import HardwareProfile
from edgefleet.orchestrator.costmodel import analytic
from edgefleet.orchestrator.costmodel.features import (
    DeviceFeatures,
    VariantFeatures,
    device_features,
    variant_features,
)
from edgefleet.orchestrator.domain import Variant

log = logging.getLogger(__name__)

# Largest thread count searched when the predictor chooses threads.
MAX_SEARCH_THREADS = 16
# Ridge penalty of each kind of effect, in units of one full-weight measurement: a larger value needs
# more measurements before the effect moves away from 0 (the analytic prior). The variant's own
# effects are nearly free, because the prior misjudges individual graphs by factors of 2 or more,
# while the effects shared by many variants are held closer to 0 until several measurements agree.
RIDGE = {
    # Log-latency effects at 1 thread, and the variant's own deviation from the thread model.
    "variant": 0.02,
    "variant_threaded": 0.05,
    "class": 0.3,
    "class_precision": 0.3,
    "precision": 1.0,
    "size": 1.0,
    # Corrections to the prior thread ratio (a + s * layers / t1) by runtime, class and precision.
    "thread_runtime": 1.0,
    "thread_runtime_sync": 1.0,
    "thread_class": 1.0,
    "thread_class_sync": 1.0,
    "thread_precision": 2.0,
    "thread_precision_sync": 2.0,
}
# The size feature of a variant is log(MACs / SIZE_MACS): how its residual against the prior changes
# with its size, for variants that were never measured.
SIZE_MACS = 30e6
# The synchronisation feature is layers / t1 in layers per ms, divided by this, so its coefficient
# (SYNC_SCALE times the cost per layer in ms) is of the order of 1.
SYNC_SCALE = 100.0
# Predicted thread ratios are kept in this range, so an extrapolated fit cannot turn negative.
MIN_THREAD_RATIO = 0.02
MAX_THREAD_RATIO = 10.0
# Iteratively reweighted least squares with Huber weights: a measurement whose residual is over
# HUBER_K robust standard deviations counts less, so one disturbed measurement cannot drag the
# effects it shares with other variants. The robust scale is at least MIN_SCALE (log units).
HUBER_K = 1.345
MIN_SCALE = 0.03
IRLS_ITERATIONS = 6
# Rounds of the alternating fit of the 1-thread effects and the thread model, which depend on each other.
ALTERNATING_ROUNDS = 4
# Weight of one measurement by source. Streamed fleet windows include queueing and other load on the
# device, so they count less than a benchmark on an idle device.
SOURCE_WEIGHTS = {"benchmark": 1.0, "gate": 1.0, "fleet": 0.5}
# Runs at which a measurement has full weight; fewer runs weigh proportionally less.
FULL_WEIGHT_RUNS = 20


@dataclass(frozen=True)
class Measurement:
    """One measured latency of a variant on a hardware class at a thread count."""

    variant_id: str
    hardware_class: str
    threads: int
    p50_ms: float
    p95_ms: float
    runs: int
    source: str  # "benchmark" (on a device), "gate" (on the orchestrator) or "fleet" (streamed windows).
    device_id: str = ""


@dataclass(frozen=True)
class Prediction:
    """Predicted latency and memory of one variant on one device."""

    p50_ms: float
    p95_ms: float
    memory_bytes: int
    threads: int
    parallel_fraction: float  # Of the latency at 1 thread, from Amdahl's law.
    basis: str  # "analytic", "calibrated" (from other measurements) or "measured" (this variant and class).


def _weight(measurement: Measurement) -> float:
    runs = max(1, measurement.runs)
    return SOURCE_WEIGHTS.get(measurement.source, 0.5) * min(1.0, runs / FULL_WEIGHT_RUNS)


def _robust_ridge(
    rows: list[dict[tuple[str, ...], float]], targets: list[float], weights: list[float]
) -> dict[tuple[str, ...], float]:
    """Fit targets ~ sum(coefficient * value) over each row's effects; return the coefficients by effect.

    Ridge regression with the penalty RIDGE[kind] per effect, reweighted with Huber weights over
    IRLS_ITERATIONS rounds.
    """
    columns = sorted({key for row in rows for key in row})
    index = {key: i for i, key in enumerate(columns)}
    design = np.zeros((len(rows), len(columns)))
    for i, row in enumerate(rows):
        for key, value in row.items():
            design[i, index[key]] = value
    target = np.asarray(targets)
    base = np.asarray(weights)
    ridge = np.diag([RIDGE[key[0]] for key in columns])
    robust = np.ones_like(base)
    solution = np.zeros(len(columns))
    for _ in range(IRLS_ITERATIONS):
        w = base * robust
        solution = np.linalg.solve(design.T @ (design * w[:, None]) + ridge, design.T @ (w * target))
        residuals = np.abs(target - design @ solution)
        scale = max(MIN_SCALE, 1.4826 * float(np.median(residuals)))
        robust = np.minimum(1.0, HUBER_K * scale / np.maximum(residuals, 1e-12))
    return {key: float(value) for key, value in zip(columns, solution, strict=True)}


class CalibratedPredictor:
    """The analytic prior corrected by a factor model of the measured latencies.

    The latency of variant v on hardware class h at n threads is modelled as

        log t(v, h, n) = log prior_1(v, h) + sum of 1-thread effects + log ratio(v, h, n) + u_v * log2(n)

    The 1-thread effects are additive in log space, so the latency is a per-variant cost times a
    per-class speed. They are the variant's own effect (its kernels run faster or slower than MACs
    suggest), hardware class x runtime, hardware class x runtime x precision (what int8 gains or loses on this
    CPU), runtime x precision x int8-dot-product capability across classes, and a slope in log MACs
    by runtime and precision (for variants that were never measured). No effect assumes int8 is
    faster: the precision effects start at the prior's factor and are learned.

    The thread ratio t(n) / t(1) = a + s * layers / t(1) is Amdahl's law plus a synchronisation
    cost per layer (analytic.thread_ratio), with a and s corrected by runtime x threads, hardware
    class x runtime x threads and class x runtime x precision x threads. u_v is the variant's own
    deviation from the thread model, learned from its multi-thread measurements on any class.

    Effects are fitted by ridge regression (RIDGE), so each stays at 0 (the prior) until
    measurements move it, with Huber reweighting against disturbed measurements. The 1-thread
    effects and the thread model are fitted in turn, because the ratio depends on t(1).

    A prediction for a variant on a hardware class at a thread count that was measured directly
    uses the measurement. The p95 is the p50 times the median p95/p50 ratio measured in the same
    context, or of all measurements, or analytic.P95_OVER_P50.

    profiles maps a hardware class to one profile of that class, and variants maps a variant id to
    the variant; measurements of a class or variant missing from them are skipped.
    """

    def __init__(
        self,
        measurements: Iterable[Measurement],
        *,
        profiles: Mapping[str, HardwareProfile] | None = None,
        variants: Mapping[str, Variant] | None = None,
    ) -> None:
        self._profiles = dict(profiles or {})
        self._variants = dict(variants or {})
        self._variant_cache: dict[str, VariantFeatures] = {}
        self._device_cache: dict[str, DeviceFeatures] = {}
        usable = [m for m in measurements if self._usable(m)]
        self.measurements = tuple(usable)
        self._direct = self._aggregate_direct(usable)
        self._effects = self._fit(usable)
        self._tail_ratio = self._fit_tail(usable)

    # Features

    def _variant(self, variant: Variant) -> VariantFeatures:
        features = self._variant_cache.get(variant.variant_id)
        if features is None:
            features = variant_features(variant.metadata, variant.size_bytes)
            self._variant_cache[variant.variant_id] = features
        return features

    def _device(self, hardware: HardwareProfile) -> DeviceFeatures:
        key = hardware.hardware_class or f"unclassified:{id(hardware)}"
        features = self._device_cache.get(key)
        if features is None:
            features = device_features(hardware)
            if hardware.hardware_class:
                self._device_cache[key] = features
        return features

    def _usable(self, measurement: Measurement) -> bool:
        return (
            measurement.variant_id in self._variants
            and measurement.hardware_class in self._profiles
            and measurement.threads >= 1
            and math.isfinite(measurement.p50_ms)
            and measurement.p50_ms > 0
        )

    # Fitting

    @staticmethod
    def _aggregate_direct(measurements: list[Measurement]) -> dict[tuple[str, str, int], float]:
        """Return the weighted geometric mean p50 in ms by (variant, class, threads)."""
        sums: dict[tuple[str, str, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
        for m in measurements:
            weight = _weight(m)
            entry = sums[(m.variant_id, m.hardware_class, m.threads)]
            entry[0] += weight * math.log(m.p50_ms)
            entry[1] += weight
        return {key: math.exp(total / weight) for key, (total, weight) in sums.items() if weight > 0}

    def _single_effects(
        self, variant: VariantFeatures, variant_id: str, device: DeviceFeatures, threads: int
    ) -> dict[tuple[str, ...], float]:
        """Return the log-latency effects of a variant on a device, with their feature values."""
        hardware_class, runtime, precision = device.hardware_class, variant.runtime, variant.precision
        effects: dict[tuple[str, ...], float] = {
            ("variant", variant_id): 1.0,
            ("class", hardware_class, runtime): 1.0,
            ("class_precision", hardware_class, runtime, precision): 1.0,
            ("precision", runtime, precision, str(device.int8_dot)): 1.0,
            ("size", runtime, precision): math.log(max(1.0, variant.macs) / SIZE_MACS),
        }
        if threads > 1:
            effects[("variant_threaded", variant_id)] = math.log2(threads)
        return effects

    @staticmethod
    def _thread_effects(
        variant: VariantFeatures, device: DeviceFeatures, threads: int, single_ms: float
    ) -> dict[tuple[str, ...], float]:
        """Return the corrections of the thread ratio that apply, with their feature values."""
        count = str(threads)
        sync = variant.layers / single_ms / SYNC_SCALE
        hardware_class, runtime, precision = device.hardware_class, variant.runtime, variant.precision
        return {
            ("thread_runtime", runtime, count): 1.0,
            ("thread_runtime_sync", runtime): sync,
            ("thread_class", hardware_class, runtime, count): 1.0,
            ("thread_class_sync", hardware_class, runtime, count): sync,
            ("thread_precision", hardware_class, runtime, precision, count): 1.0,
            ("thread_precision_sync", hardware_class, runtime, precision, count): sync,
        }

    def _thread_ratio(self, variant: VariantFeatures, device: DeviceFeatures, threads: int, single_ms: float) -> float:
        """Return the predicted t(threads) / t(1) for a variant whose 1-thread p50 is single_ms."""
        if threads <= 1:
            return 1.0
        ratio = analytic.thread_ratio(variant.layers, single_ms / 1000.0, threads, device)
        for key, value in self._thread_effects(variant, device, threads, single_ms).items():
            ratio += self._effects.get(key, 0.0) * value
        return min(MAX_THREAD_RATIO, max(MIN_THREAD_RATIO, ratio))

    def _log_single(self, variant: VariantFeatures, variant_id: str, device: DeviceFeatures) -> float:
        """Return the predicted log 1-thread p50 in ms from the 1-thread effects."""
        prior = analytic.estimate(variant, device, 1).single_s * 1000.0
        effects = self._single_effects(variant, variant_id, device, 1)
        return math.log(prior) + sum(self._effects.get(key, 0.0) * value for key, value in effects.items())

    def _fit(self, measurements: list[Measurement]) -> dict[tuple[str, ...], float]:
        """Fit the 1-thread effects and the thread model in turn; return every effect's coefficient."""
        self._effects = {}
        if not measurements:
            return {}
        cases = []
        for m in measurements:
            variant = self._variant(self._variants[m.variant_id])
            device = self._device(self._profiles[m.hardware_class])
            cases.append((m, variant, device, self._single_effects(variant, m.variant_id, device, m.threads)))
        threaded = [case for case in cases if case[0].threads > 1]
        weights = [_weight(m) for m, _, _, _ in cases]
        for _ in range(ALTERNATING_ROUNDS):
            # The 1-thread effects, with the current thread model's ratio as an offset.
            targets = []
            for m, variant, device, _ in cases:
                single = math.exp(self._log_single(variant, m.variant_id, device))
                offset = math.log(analytic.estimate(variant, device, 1).single_s * 1000.0)
                offset += math.log(self._thread_ratio(variant, device, m.threads, single))
                targets.append(math.log(m.p50_ms) - offset)
            thread_effects = {key: value for key, value in self._effects.items() if key[0].startswith("thread_")}
            self._effects = _robust_ridge([row for _, _, _, row in cases], targets, weights) | thread_effects
            if not threaded:
                break
            # The thread model: measured t(n) over the predicted t(1), less the prior ratio. Residuals are
            # relative (weights 1 / ratio^2), so that they match the log-space fit of the other effects.
            rows, residuals, thread_weights = [], [], []
            for m, variant, device, _ in threaded:
                single = math.exp(self._log_single(variant, m.variant_id, device))
                ratio = m.p50_ms / single
                prior = analytic.thread_ratio(variant.layers, single / 1000.0, m.threads, device)
                row = self._thread_effects(variant, device, m.threads, single)
                rows.append({key: value / ratio for key, value in row.items()})
                residuals.append((ratio - prior) / ratio)
                thread_weights.append(_weight(m))
            fitted = _robust_ridge(rows, residuals, thread_weights)
            self._effects = {key: value for key, value in self._effects.items() if not key[0].startswith("thread_")}
            self._effects |= fitted
        return self._effects

    def _fit_tail(self, measurements: list[Measurement]) -> dict[tuple[str, ...], float]:
        ratios: dict[tuple[str, ...], list[float]] = defaultdict(list)
        for m in measurements:
            if not (math.isfinite(m.p95_ms) and m.p95_ms >= m.p50_ms):
                continue
            ratio = m.p95_ms / m.p50_ms
            runtime = self._variant(self._variants[m.variant_id]).runtime
            ratios[(m.hardware_class, runtime, str(m.threads))].append(ratio)
            ratios[("all",)].append(ratio)
        return {key: statistics.median(values) for key, values in ratios.items()}

    # Prediction

    def p50_ms(self, hardware: HardwareProfile, variant: Variant, threads: int) -> tuple[float, str]:
        """Return the predicted p50 in ms at threads threads and its basis."""
        device = self._device(hardware)
        direct = self._direct.get((variant.variant_id, device.hardware_class, threads))
        if direct is not None:
            return direct, "measured"
        features = self._variant(variant)
        log_single = self._log_single(features, variant.variant_id, device)
        ratio = self._thread_ratio(features, device, threads, math.exp(log_single))
        threaded = self._effects.get(("variant_threaded", variant.variant_id), 0.0) * math.log2(max(1, threads))
        keys = self._single_effects(features, variant.variant_id, device, threads)
        basis = "calibrated" if any(key in self._effects for key in keys) else "analytic"
        return math.exp(log_single + threaded) * ratio, basis

    def tail_ratio(self, hardware_class: str, runtime: str, threads: int) -> float:
        """Return the p95/p50 ratio measured in this context, or across all measurements, or the prior."""
        ratio = self._tail_ratio.get((hardware_class, runtime, str(threads)))
        if ratio is None:
            ratio = self._tail_ratio.get(("all",), analytic.P95_OVER_P50)
        return max(1.0, ratio)

    def predict(self, hardware: HardwareProfile, variant: Variant, threads: int | None = None) -> Prediction:
        """Return the predicted p50, p95 and memory of variant on a device with this hardware.

        threads=None chooses the thread count: the smallest count within 90% of the best speed-up
        (common.amdahl.choose_threads) over the device's thread budget, on measured latencies when
        this variant was measured on this hardware class at 1 thread and at least one other count,
        else on predicted ones. Raises ValueError for threads below 1 or a variant of unknown format.
        """
        device = self._device(hardware)
        features = self._variant(variant)
        budget = min(device.max_threads, MAX_SEARCH_THREADS)
        series: dict[int, tuple[float, str]] = {}
        if threads is None:
            for count in range(1, budget + 1):
                series[count] = self.p50_ms(hardware, variant, count)
            choice = choose_threads({count: value for count, (value, _) in series.items()})
            chosen = choice.threads
            fraction = choice.parallel_fraction
        else:
            if threads < 1:
                raise ValueError(f"threads must be at least 1, got {threads}")
            chosen = threads
            series[1] = self.p50_ms(hardware, variant, 1)
            series[threads] = self.p50_ms(hardware, variant, threads)
            fraction = choose_threads({count: value for count, (value, _) in series.items()}).parallel_fraction
        p50, basis = series[chosen]
        p95 = p50 * self.tail_ratio(device.hardware_class, features.runtime, chosen)
        return Prediction(
            p50_ms=p50,
            p95_ms=p95,
            memory_bytes=analytic.memory_bytes(features),
            threads=chosen,
            parallel_fraction=fraction,
            basis=basis,
        )


class AnalyticPredictor(CalibratedPredictor):
    """Predicts from the variant's graph and the device's CPU alone, with no measurement."""

    def __init__(self) -> None:
        super().__init__(())
