"""Drift between a device's desired and reported state, and re-pushing the desired state to devices that lag."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from edgefleet.orchestrator.domain import Assignment, Device, ModelStatus
from edgefleet.orchestrator.store.base import Store

log = logging.getLogger(__name__)

# Kinds of drift.
GENERATION_LAG = "generation_lag"  # The device last reported on an older desired generation.
MISSING = "missing"  # A desired model is not in the device's report.
OTHER_VARIANT = "other_variant"  # The device reports another variant or digest than desired.
NOT_SERVING = "not_serving"  # The desired variant is reported but not serving (failed, or still loading).
UNEXPECTED = "unexpected"  # The device reports a model that is not in its desired state.

# A device's report may lag a push while it downloads and loads; re-push only after this long.
LAG_GRACE = timedelta(seconds=30)
# Minimum time between two re-pushes to the same device.
REPUSH_INTERVAL = timedelta(seconds=60)


@dataclass(frozen=True)
class Drift:
    """One difference between what a device should run and what it reports."""

    kind: str
    model_name: str = ""
    desired_variant_id: str = ""
    reported_variant_id: str = ""
    detail: str = ""


def device_drift(device: Device, desired: Sequence[Assignment], reported: Sequence[ModelStatus]) -> list[Drift]:
    """Compare a device's desired assignments with its reported models and return every difference."""
    drift: list[Drift] = []
    if device.reported_generation < device.desired_generation:
        drift.append(
            Drift(
                kind=GENERATION_LAG,
                detail=f"reported generation {device.reported_generation} is behind desired generation "
                f"{device.desired_generation}",
            )
        )
    by_model: dict[str, list[ModelStatus]] = {}
    for status in reported:
        by_model.setdefault(status.model_name, []).append(status)
    for assignment in desired:
        statuses = by_model.pop(assignment.model_name, [])
        if not statuses:
            drift.append(
                Drift(
                    kind=MISSING,
                    model_name=assignment.model_name,
                    desired_variant_id=assignment.variant_id,
                    detail="the device does not report this model",
                )
            )
            continue
        matching = [s for s in statuses if s.variant_id == assignment.variant_id and s.digest == assignment.digest]
        if not matching:
            other = statuses[-1]
            drift.append(
                Drift(
                    kind=OTHER_VARIANT,
                    model_name=assignment.model_name,
                    desired_variant_id=assignment.variant_id,
                    reported_variant_id=other.variant_id,
                    detail=f"the device reports {other.variant_id} ({other.state})",
                )
            )
        elif all(s.state != "serving" for s in matching):
            status = matching[-1]
            detail = f"{status.state}: {status.error}" if status.error else status.state
            drift.append(
                Drift(
                    kind=NOT_SERVING,
                    model_name=assignment.model_name,
                    desired_variant_id=assignment.variant_id,
                    reported_variant_id=status.variant_id,
                    detail=detail,
                )
            )
    for model_name, statuses in sorted(by_model.items()):
        live = [s for s in statuses if s.state != "removed"]
        if live:
            drift.append(
                Drift(
                    kind=UNEXPECTED,
                    model_name=model_name,
                    reported_variant_id=live[-1].variant_id,
                    detail=f"the device reports {live[-1].variant_id} ({live[-1].state}) but should not run it",
                )
            )
    return drift


def store_drift(store: Store, device: Device) -> list[Drift]:
    """Return the drift of a stored device."""
    _, desired = store.get_desired_state(device.device_id)
    return device_drift(device, desired, store.get_reported_state(device.device_id))


class Reconciler:
    """Re-pushes the desired state to connected devices whose reported generation lags for too long.

    The lag timer lives in memory: after a restart every device gets the full grace period again.
    """

    def __init__(
        self,
        store: Store,
        push: Callable[[str], bool],
        *,
        lag_grace: timedelta = LAG_GRACE,
        repush_interval: timedelta = REPUSH_INTERVAL,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.push = push
        self.lag_grace = lag_grace
        self.repush_interval = repush_interval
        self.clock = clock
        # device id -> (desired generation first seen lagging, when it was first seen lagging)
        self._lagging: dict[str, tuple[int, datetime]] = {}
        self._pushed_at: dict[str, datetime] = {}

    def tick(self, connected: Collection[str]) -> list[str]:
        """Re-push the desired state to connected devices that lag longer than the grace period.

        connected contains the ids of devices with a control stream open in this process. Returns the
        ids of the devices pushed to.
        """
        now = self.clock()
        pushed: list[str] = []
        for device_id in sorted(connected):
            device = self.store.get_device(device_id)
            if device is None or device.reported_generation >= device.desired_generation:
                self._lagging.pop(device_id, None)
                continue
            generation, since = self._lagging.setdefault(device_id, (device.desired_generation, now))
            if generation != device.desired_generation:
                # A newer desired state was written since; give the device a fresh grace period.
                self._lagging[device_id] = (device.desired_generation, now)
                continue
            last_push = self._pushed_at.get(device_id)
            if now - since < self.lag_grace or (last_push is not None and now - last_push < self.repush_interval):
                continue
            if self.push(device_id):
                self._pushed_at[device_id] = now
                pushed.append(device_id)
                log.warning(
                    "device_id=%s reports generation %d, behind desired generation %d for %.0f s; "
                    "pushed its desired state again",
                    device_id,
                    device.reported_generation,
                    device.desired_generation,
                    (now - since).total_seconds(),
                )
        for device_id in set(self._lagging) - set(connected):
            del self._lagging[device_id]
        return pushed
