"""The gates of one wave: latency figures from stored metric windows, per-device verdicts and the wave decision."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from edgefleet.common.sketch import LatencySketch
from edgefleet.orchestrator.domain import MetricWindow
from edgefleet.orchestrator.rollouts.domain import (
    VERDICT_ERROR_RATE,
    VERDICT_FAILED,
    VERDICT_OK,
    VERDICT_OVER_BUDGET,
    VERDICT_PENDING,
    VERDICT_REASSIGNED,
    VERDICT_REGRESSION,
    VERDICT_SKIPPED,
    Rollout,
    Wave,
    WaveDevice,
)
from edgefleet.orchestrator.store.base import NotFoundError, Store

log = logging.getLogger(__name__)

# How far back the previous version's windows on a hardware class count as its baseline p95.
BASELINE_LOOKBACK = timedelta(hours=1)
# Windows are aligned to the device's window length, so the first window of a wave may start up to
# one window before the wave. Windows that start this long before the wave are read and kept when
# they end after its start. 3600 s is the longest window the orchestrator accepts.
MAX_WINDOW = timedelta(seconds=3600)
# Verdicts that roll the wave back at once, without waiting for the other devices.
ROLLBACK_VERDICTS = frozenset({VERDICT_FAILED, VERDICT_OVER_BUDGET, VERDICT_ERROR_RATE})
# Verdicts of assigned devices that the wave no longer measures: removed from the fleet or reassigned.
UNGATED_VERDICTS = frozenset({VERDICT_SKIPPED, VERDICT_REASSIGNED})


@dataclass(frozen=True)
class Figures:
    samples: int
    errors: int
    p95_ms: float | None


def merge_windows(windows: Sequence[MetricWindow]) -> Figures:
    """Merge windows into sample and error counts and the p95 of their merged latency sketch."""
    sketch = LatencySketch()
    for window in windows:
        try:
            sketch.merge(LatencySketch.from_bytes(window.sketch))
        except ValueError as error:
            log.warning("skipping an unreadable latency window of device_id=%s: %s", window.device_id, error)
    samples = sum(w.inference_count for w in windows)
    errors = sum(w.error_count for w in windows)
    return Figures(samples=samples, errors=errors, p95_ms=sketch.quantile(0.95) if sketch.count else None)


class WaveGates:
    """Measures the devices of a wave against a rollout's gates from the store's reported state and windows."""

    def __init__(self, store: Store, now: Callable[[], datetime]) -> None:
        self._store = store
        self._now = now
        self._baselines: dict[tuple[str, str, str], Figures] = {}

    def device_figures(self, rollout: Rollout, wave: Wave, device: WaveDevice) -> Figures:
        """Return the figures of the wave's variant on one device since the wave started."""
        windows = self._store.query_metric_windows(
            device_id=device.device_id,
            variant_id=device.variant_id,
            start=wave.started_at - MAX_WINDOW,
        )
        recent = [
            w
            for w in windows
            if w.model_name == rollout.spec.model_name
            and w.window_start + timedelta(seconds=w.window_seconds) > wave.started_at
        ]
        return merge_windows(recent)

    def baseline(self, rollout: Rollout, hardware_class: str, version: str, before: datetime) -> Figures:
        """Return the figures of another version of the model on a hardware class in the lookback before before."""
        key = (hardware_class, version, before.isoformat())
        cached = self._baselines.get(key)
        if cached is not None:
            return cached
        windows = self._store.query_metric_windows(
            model_name=rollout.spec.model_name,
            hardware_class=hardware_class,
            start=before - BASELINE_LOOKBACK,
            end=before,
        )
        figures = merge_windows([w for w in windows if w.model_version == version])
        self._baselines[key] = figures
        return figures

    def judge(self, rollout: Rollout, wave: Wave, device: WaveDevice) -> WaveDevice:
        """Return the device with its reported state, figures and verdict brought up to date."""
        if not device.variant_id or device.late:
            return device
        spec = rollout.spec
        reported = [
            s
            for s in self._store.get_reported_state(device.device_id)
            if s.model_name == spec.model_name and s.variant_id == device.variant_id
        ]
        state = reported[0].state if reported else ""
        if state == "failed":
            return replace(
                device, state=state, verdict=VERDICT_FAILED, note=f"failed on the device: {reported[0].error}"
            )
        figures = self.device_figures(rollout, wave, device)
        judged = replace(device, state=state, samples=figures.samples, errors=figures.errors, p95_ms=figures.p95_ms)
        # Rejected inputs count as samples and errors without a latency, so a variant that rejects every
        # call has samples but no p95; the error-rate gate below judges it rather than waiting forever.
        if figures.samples < spec.min_samples:
            if self._store.get_device(device.device_id) is None:
                # An operator removed the device with --force; waiting for its samples would stall the wave.
                return replace(
                    judged,
                    verdict=VERDICT_SKIPPED,
                    note=f"removed from the fleet with {figures.samples} of {spec.min_samples} samples",
                )
            reassigned_to = self._reassigned_to(rollout, device)
            if reassigned_to is not None:
                # An operator deployed another assignment; the wave variant may never report enough samples.
                return replace(
                    judged,
                    verdict=VERDICT_REASSIGNED,
                    note=f"reassigned outside this rollout (now {reassigned_to}) with {figures.samples} of "
                    f"{spec.min_samples} samples; no longer gated",
                )
            return replace(judged, verdict=VERDICT_PENDING, note=f"{figures.samples} of {spec.min_samples} samples")

        # The baseline is looked up before the gates so that the figures show it whatever the verdict.
        previous = device.previous
        baseline = None
        if previous is not None and previous.model_version != spec.model_version:
            baseline = self.baseline(rollout, device.hardware_class, previous.model_version, wave.started_at)
            if baseline.samples >= spec.min_samples and baseline.p95_ms is not None:
                judged = replace(judged, baseline_p95_ms=baseline.p95_ms)

        error_pct = 100.0 * figures.errors / figures.samples
        if error_pct > spec.max_error_rate_pct:
            return replace(
                judged,
                verdict=VERDICT_ERROR_RATE,
                note=f"error rate {error_pct:.2f}% over the limit of {spec.max_error_rate_pct:g}%",
            )
        if figures.p95_ms is None:
            return replace(
                judged, verdict=VERDICT_PENDING, note=f"{figures.samples} samples, none of which ran the model"
            )
        if figures.p95_ms > spec.budget_ms:
            return replace(
                judged,
                verdict=VERDICT_OVER_BUDGET,
                note=f"p95 {figures.p95_ms:.2f} ms over the budget of {spec.budget_ms:g} ms",
            )
        if previous is None or baseline is None:
            return replace(judged, verdict=VERDICT_OK, note="within the budget; no previous version to compare")
        if judged.baseline_p95_ms is None:
            return replace(
                judged,
                verdict=VERDICT_OK,
                note=f"within the budget; version {previous.model_version} has {baseline.samples} samples on "
                "this hardware class, too few to compare",
            )
        base_p95 = judged.baseline_p95_ms
        regression_pct = 100.0 * (figures.p95_ms / base_p95 - 1.0) if base_p95 > 0 else 0.0
        if regression_pct > spec.max_p95_regression_pct:
            return replace(
                judged,
                verdict=VERDICT_REGRESSION,
                note=f"p95 {figures.p95_ms:.2f} ms is {regression_pct:.1f}% over version "
                f"{previous.model_version} ({base_p95:.2f} ms); the limit is {spec.max_p95_regression_pct:g}%",
            )
        return replace(
            judged,
            verdict=VERDICT_OK,
            note=f"within the budget, {regression_pct:+.1f}% against version {previous.model_version}",
        )

    def _reassigned_to(self, rollout: Rollout, device: WaveDevice) -> str | None:
        """Return what the device's assignment of the model is now, if it is no longer the one the wave made."""
        if not device.assigned_generation:
            return None
        try:
            _, assignments = self._store.get_desired_state(device.device_id)
        except NotFoundError:
            return None  # Removed just now; the next judgement skips it as removed.
        current = next((a for a in assignments if a.model_name == rollout.spec.model_name), None)
        if current is None:
            return "no assignment of the model"
        if current.rollout_id == rollout.rollout_id and current.variant_id == device.variant_id:
            return None
        return current.variant_id

    def evaluate(self, rollout: Rollout, wave: Wave) -> Wave:
        """Judge every device of a waiting wave and return the wave with its decision and reason.

        The wave rolls back as soon as one device failed, broke the budget or the error-rate limit.
        Once every assigned device has min_samples, the wave pauses when a device regressed against
        the previous version more than allowed, and proceeds otherwise. It also pauses when it measured
        no device because every device it assigned was reassigned (or removed) before its samples came.
        """
        devices = tuple(self.judge(rollout, wave, device) for device in wave.devices)
        measured = [d for d in devices if d.variant_id and not d.late and d.verdict not in UNGATED_VERDICTS]
        removed = sum(1 for d in devices if d.variant_id and not d.late and d.verdict == VERDICT_SKIPPED)
        reassigned = sum(1 for d in devices if d.variant_id and not d.late and d.verdict == VERDICT_REASSIGNED)
        bad = [d for d in measured if d.verdict in ROLLBACK_VERDICTS]
        if bad:
            reason = "; ".join(f"{d.device_id} ({d.variant_id}): {d.note}" for d in bad)
            return replace(wave, devices=devices, decision="rollback", reason=reason, decided_at=self._now())
        waiting = [d for d in measured if d.verdict == VERDICT_PENDING]
        if waiting:
            reason = waiting_reason(rollout.spec.min_samples, waiting)
            return replace(wave, devices=devices, decision="waiting", reason=reason)
        regressed = [d for d in measured if d.verdict == VERDICT_REGRESSION]
        if regressed:
            reason = "; ".join(f"{d.device_id} ({d.variant_id}): {d.note}" for d in regressed)
            return replace(wave, devices=devices, decision="pause", reason=reason, decided_at=self._now())
        if not measured and reassigned:
            # An operator moved every device that stayed in the fleet before its samples came: the gates
            # saw nothing, so the operator decides whether the next wave may go out on no evidence. A wave
            # whose devices were all removed goes on, and a rollout that no device runs ends aborted.
            left = [f"{count_devices(reassigned)} reassigned outside this rollout"]
            if removed:
                left.append(f"{count_devices(removed)} removed from the fleet")
            reason = (
                f"no device of this wave was measured: {' and '.join(left)} before reporting enough samples; "
                "resume to go on without measurements, or roll back or abort"
            )
            return replace(wave, devices=devices, decision="pause", reason=reason, decided_at=self._now())
        skipped = sum(1 for d in devices if d.verdict == VERDICT_SKIPPED and not d.variant_id)
        reason = f"{count_devices(len(measured))} within the gates"
        if skipped:
            reason += f"; {count_devices(skipped)} skipped because no variant qualified"
        if removed:
            reason += f"; {count_devices(removed)} removed from the fleet before reporting enough samples"
        if reassigned:
            reason += f"; {count_devices(reassigned)} reassigned outside this rollout before reporting enough samples"
        return replace(wave, devices=devices, decision="proceed", reason=reason, decided_at=self._now())


def waiting_reason(min_samples: int, waiting: Sequence[WaveDevice]) -> str:
    """Return the reason of a wave whose waiting devices still have fewer than min_samples samples."""
    have = ", ".join(f"{d.device_id} {d.samples}" for d in waiting)
    return f"waiting for {min_samples} samples per device ({have})"


def count_devices(count: int) -> str:
    """Return '1 device' or 'N devices'."""
    return "1 device" if count == 1 else f"{count} devices"
