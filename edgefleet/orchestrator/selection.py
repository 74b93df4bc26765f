"""Choose the variant of a model that each device runs, from predicted latency, memory, disk space and accuracy."""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from edgefleet.common.hardware import HardwareProfile, hardware_class_of
from edgefleet.common.units import human_bytes
from edgefleet.orchestrator.costmodel.features import FORMAT_RUNTIMES
from edgefleet.orchestrator.costmodel.predictor import Prediction
from edgefleet.orchestrator.domain import Device, ModelStatus, Variant
from edgefleet.orchestrator.runtime_compat import RUNTIME_TOO_OLD as RUNTIME_TOO_OLD
from edgefleet.orchestrator.runtime_compat import check_runtime_version

log = logging.getLogger(__name__)

MIB = 1024 * 1024

# Reasons a candidate carries, as the first word of Candidate.reason. RUNTIME_TOO_OLD, imported
# above, marks a variant that the device's runtime version cannot load.
CHOSEN = "chosen"
GATE_REJECTED = "rejected by the gate"
GATE_PENDING = "waiting for the gate"
NOT_RUNNABLE = "format not runnable"
OVER_MEMORY = "memory over the device's memory"
OVER_DISK = "file larger than the device's free disk space"
OVER_BUDGET = "predicted p95 over the budget"
LESS_ACCURATE = "less accurate than the chosen one"
SLOWER = "slower than the chosen one at equal accuracy"


class Predictor(Protocol):
    """Predicts a variant's latency and memory on a device, choosing the thread count when threads is None."""

    def predict(self, hardware: HardwareProfile, variant: Variant, threads: int | None = None) -> Prediction: ...


@dataclass(frozen=True)
class Candidate:
    """One variant as the selection saw it: its prediction and why it was chosen or excluded."""

    variant: Variant
    predicted_p50_ms: float  # NaN when the variant was excluded before prediction.
    predicted_p95_ms: float
    predicted_memory_bytes: int
    threads: int
    chosen: bool
    reason: str
    basis: str = ""  # The prediction's basis: "analytic", "calibrated" or "measured".


@dataclass(frozen=True)
class Selection:
    """The variant chosen for one device (None when no variant qualifies) and every candidate."""

    chosen: Variant | None
    threads: int  # Threads for the assignment; 0 when nothing was chosen.
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def reason(self) -> str:
        """The chosen candidate's reason, or why nothing was chosen."""
        for candidate in self.candidates:
            if candidate.chosen:
                return candidate.reason
        if not self.candidates:
            return "the model has no variants"
        return "no variant qualifies: " + "; ".join(f"{c.variant.variant_id}: {c.reason}" for c in self.candidates)


def runnable_formats(hardware: HardwareProfile) -> list[str]:
    """Return the model formats the device's runtimes execute, in the order of its runtimes."""
    runtimes = {name: fmt for fmt, name in FORMAT_RUNTIMES.items()}
    return [runtimes[r.name] for r in hardware.runtimes if r.name in runtimes]


# Reported states in which the device's model store contains the variant's file.
STORED_STATES = frozenset({"loading", "serving"})


def fits_disk(variant: Variant, disk_free_bytes: int, stored_digests: Collection[str] = ()) -> bool:
    """Return whether the variant's file fits the free space, or is already stored on the device.

    True as well when the free space is unknown (0).
    """
    return disk_free_bytes <= 0 or variant.digest in stored_digests or variant.size_bytes <= disk_free_bytes


def stored_digests(reported: Iterable[ModelStatus]) -> frozenset[str]:
    """Return the digests of the files that a device's reported model states show in its model store."""
    return frozenset(status.digest for status in reported if status.state in STORED_STATES and status.digest)


def accuracy_drop(variant: Variant, variants: Sequence[Variant]) -> float | None:
    """Return the points of accuracy a variant lost against its source, or None when it was not measured.

    A source loses nothing. Any other variant has the drop its own gate measured, against the source
    on the same samples. Drops that gates measured on different data compare only roughly (see
    other_evaluation_data), and selection notes that in its reasons. For variants stored
    before the drop was kept, top-1 agreement gives the drop exactly. A top-1 accuracy against labels
    does not, because the source's figure on those samples was not kept, so such a variant counts as
    unmeasured: compared with the source's figure from another gate, it could rank above the source.
    """
    if variant.kind == "source":
        return 0.0
    if variant.accuracy_drop is not None and not math.isnan(variant.accuracy_drop):
        return variant.accuracy_drop
    if variant.accuracy is None or math.isnan(variant.accuracy):
        return None
    if variant.accuracy_metric == "top1_agreement":
        return (1.0 - variant.accuracy) * 100.0
    return None


def accuracy_rank(variant: Variant, variants: Sequence[Variant]) -> float:
    """Return the accuracy a variant ranks by, relative to its source (1 - drop / 100); -1 when unmeasured."""
    drop = accuracy_drop(variant, variants)
    return -1.0 if drop is None else 1.0 - drop / 100.0


def other_evaluation_data(variant: Variant, other: Variant) -> bool:
    """Return whether two variants' drops may come from different evaluation data.

    A source's drop is 0 by definition, so it compares with any drop. Two gated variants compare
    exactly only when both stored the same digest of their evaluation data. Otherwise the sample
    sets, and often the metric and sample count, differ, and a difference of one sample on a small
    set can decide the ranking.
    """
    if variant.kind == "source" or other.kind == "source":
        return False
    return not variant.evaluation_digest or variant.evaluation_digest != other.evaluation_digest


def _describe_evaluation(variant: Variant) -> str:
    metric = variant.accuracy_metric or "accuracy"
    samples = f"{variant.evaluation_samples} samples" if variant.evaluation_samples else "an unknown number of samples"
    return f"{metric} on {samples}"


def _different_data_note(variant: Variant, chosen: Variant) -> str:
    return (
        f"; note: measured on other evaluation data than {chosen.variant_id}'s ({_describe_evaluation(variant)}, "
        f"against {_describe_evaluation(chosen)}), so the two drops compare only roughly"
    )


def _describe_accuracy(rank: float) -> str:
    if rank < 0:
        return "accuracy unmeasured"
    return f"accuracy drop {(1.0 - rank) * 100.0:.2f} points"


def _excluded(variant: Variant, reason: str, prediction: Prediction | None = None) -> Candidate:
    return Candidate(
        variant=variant,
        predicted_p50_ms=prediction.p50_ms if prediction else math.nan,
        predicted_p95_ms=prediction.p95_ms if prediction else math.nan,
        predicted_memory_bytes=prediction.memory_bytes if prediction else 0,
        threads=prediction.threads if prediction else 0,
        chosen=False,
        reason=reason,
        basis=prediction.basis if prediction else "",
    )


def select_for_hardware(
    hardware: HardwareProfile,
    variants: Sequence[Variant],
    *,
    budget_ms: float | None,
    predictor: Predictor,
    stored: Collection[str] = (),
) -> Selection:
    """Select a variant for any device with this hardware profile, by the rule of select_variant.

    stored contains the digests of files the device already stores, which need no free space.
    """
    if budget_ms is not None and not (budget_ms > 0):
        raise ValueError(f"budget_ms must be positive or None for no budget, got {budget_ms!r}")
    formats = runnable_formats(hardware)
    memory = hardware.memory_total_bytes
    # The free space of the model store, as last reported. 0 means the device could not read it.
    disk_free = hardware.disk_free_bytes
    qualified: list[tuple[Variant, Prediction, float]] = []
    excluded: dict[str, Candidate] = {}
    notes: dict[str, str] = {}  # Variants allowed although the runtime version could not be checked.
    for variant in variants:
        if variant.status != "accepted":
            detail = variant.rejection_reason or variant.status
            verdict = GATE_PENDING if variant.status == "pending" else GATE_REJECTED
            excluded[variant.variant_id] = _excluded(variant, f"{verdict}: {detail}")
            continue
        if variant.format not in formats:
            runs = ", ".join(formats) or "no format"
            excluded[variant.variant_id] = _excluded(
                variant, f"{NOT_RUNNABLE}: {variant.format}, but the device runs {runs}"
            )
            continue
        if not fits_disk(variant, disk_free, stored):
            excluded[variant.variant_id] = _excluded(
                variant,
                f"{OVER_DISK}: {human_bytes(variant.size_bytes)} file, "
                f"{human_bytes(disk_free)} free in its model store",
            )
            continue
        runtime_check = check_runtime_version(hardware, variant)
        if not runtime_check.loads:
            excluded[variant.variant_id] = _excluded(variant, runtime_check.reason)
            continue
        if runtime_check.reason:
            notes[variant.variant_id] = runtime_check.reason
        prediction = predictor.predict(hardware, variant)
        if memory > 0 and prediction.memory_bytes > memory:
            excluded[variant.variant_id] = _excluded(
                variant,
                f"{OVER_MEMORY}: {prediction.memory_bytes / MIB:.0f} MiB predicted, "
                f"{memory / MIB:.0f} MiB on the device",
                prediction,
            )
            continue
        if budget_ms is not None and prediction.p95_ms > budget_ms:
            excluded[variant.variant_id] = _excluded(
                variant, f"{OVER_BUDGET}: {prediction.p95_ms:.2f} ms > {budget_ms:g} ms", prediction
            )
            continue
        qualified.append((variant, prediction, accuracy_rank(variant, variants)))

    # Most accurate first; equal accuracy goes to the lower predicted p95, then to the lower id.
    qualified.sort(key=lambda item: (-item[2], item[1].p95_ms, item[0].variant_id))
    chosen: tuple[Variant, Prediction, float] | None = qualified[0] if qualified else None
    candidates: dict[str, Candidate] = dict(excluded)
    for rank, (variant, prediction, accuracy) in enumerate(qualified):
        if rank == 0:
            within = f"p95 {prediction.p95_ms:.2f} ms within {budget_ms:g} ms" if budget_ms else "no latency budget"
            reason = f"{CHOSEN}: most accurate runnable variant ({_describe_accuracy(accuracy)}, {within})"
            outranked = [
                other.variant_id
                for other, _, other_accuracy in qualified[1:]
                if 0 <= other_accuracy < accuracy and other_evaluation_data(other, variant)
            ]
            if outranked:
                reason += (
                    f"; note: it outranks {', '.join(outranked)} on drops measured on other evaluation data, "
                    "which compare only roughly"
                )
        else:
            assert chosen is not None
            best = chosen[2]
            if accuracy < best:
                reason = f"{LESS_ACCURATE}: {_describe_accuracy(accuracy)}, against {(1.0 - best) * 100.0:.2f}"
                if accuracy >= 0 and other_evaluation_data(variant, chosen[0]):
                    reason += _different_data_note(variant, chosen[0])
            else:
                reason = f"{SLOWER}: predicted p95 {prediction.p95_ms:.2f} ms >= {chosen[1].p95_ms:.2f} ms"
        if variant.variant_id in notes:
            reason += f" (note: {notes[variant.variant_id]})"
        candidates[variant.variant_id] = Candidate(
            variant=variant,
            predicted_p50_ms=prediction.p50_ms,
            predicted_p95_ms=prediction.p95_ms,
            predicted_memory_bytes=prediction.memory_bytes,
            threads=prediction.threads,
            chosen=rank == 0,
            reason=reason,
            basis=prediction.basis,
        )
    ordered = [candidates[v.variant_id] for v in variants]
    if chosen is None:
        return Selection(chosen=None, threads=0, candidates=ordered)
    return Selection(chosen=chosen[0], threads=chosen[1].threads, candidates=ordered)


def select_variant(
    device: Device,
    variants: Sequence[Variant],
    *,
    budget_ms: float | None,
    predictor: Predictor,
    reported: Iterable[ModelStatus] = (),
) -> Selection:
    """Choose the variant a device runs and the threads it runs it with.

    The rule: among variants that the gate accepted, whose file fits the free space of the device's
    model store or is stored there already (serving or loading in reported), in a format one of the
    device's runtimes executes at a runtime version that loads them (see runtime_compat), whose
    predicted memory fits the device's memory and whose predicted p95 meets budget_ms, take the most
    accurate; equal accuracy goes to the lower predicted p95. With budget_ms=None the most accurate
    runnable variant wins. Every variant appears in Selection.candidates with its prediction and the
    reason it was chosen or excluded. When no variant qualifies, Selection.chosen is None. Raises
    ValueError for a budget that is not positive.
    """
    stored = stored_digests(reported)
    return select_for_hardware(device.hardware, variants, budget_ms=budget_ms, predictor=predictor, stored=stored)


def select_for_fleet(
    devices: Iterable[Device],
    variants: Sequence[Variant],
    *,
    budget_ms: float | None,
    predictor: Predictor,
) -> dict[str, Selection]:
    """Run select_variant for many devices and return the selections by device id.

    Devices of one hardware class and the same runtime versions share a selection, so the predictor
    runs once per group and variant. The hardware class leaves runtime versions out, but they decide
    which variants load. Devices without a hardware class are grouped by the class derived from
    their profile.
    """
    by_class: dict[str, Selection] = {}
    result: dict[str, Selection] = {}
    for device in devices:
        versions = ",".join(sorted(f"{r.name}={r.package}:{r.version}" for r in device.hardware.runtimes))
        # Devices of one class differ in free disk space, which decides the variants whose files fit.
        fits = "".join("1" if fits_disk(v, device.hardware.disk_free_bytes) else "0" for v in variants)
        key = f"{device.hardware.hardware_class or hardware_class_of(device.hardware)}|{versions}|{fits}"
        selection = by_class.get(key)
        if selection is None:
            selection = select_for_hardware(device.hardware, variants, budget_ms=budget_ms, predictor=predictor)
            by_class[key] = selection
        result[device.device_id] = selection
    log.debug(
        "selected variants for %d devices in %d groups of hardware class and runtime versions",
        len(result),
        len(by_class),
    )
    return result
