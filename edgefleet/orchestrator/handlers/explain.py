"""Cost-model requests: ExplainSelection, and the benchmark reports that agents send on their control streams."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from datetime import UTC, datetime

from edgefleet.common.errors import InvalidArgument, NotFound
from edgefleet.orchestrator import serde, validation
from edgefleet.orchestrator.costmodel.calibration import build_predictor
from edgefleet.orchestrator.costmodel.predictor import CalibratedPredictor
from edgefleet.orchestrator.costmodel.store import BenchmarkResult, benchmark_store
from edgefleet.orchestrator.domain import Variant
from edgefleet.orchestrator.handlers.catalog import get_model
from edgefleet.orchestrator.handlers.devices import unknown_device
from edgefleet.orchestrator.selection import Candidate, accuracy_rank, select_variant
from edgefleet.orchestrator.state import OrchestratorState
from edgefleet.orchestrator.store.base import NotFoundError
from edgefleet.v1 import agent_pb2, operator_pb2

log = logging.getLogger(__name__)

# Bounds on one report, so that a faulty agent cannot store unbounded rows.
MAX_REPORT_THREADS = 256
MAX_REPORT_RUNS = 100_000


def calibrated_predictor(
    state: OrchestratorState, variants: Sequence[Variant], hardware_classes: Sequence[str] = ()
) -> CalibratedPredictor:
    """Return a predictor calibrated on every stored measurement that bears on these variants.

    It uses the benchmarks of these variants on every hardware class, the benchmarks of other
    variants on hardware_classes (they calibrate those classes), the gate's latencies and the
    fleet's streamed latency windows.
    """
    store = benchmark_store(state)
    results = store.list_results(variant_ids=[v.variant_id for v in variants])
    seen = {id(r) for r in results}
    for hardware_class in hardware_classes:
        results += [r for r in store.list_results(hardware_class=hardware_class) if id(r) not in seen]
    return build_predictor(state.store, variants, results)


def save_benchmark_report(device_id: str, report: agent_pb2.BenchmarkReport, state: OrchestratorState) -> int:
    """Store the latencies of one BenchmarkReport under the device's hardware class; return the rows stored.

    Raises InvalidArgument for a report without a variant id or with invalid figures, and NotFound
    for an unknown device or variant.
    """
    if not report.variant_id:
        raise InvalidArgument("benchmark.variant_id", "missing; name the benchmarked variant")
    if len(report.by_threads) > MAX_REPORT_THREADS:
        raise InvalidArgument("benchmark.by_threads", f"{len(report.by_threads)} entries; at most {MAX_REPORT_THREADS}")
    device = state.store.get_device(device_id)
    if device is None:
        raise NotFound(f"device {device_id!r} not found")
    now = datetime.now(UTC)
    results = []
    for index, entry in enumerate(report.by_threads):
        field = f"benchmark.by_threads[{index}]"
        if entry.threads < 1:
            raise InvalidArgument(f"{field}.threads", f"{entry.threads}; must be at least 1")
        if not (math.isfinite(entry.p50_ms) and entry.p50_ms > 0 and math.isfinite(entry.p95_ms)):
            raise InvalidArgument(f"{field}.p50_ms", f"p50 {entry.p50_ms!r}, p95 {entry.p95_ms!r}; must be positive")
        if not 1 <= entry.runs <= MAX_REPORT_RUNS:
            raise InvalidArgument(f"{field}.runs", f"{entry.runs}; must be in [1, {MAX_REPORT_RUNS}]")
        results.append(
            BenchmarkResult(
                variant_id=report.variant_id,
                device_id=device_id,
                hardware_class=device.hardware.hardware_class,
                runtime=report.runtime,
                threads=entry.threads,
                p50_ms=entry.p50_ms,
                p95_ms=max(entry.p95_ms, entry.p50_ms),
                runs=entry.runs,
                measured_at=now,
            )
        )
    try:
        stored = benchmark_store(state).add_results(results)
    except NotFoundError as error:
        raise NotFound(str(error)) from None
    log.info(
        "stored benchmark of variant=%s from device_id=%s (%s): %d thread counts",
        report.variant_id,
        device_id,
        device.hardware.hardware_class,
        stored,
    )
    return stored


def candidate_to_proto(candidate: Candidate, variants: Sequence[Variant]) -> operator_pb2.Candidate:
    """Convert a candidate; variants are all of the version's variants, which its ranked accuracy depends on."""
    return operator_pb2.Candidate(
        variant=serde.variant_to_proto(candidate.variant),
        predicted_p50_ms=candidate.predicted_p50_ms,
        predicted_p95_ms=candidate.predicted_p95_ms,
        predicted_memory_bytes=candidate.predicted_memory_bytes,
        threads=candidate.threads,
        chosen=candidate.chosen,
        reason=candidate.reason,
        basis=candidate.basis,
        ranked_accuracy=accuracy_rank(candidate.variant, variants),
    )


def explain_selection(
    request: operator_pb2.ExplainSelectionRequest, state: OrchestratorState
) -> operator_pb2.ExplainSelectionResponse:
    """Run the variant selection for one device and return every candidate with its reason.

    budget_ms of 0 means no latency budget. Raises InvalidArgument for a negative or non-finite
    budget, and NotFound for an unknown device or model.
    """
    validation.check_device_id(request.device_id)
    if not math.isfinite(request.budget_ms) or request.budget_ms < 0:
        raise InvalidArgument("budget_ms", f"{request.budget_ms!r}; use a positive number of ms, or 0 for no budget")
    device = state.store.get_device(request.device_id)
    if device is None:
        raise unknown_device(request.device_id, state)
    model = get_model(operator_pb2.GetModelRequest(name=request.model_name, version=request.model_version), state)
    variants = state.store.list_variants(model.name, model.version)
    predictor = calibrated_predictor(state, variants, [device.hardware.hardware_class])
    budget = request.budget_ms or None
    reported = state.store.get_reported_state(device.device_id)
    selection = select_variant(device, variants, budget_ms=budget, predictor=predictor, reported=reported)
    log.info(
        "explained selection of %s:%s for device_id=%s: %s",
        model.name,
        model.version,
        device.device_id,
        selection.chosen.variant_id if selection.chosen else "no variant qualifies",
    )
    return operator_pb2.ExplainSelectionResponse(
        candidates=[candidate_to_proto(c, [d.variant for d in selection.candidates]) for c in selection.candidates],
        hardware_class=device.hardware.hardware_class,
        chosen_variant_id=selection.chosen.variant_id if selection.chosen else "",
        threads=selection.threads,
    )
