"""Latency and memory predictors: the analytic prior and its calibration from measured latencies."""

from __future__ import annotations

import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from edgefleet.common.amdahl import amdahl_speedup, choose_threads
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
# effect is nearly free, because the prior misjudges individual graphs by factors of 2 or more,
# while the effects shared by many variants are held closer to 0 until several measurements agree.
RIDGE = {
    "variant": 0.02,
    "variant_threaded": 0.3,
    "class": 0.3,
    "class_precision": 0.3,
    "precision": 1.0,
    "size": 1.0,
    "threads": 0.3,
    "threads_precision": 0.5,
    "threads_grain": 0.5,
    "threads_any": 1.0,
    "threads_any_grain": 1.0,
    "threads_prior": 0.02,
    "threads_any_prior": 0.02,
}
# The size feature of a variant is log(MACs / SIZE_MACS): how its residual against the prior changes
# with its size, for variants that were never measured.
SIZE_MACS = 30e6
# Iteratively reweighted least squares with Huber weights: a measurement whose residual is over
# HUBER_K robust standard deviations counts less, so one disturbed measurement cannot drag the
# effects it shares with other variants. The robust scale is at least MIN_SCALE (in log units).
HUBER_K = 1.345
MIN_SCALE = 0.03
IRLS_ITERATIONS = 6
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


class CalibratedPredictor:
    """The analytic prior corrected by a log-linear model of the measured residuals.

    For every measurement the residual r = log(measured p50) - log(analytic p50) is explained as a
    sum of effects: the variant's own effect (its kernels run faster or slower than MACs suggest),
    an extra variant effect at more than one thread (how well it parallelises), the hardware
    class x runtime x threads context, the same context per size bucket (MACs per layer, in powers
    of 4: small layers gain less from threads), the hardware class x runtime, the hardware class x
    runtime x precision (for example how much int8 gains on this CPU), the runtime x precision x
    int8-dot-product capability across classes, and the runtime x precision x size bucket. The
    effects are fitted by ridge regression, so each one stays at 0 (the analytic prior) until
    measurements move it.

    A prediction for a variant on a hardware class at a thread count that was measured directly
    uses the measurement. Otherwise it is the analytic p50 times exp(sum of the effects that apply).
    The p95 is the p50 times the median p95/p50 ratio measured in the same context, or of all
    measurements, or analytic.P95_OVER_P50.

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

    def _effects_of(
        self, variant: VariantFeatures, variant_id: str, device: DeviceFeatures, threads: int
    ) -> dict[tuple[str, ...], float]:
        """Return the effects that apply to a variant on a device at threads threads, with their feature values."""
        size = math.log(max(1.0, variant.macs) / SIZE_MACS)
        hardware_class, runtime, precision = device.hardware_class, variant.runtime, variant.precision
        effects: dict[tuple[str, ...], float] = {
            ("variant", variant_id): 1.0,
            ("class", hardware_class, runtime): 1.0,
            ("class_precision", hardware_class, runtime, precision): 1.0,
            ("precision", runtime, precision, str(device.int8_dot)): 1.0,
            ("size", runtime, precision): size,
        }
        if threads > 1:
            count = str(threads)
            # How far the prior's speed-up of this variant falls short of the best speed-up it gives any
            # variant (log units, <= 0: small layers gain less). The coefficient scales that shortfall,
            # so measurements can keep it (0), drop it (-1) or strengthen it.
            effective = max(1.0, min(float(threads), device.usable_cores))
            shortfall = math.log(
                analytic.estimate(variant, device, 1).p50_s / analytic.estimate(variant, device, threads).p50_s
            ) - math.log(amdahl_speedup(analytic.MAX_PARALLEL_FRACTION, effective))
            effects.update(
                {
                    ("threads", hardware_class, runtime, count): 1.0,
                    ("threads_precision", hardware_class, runtime, precision, count): 1.0,
                    ("threads_prior", hardware_class, runtime): shortfall,
                    ("threads_any_prior", runtime): shortfall,
                    ("threads_any", runtime, count): 1.0,
                    ("variant_threaded", variant_id): math.log2(threads),
                }
            )
        return effects

    def _fit(self, measurements: list[Measurement]) -> dict[tuple[str, ...], float]:
        """Fit the effects to the log residuals against the prior by robust ridge regression."""
        if not measurements:
            return {}
        rows: list[dict[tuple[str, ...], float]] = []
        targets: list[float] = []
        weights: list[float] = []
        for m in measurements:
            variant = self._variant(self._variants[m.variant_id])
            device = self._device(self._profiles[m.hardware_class])
            prior = analytic.estimate(variant, device, m.threads).p50_s * 1000.0
            rows.append(self._effects_of(variant, m.variant_id, device, m.threads))
            targets.append(math.log(m.p50_ms) - math.log(prior))
            weights.append(_weight(m))
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
            gram = design.T @ (design * w[:, None]) + ridge
            solution = np.linalg.solve(gram, design.T @ (w * target))
            residuals = np.abs(target - design @ solution)
            scale = max(MIN_SCALE, 1.4826 * float(np.median(residuals)))
            robust = np.minimum(1.0, HUBER_K * scale / np.maximum(residuals, 1e-12))
        return {key: float(value) for key, value in zip(columns, solution, strict=True)}

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
        prior = analytic.estimate(features, device, threads).p50_s * 1000.0
        effects = self._effects_of(features, variant.variant_id, device, threads)
        correction = sum(self._effects.get(key, 0.0) * value for key, value in effects.items())
        basis = "calibrated" if any(key in self._effects for key in effects) else "analytic"
        return prior * math.exp(correction), basis

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
