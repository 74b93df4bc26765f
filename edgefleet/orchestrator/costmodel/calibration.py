"""Collect measured latencies (benchmarks, gate, fleet windows) and build a calibrated predictor from them."""

from __future__ import annotations

import logging
import os
import platform
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from edgefleet.common.hardware import HardwareProfile, RuntimeInfo
from edgefleet.common.sketch import LatencySketch
from edgefleet.orchestrator.costmodel.predictor import CalibratedPredictor, Measurement
from edgefleet.orchestrator.costmodel.store import BenchmarkResult
from edgefleet.orchestrator.domain import Variant
from edgefleet.orchestrator.store.base import NotFoundError, Store

log = logging.getLogger(__name__)

# Hardware class of the gate's latencies, which the orchestrator measures on its own host.
GATE_CLASS = "orchestrator-gate"
# Streamed windows older than this are not used: the fleet's software or load may have changed since.
FLEET_LOOKBACK = timedelta(days=7)
# A fleet group needs this many inferences before its percentiles are used.
MIN_FLEET_SAMPLES = 50
# The gate's latencies are medians over its repeats; they count as a full-weight measurement.
FULL_RUNS = 20
_THREADS_KEY = re.compile(r"^threads=(\d+)$")
# /proc/cpuinfo flag names and the normalised feature names of edgefleet.common.hardware.
_CPU_FLAGS = {
    "avx2": "avx2",
    "avx512f": "avx512f",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "amx_int8": "amx",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "asimdhp": "fp16",
}


def gate_profile(cpuinfo: Path = Path("/proc/cpuinfo")) -> HardwareProfile:
    """Return a profile of the orchestrator's host, where the gate measures latencies.

    CPU features come from the flags in cpuinfo (empty when it cannot be read). The profile's
    hardware class is GATE_CLASS.
    """
    features: set[str] = set()
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                features.update(_CPU_FLAGS[flag] for flag in value.split() if flag in _CPU_FLAGS)
                break
    except OSError as error:
        log.debug("cannot read %s (%s); the gate profile lists no CPU features", cpuinfo, error)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return HardwareProfile(
        cpu_model="orchestrator host",
        architecture=platform.machine(),
        logical_cores=os.cpu_count() or 1,
        usable_cores=float(cores),
        cpu_features=tuple(sorted(features)),
        memory_total_bytes=0,
        memory_available_bytes=0,
        disk_free_bytes=0,
        runtimes=(RuntimeInfo("onnxruntime", ""), RuntimeInfo("litert", "")),
        hardware_class=GATE_CLASS,
    )


def benchmark_measurements(results: Iterable[BenchmarkResult]) -> list[Measurement]:
    """Convert stored on-device benchmark results to measurements."""
    return [
        Measurement(
            variant_id=r.variant_id,
            hardware_class=r.hardware_class,
            threads=r.threads,
            p50_ms=r.p50_ms,
            p95_ms=r.p95_ms,
            runs=r.runs,
            source="benchmark",
            device_id=r.device_id,
        )
        for r in results
    ]


def gate_measurements(variants: Iterable[Variant], gate_class: str = GATE_CLASS) -> list[Measurement]:
    """Convert the gate's p50 latencies (Variant.latency_ms by "threads=N") to measurements.

    The gate reports no p95, so the p95 is left NaN and does not enter the tail ratio.
    """
    measurements = []
    for variant in variants:
        for key, value in variant.latency_ms.items():
            match = _THREADS_KEY.match(key)
            if match is None or not value > 0:
                continue
            measurements.append(
                Measurement(
                    variant_id=variant.variant_id,
                    hardware_class=gate_class,
                    threads=int(match.group(1)),
                    p50_ms=value,
                    p95_ms=float("nan"),
                    runs=FULL_RUNS,
                    source="gate",
                )
            )
    return measurements


def fleet_measurements(
    store: Store, variant_ids: Sequence[str], *, now: datetime | None = None, lookback: timedelta = FLEET_LOOKBACK
) -> list[Measurement]:
    """Merge the fleet's streamed latency windows by variant, hardware class and thread count.

    The thread count of a device comes from its reported state; devices that no longer report
    the variant are skipped, because their thread count is unknown.
    """
    now = now or datetime.now(UTC)
    sketches: dict[tuple[str, str, int], LatencySketch] = defaultdict(LatencySketch)
    threads_of: dict[tuple[str, str], int] = {}
    for variant_id in variant_ids:
        for window in store.query_metric_windows(variant_id=variant_id, start=now - lookback, end=now):
            key = (window.device_id, variant_id)
            if key not in threads_of:
                reported = [s for s in store.get_reported_state(window.device_id) if s.variant_id == variant_id]
                threads_of[key] = reported[0].threads if reported else 0
            threads = threads_of[key]
            if threads < 1:
                continue
            try:
                sketches[(variant_id, window.hardware_class, threads)].merge(LatencySketch.from_bytes(window.sketch))
            except ValueError as error:
                log.warning("skipping an unreadable latency window of device_id=%s: %s", window.device_id, error)
    return [
        Measurement(
            variant_id=variant_id,
            hardware_class=hardware_class,
            threads=threads,
            p50_ms=sketch.quantile(0.5),
            p95_ms=sketch.quantile(0.95),
            runs=sketch.count,
            source="fleet",
        )
        for (variant_id, hardware_class, threads), sketch in sketches.items()
        if sketch.count >= MIN_FLEET_SAMPLES and sketch.quantile(0.5) > 0
    ]


def class_profiles(store: Store) -> dict[str, HardwareProfile]:
    """Return one hardware profile per hardware class of the registered devices, and the gate's."""
    profiles: dict[str, HardwareProfile] = {GATE_CLASS: gate_profile()}
    for device in store.list_devices():
        if device.hardware.hardware_class:
            profiles.setdefault(device.hardware.hardware_class, device.hardware)
    return profiles


def build_predictor(
    store: Store,
    variants: Sequence[Variant],
    benchmarks: Iterable[BenchmarkResult],
    *,
    profiles: Mapping[str, HardwareProfile] | None = None,
    use_fleet: bool = True,
    now: datetime | None = None,
) -> CalibratedPredictor:
    """Build a predictor calibrated on every measurement of the given benchmarks, variants and fleet.

    Benchmarks of variants outside variants are looked up in the store, so results of other
    models still calibrate their hardware classes. profiles defaults to class_profiles(store).
    """
    results = list(benchmarks)
    known: dict[str, Variant] = {v.variant_id: v for v in variants}
    for variant_id in sorted({r.variant_id for r in results} - set(known)):
        try:
            known[variant_id] = store.get_variant(variant_id)
        except NotFoundError:
            continue
    measurements = benchmark_measurements(results) + gate_measurements(known.values())
    if use_fleet:
        measurements += fleet_measurements(store, [v.variant_id for v in variants], now=now)
    log.debug("calibrating the cost model on %d measurements of %d variants", len(measurements), len(known))
    return CalibratedPredictor(
        measurements, profiles=profiles if profiles is not None else class_profiles(store), variants=known
    )
