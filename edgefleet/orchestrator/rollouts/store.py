"""Durable rollout state: the RolloutStore interface and its SQL implementation on the store's engine."""

from __future__ import annotations

import abc
import logging
from collections.abc import Collection
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from edgefleet.orchestrator.domain import Assignment
from edgefleet.orchestrator.rollouts.domain import (
    LEFT_AS_IS_NOTE,
    ROLLOUT_STATES,
    SUPERSEDABLE_STATES,
    WAVE_DECISIONS,
    PreviousAssignment,
    Rollout,
    RolloutSpec,
    Target,
    Wave,
    WaveDevice,
)
from edgefleet.orchestrator.store import queries, rows
from edgefleet.orchestrator.store.base import AlreadyExistsError, NotFoundError, StoreError
from edgefleet.orchestrator.store.engine import SqlTransactions
from edgefleet.orchestrator.store.tables import assignments, devices
from edgefleet.orchestrator.store.tables_rollouts import (
    rollout_engine_lease,
    rollout_wave_devices,
    rollout_waves,
    rollouts,
)

logger = logging.getLogger(__name__)


class RevisionConflictError(StoreError):
    """A rollout changed since it was read; read it again and redo the change."""


@dataclass(frozen=True)
class WaveKey:
    rollout_id: str
    index: int
    attempt: int


class RolloutStore(abc.ABC):
    """Durable rollouts, waves and wave devices. Methods are thread-safe; each one is one transaction."""

    @abc.abstractmethod
    def create_rollout(self, rollout: Rollout) -> None:
        """Insert a rollout; raise AlreadyExistsError for a known rollout id.

        Older rollouts of the model stay as they are, because the new one supersedes them only when it
        assigns its first device (see assign).
        """

    @abc.abstractmethod
    def get_rollout(self, rollout_id: str) -> Rollout:
        """Return a rollout; raise NotFoundError."""

    @abc.abstractmethod
    def list_rollouts(self, *, model_name: str = "", states: Collection[str] = ()) -> list[Rollout]:
        """Return rollouts, newest first, of one model (all when "") in the given states (all when empty)."""

    @abc.abstractmethod
    def save_rollout(self, rollout: Rollout, now: datetime) -> Rollout:
        """Write a changed rollout read at rollout.revision; return it with the next revision.

        Raises RevisionConflictError when the stored revision moved on, and NotFoundError.
        """

    @abc.abstractmethod
    def start_wave(self, rollout: Rollout, wave: Wave, now: datetime) -> Rollout:
        """Save the rollout as save_rollout does and insert the wave with its devices, in one transaction."""

    @abc.abstractmethod
    def list_waves(self, rollout_id: str) -> list[Wave]:
        """Return the waves of a rollout by index, then attempt, each with its devices by device id."""

    @abc.abstractmethod
    def save_wave(self, wave: Wave) -> None:
        """Write the decision, reason and decision time of a wave and the figures and verdicts of its devices.

        Assignment fields (variant, previous assignment, generations) are not changed. Raises
        NotFoundError for an unknown wave.
        """

    @abc.abstractmethod
    def add_wave_device(self, key: WaveKey, device: WaveDevice) -> None:
        """Add a device to an existing wave; raise AlreadyExistsError when it is there already."""

    @abc.abstractmethod
    def assign(self, key: WaveKey, assignment: Assignment, now: datetime) -> int:
        """Record the device's current assignment as the previous one and replace it, in one transaction.

        Returns the new desired generation. A wave device that is already assigned is left as it is
        and its generation returned, so the call is safe to repeat after a crash. The same transaction
        supersedes the rollouts of the model that are in SUPERSEDABLE_STATES and were created before
        this one, so a rollout that never assigns a device supersedes nothing. Raises NotFoundError
        for an unknown wave device, device or variant.
        """

    @abc.abstractmethod
    def restore(self, key: WaveKey, device_id: str, model_name: str) -> tuple[int, bool]:
        """Give a device of a wave back its previous assignment, in one transaction.

        Only a device whose assignment is still the one this wave made is changed. One that was
        reassigned or removed since keeps its assignment, and its note then starts with
        LEFT_AS_IS_NOTE. Returns the desired generation the device has after the call and whether
        the call changed it. Repeating the call changes nothing. Raises NotFoundError for an unknown
        wave device.
        """

    @abc.abstractmethod
    def acquire_lease(self, name: str, holder: str, ttl_s: float, now: datetime) -> bool:
        """Take or renew the named lease for ttl_s seconds; return False when another holder has it."""

    @abc.abstractmethod
    def release_lease(self, name: str, holder: str) -> None:
        """Give up the named lease if holder has it."""


class SqlRolloutStore(SqlTransactions, RolloutStore):
    """A RolloutStore on the engine of a SqlStore whose schema is at head (SqlStore.engine)."""

    # Rollouts

    def create_rollout(self, rollout: Rollout) -> None:
        _check_rollout(rollout)
        with self._write() as connection:
            if not queries.insert_unless_exists(connection, rollouts, _rollout_values(rollout)):
                raise AlreadyExistsError(f"rollout {rollout.rollout_id!r} already exists; choose another id")

    def get_rollout(self, rollout_id: str) -> Rollout:
        with self._read() as connection:
            return _load_rollout(connection, rollout_id)

    def list_rollouts(self, *, model_name: str = "", states: Collection[str] = ()) -> list[Rollout]:
        query = sa.select(rollouts).order_by(rollouts.c.created_at.desc(), rollouts.c.rollout_id.desc())
        if model_name:
            query = query.where(rollouts.c.model_name == model_name)
        if states:
            query = query.where(rollouts.c.state.in_(sorted(states)))
        with self._read() as connection:
            return [_rollout_from_row(row) for row in connection.execute(query)]

    def save_rollout(self, rollout: Rollout, now: datetime) -> Rollout:
        _check_rollout(rollout)
        rows.require_aware("now", now)
        with self._write() as connection:
            return _update_rollout(connection, rollout, now)

    def start_wave(self, rollout: Rollout, wave: Wave, now: datetime) -> Rollout:
        _check_rollout(rollout)
        _check_wave(wave)
        if wave.rollout_id != rollout.rollout_id:
            raise StoreError(f"wave of rollout {wave.rollout_id!r} started on rollout {rollout.rollout_id!r}")
        with self._write() as connection:
            saved = _update_rollout(connection, rollout, now)
            inserted = queries.insert_unless_exists(connection, rollout_waves, _wave_values(wave))
            if not inserted:
                raise AlreadyExistsError(
                    f"wave {wave.index} attempt {wave.attempt} of rollout {wave.rollout_id} already exists"
                )
            if wave.devices:
                key = WaveKey(wave.rollout_id, wave.index, wave.attempt)
                connection.execute(sa.insert(rollout_wave_devices), [_device_values(key, d) for d in wave.devices])
        return saved

    # Waves

    def list_waves(self, rollout_id: str) -> list[Wave]:
        with self._read() as connection:
            wave_rows = connection.execute(
                sa.select(rollout_waves)
                .where(rollout_waves.c.rollout_id == rollout_id)
                .order_by(rollout_waves.c.wave_index, rollout_waves.c.attempt)
            ).all()
            device_rows = connection.execute(
                sa.select(rollout_wave_devices)
                .where(rollout_wave_devices.c.rollout_id == rollout_id)
                .order_by(rollout_wave_devices.c.device_id)
            ).all()
        devices: dict[tuple[int, int], list[WaveDevice]] = {}
        for row in device_rows:
            devices.setdefault((row.wave_index, row.attempt), []).append(_device_from_row(row))
        return [
            Wave(
                rollout_id=row.rollout_id,
                index=row.wave_index,
                attempt=row.attempt,
                percent=row.percent,
                decision=row.decision,
                reason=row.reason,
                started_at=row.started_at,
                decided_at=row.decided_at,
                devices=tuple(devices.get((row.wave_index, row.attempt), ())),
            )
            for row in wave_rows
        ]

    def save_wave(self, wave: Wave) -> None:
        _check_wave(wave)
        key = WaveKey(wave.rollout_id, wave.index, wave.attempt)
        with self._write() as connection:
            result = connection.execute(
                sa.update(rollout_waves)
                .where(*_wave_filter(key))
                .values(decision=wave.decision, reason=wave.reason, decided_at=wave.decided_at)
            )
            if result.rowcount == 0:
                raise NotFoundError(f"wave {wave.index} attempt {wave.attempt} of rollout {wave.rollout_id} not found")
            for device in wave.devices:
                connection.execute(
                    sa.update(rollout_wave_devices)
                    .where(*_device_filter(key, device.device_id))
                    .values(
                        state=device.state,
                        samples=device.samples,
                        errors=device.errors,
                        p95_ms=device.p95_ms,
                        baseline_p95_ms=device.baseline_p95_ms,
                        verdict=device.verdict,
                        note=device.note,
                    )
                )

    def add_wave_device(self, key: WaveKey, device: WaveDevice) -> None:
        with self._write() as connection:
            known = connection.execute(sa.select(rollout_waves.c.percent).where(*_wave_filter(key))).first()
            if known is None:
                raise NotFoundError(f"wave {key.index} attempt {key.attempt} of rollout {key.rollout_id} not found")
            if not queries.insert_unless_exists(connection, rollout_wave_devices, _device_values(key, device)):
                raise AlreadyExistsError(
                    f"device {device.device_id} is already in wave {key.index} of rollout {key.rollout_id}"
                )

    # Assignments

    def assign(self, key: WaveKey, assignment: Assignment, now: datetime) -> int:
        rows.require_aware("now", now)
        if assignment.rollout_id != key.rollout_id:
            raise StoreError(
                f"assignment names rollout {assignment.rollout_id!r} but the wave belongs to {key.rollout_id!r}"
            )
        with self._write() as connection:
            # The device row is locked first, as in every write of the core store, so that this
            # transaction and a concurrent set_assignment lock rows in the same order.
            _lock_device(connection, assignment.device_id)
            device = _load_wave_device(connection, key, assignment.device_id, for_update=True)
            if device.assigned_generation:
                # Assigned already, before a crash or by the engine of another process.
                return device.assigned_generation
            generation = queries.bump_generation(connection, assignment.device_id)
            variant = queries.load_variant(connection, assignment.variant_id)
            if (variant.model_name, variant.model_version, variant.digest) != (
                assignment.model_name,
                assignment.model_version,
                assignment.digest,
            ):
                raise StoreError(
                    f"assignment of variant {variant.variant_id!r} does not match the variant's model, "
                    "version and digest; copy them from the variant"
                )
            current = _load_assignment(connection, assignment.device_id, assignment.model_name)
            previous = {
                "prev_variant_id": current.variant_id if current else "",
                "prev_model_version": current.model_version if current else "",
                "prev_threads": current.threads if current else 0,
                "prev_rollout_id": current.rollout_id if current else "",
            }
            queries.delete_assignment(connection, assignment.device_id, assignment.model_name)
            connection.execute(sa.insert(assignments).values(rows.assignment_values(assignment)))
            connection.execute(
                sa.update(rollout_wave_devices)
                .where(*_device_filter(key, assignment.device_id))
                .values(
                    variant_id=assignment.variant_id,
                    threads=assignment.threads,
                    assigned_generation=generation,
                    **previous,
                )
            )
            superseded = _supersede_older(connection, _load_rollout(connection, key.rollout_id), now)
        for old in superseded:
            logger.info(
                "rollout_id=%s superseded by rollout_id=%s, which assigned device_id=%s",
                old.rollout_id,
                key.rollout_id,
                assignment.device_id,
            )
        return generation

    def restore(self, key: WaveKey, device_id: str, model_name: str) -> tuple[int, bool]:
        with self._write() as connection:
            desired = _lock_device(connection, device_id, required=False)
            device = _load_wave_device(connection, key, device_id, for_update=True)
            if device.restored_generation:
                return device.restored_generation, False
            current = _load_assignment(connection, device_id, model_name)
            ours = (
                current is not None
                and device.assigned_generation > 0
                and current.rollout_id == key.rollout_id
                and current.variant_id == device.variant_id
            )
            if desired is None or not ours:
                # The device is gone or was reassigned since; its current assignment stays.
                generation = int(desired or device.assigned_generation or 1)
                why = "removed from the fleet" if desired is None else "reassigned outside this rollout"
                if device.note.startswith(why):
                    # The gates' note already states this, with the assignment the device has now.
                    note = f"{LEFT_AS_IS_NOTE}: {device.note}"
                else:
                    note = f"{LEFT_AS_IS_NOTE}: {why}" + (f"; {device.note}" if device.note else "")
                connection.execute(
                    sa.update(rollout_wave_devices)
                    .where(*_device_filter(key, device_id))
                    .values(restored_generation=generation, note=note)
                )
                return generation, False
            generation = queries.bump_generation(connection, device_id)
            queries.delete_assignment(connection, device_id, model_name)
            if device.previous is not None:
                previous = queries.load_variant(connection, device.previous.variant_id)
                restored = Assignment(
                    device_id=device_id,
                    model_name=model_name,
                    model_version=previous.model_version,
                    variant_id=previous.variant_id,
                    digest=previous.digest,
                    size_bytes=previous.size_bytes,
                    format=previous.format,
                    threads=device.previous.threads,
                    rollout_id=device.previous.rollout_id,
                )
                connection.execute(sa.insert(assignments).values(rows.assignment_values(restored)))
            connection.execute(
                sa.update(rollout_wave_devices)
                .where(*_device_filter(key, device_id))
                .values(restored_generation=generation)
            )
        return generation, True

    # Lease

    def acquire_lease(self, name: str, holder: str, ttl_s: float, now: datetime) -> bool:
        rows.require_aware("now", now)
        expires_at = now + timedelta(seconds=ttl_s)
        with self._write() as connection:
            values = {"name": name, "holder": holder, "expires_at": expires_at}
            if queries.insert_unless_exists(connection, rollout_engine_lease, values):
                return True
            current = connection.execute(
                sa.select(rollout_engine_lease).where(rollout_engine_lease.c.name == name).with_for_update()
            ).one()
            if current.holder != holder and current.expires_at > now:
                return False
            connection.execute(
                sa.update(rollout_engine_lease)
                .where(rollout_engine_lease.c.name == name)
                .values(holder=holder, expires_at=expires_at)
            )
        if current.holder != holder:
            logger.info("rollout engine lease %s taken over by %s from %s", name, holder, current.holder)
        return True

    def release_lease(self, name: str, holder: str) -> None:
        with self._write() as connection:
            connection.execute(
                sa.delete(rollout_engine_lease).where(
                    rollout_engine_lease.c.name == name, rollout_engine_lease.c.holder == holder
                )
            )


# Rows


def _check_rollout(rollout: Rollout) -> None:
    if rollout.state not in ROLLOUT_STATES:
        raise StoreError(f"invalid rollout state {rollout.state!r}; expected one of {ROLLOUT_STATES}")
    rows.require_aware("created_at", rollout.created_at)


def _check_wave(wave: Wave) -> None:
    if wave.decision not in WAVE_DECISIONS:
        raise StoreError(f"invalid wave decision {wave.decision!r}; expected one of {WAVE_DECISIONS}")
    rows.require_aware("started_at", wave.started_at)


def _rollout_values(rollout: Rollout) -> dict[str, Any]:
    spec = rollout.spec
    return {
        "rollout_id": rollout.rollout_id,
        "model_name": spec.model_name,
        "model_version": spec.model_version,
        "target_labels": dict(spec.target.labels),
        "target_hardware_class": spec.target.hardware_class,
        "wave_percents": list(spec.wave_percents),
        "budget_ms": spec.budget_ms,
        "max_p95_regression_pct": spec.max_p95_regression_pct,
        "max_error_rate_pct": spec.max_error_rate_pct,
        "min_samples": spec.min_samples,
        "max_rollbacks": spec.max_rollbacks,
        "sample_timeout_s": spec.sample_timeout_s,
        "state": rollout.state,
        "reason": rollout.reason,
        "stuck": rollout.stuck,
        "current_wave": rollout.current_wave,
        "rollbacks": rollout.rollbacks,
        "plan": list(rollout.plan),
        "superseded_by": rollout.superseded_by,
        "revision": rollout.revision,
        "created_at": rollout.created_at,
        "updated_at": rollout.updated_at,
        "started_at": rollout.started_at,
    }


def _rollout_from_row(row: Row[Any]) -> Rollout:
    spec = RolloutSpec(
        model_name=row.model_name,
        model_version=row.model_version,
        target=Target(labels=dict(row.target_labels), hardware_class=row.target_hardware_class),
        wave_percents=tuple(int(p) for p in row.wave_percents),
        budget_ms=row.budget_ms,
        max_p95_regression_pct=row.max_p95_regression_pct,
        max_error_rate_pct=row.max_error_rate_pct,
        min_samples=row.min_samples,
        max_rollbacks=row.max_rollbacks,
        sample_timeout_s=row.sample_timeout_s,
    )
    return Rollout(
        rollout_id=row.rollout_id,
        spec=spec,
        state=row.state,
        reason=row.reason,
        created_at=row.created_at,
        updated_at=row.updated_at,
        started_at=row.started_at,
        current_wave=row.current_wave,
        rollbacks=row.rollbacks,
        stuck=row.stuck,
        plan=tuple(row.plan),
        superseded_by=row.superseded_by,
        revision=row.revision,
    )


def _load_rollout(connection: Connection, rollout_id: str) -> Rollout:
    row = connection.execute(sa.select(rollouts).where(rollouts.c.rollout_id == rollout_id)).first()
    if row is None:
        raise NotFoundError(f"rollout {rollout_id!r} not found; list rollouts with `edgefleet rollout list`")
    return _rollout_from_row(row)


def _update_rollout(connection: Connection, rollout: Rollout, now: datetime) -> Rollout:
    """Write rollout over the stored row at rollout.revision and return it at the next revision."""
    saved = replace(rollout, revision=rollout.revision + 1, updated_at=now)
    values = _rollout_values(saved)
    for fixed in ("rollout_id", "model_name", "model_version", "created_at"):
        del values[fixed]
    result = connection.execute(
        sa.update(rollouts)
        .where(rollouts.c.rollout_id == rollout.rollout_id, rollouts.c.revision == rollout.revision)
        .values(values)
    )
    if result.rowcount == 0:
        stored = _load_rollout(connection, rollout.rollout_id)
        raise RevisionConflictError(
            f"rollout {rollout.rollout_id} changed since it was read (revision {rollout.revision}, "
            f"now {stored.revision}, state {stored.state}); read it again"
        )
    return saved


def _supersede_older(connection: Connection, rollout: Rollout, now: datetime) -> list[Rollout]:
    """Mark the rollouts of rollout's model created before it and in SUPERSEDABLE_STATES superseded; return them."""
    older = [
        _rollout_from_row(row)
        for row in connection.execute(
            sa.select(rollouts)
            .where(rollouts.c.model_name == rollout.spec.model_name)
            .where(rollouts.c.rollout_id != rollout.rollout_id)
            .where(rollouts.c.created_at <= rollout.created_at)
            .where(rollouts.c.state.in_(sorted(SUPERSEDABLE_STATES)))
            .order_by(rollouts.c.created_at)
            .with_for_update()
        )
    ]
    reason = (
        f"superseded by rollout {rollout.rollout_id} of {rollout.spec.model_name}:{rollout.spec.model_version}, "
        "which assigned its first device"
    )
    changed = [replace(old, state="superseded", reason=reason, superseded_by=rollout.rollout_id) for old in older]
    return [_update_rollout(connection, old, now) for old in changed]


def _wave_values(wave: Wave) -> dict[str, Any]:
    return {
        "rollout_id": wave.rollout_id,
        "wave_index": wave.index,
        "attempt": wave.attempt,
        "percent": wave.percent,
        "decision": wave.decision,
        "reason": wave.reason,
        "started_at": wave.started_at,
        "decided_at": wave.decided_at,
    }


def _wave_filter(key: WaveKey) -> tuple[sa.ColumnElement[bool], ...]:
    return (
        rollout_waves.c.rollout_id == key.rollout_id,
        rollout_waves.c.wave_index == key.index,
        rollout_waves.c.attempt == key.attempt,
    )


def _device_filter(key: WaveKey, device_id: str) -> tuple[sa.ColumnElement[bool], ...]:
    return (
        rollout_wave_devices.c.rollout_id == key.rollout_id,
        rollout_wave_devices.c.wave_index == key.index,
        rollout_wave_devices.c.attempt == key.attempt,
        rollout_wave_devices.c.device_id == device_id,
    )


def _device_values(key: WaveKey, device: WaveDevice) -> dict[str, Any]:
    previous = device.previous
    return {
        "rollout_id": key.rollout_id,
        "wave_index": key.index,
        "attempt": key.attempt,
        "device_id": device.device_id,
        "hardware_class": device.hardware_class,
        "variant_id": device.variant_id,
        "threads": device.threads,
        "prev_variant_id": previous.variant_id if previous else "",
        "prev_model_version": previous.model_version if previous else "",
        "prev_threads": previous.threads if previous else 0,
        "prev_rollout_id": previous.rollout_id if previous else "",
        "assigned_generation": device.assigned_generation,
        "restored_generation": device.restored_generation,
        "state": device.state,
        "samples": device.samples,
        "errors": device.errors,
        "p95_ms": device.p95_ms,
        "baseline_p95_ms": device.baseline_p95_ms,
        "verdict": device.verdict,
        "note": device.note,
        "late": device.late,
    }


def _device_from_row(row: Row[Any]) -> WaveDevice:
    previous = None
    if row.prev_variant_id:
        previous = PreviousAssignment(
            variant_id=row.prev_variant_id,
            model_version=row.prev_model_version,
            threads=row.prev_threads,
            rollout_id=row.prev_rollout_id,
        )
    return WaveDevice(
        device_id=row.device_id,
        hardware_class=row.hardware_class,
        variant_id=row.variant_id,
        threads=row.threads,
        previous=previous,
        assigned_generation=row.assigned_generation,
        restored_generation=row.restored_generation,
        state=row.state,
        samples=row.samples,
        errors=row.errors,
        p95_ms=row.p95_ms,
        baseline_p95_ms=row.baseline_p95_ms,
        verdict=row.verdict,
        note=row.note,
        late=row.late,
    )


def _load_wave_device(connection: Connection, key: WaveKey, device_id: str, *, for_update: bool) -> WaveDevice:
    query = sa.select(rollout_wave_devices).where(*_device_filter(key, device_id))
    row = connection.execute(query.with_for_update() if for_update else query).first()
    if row is None:
        raise NotFoundError(
            f"device {device_id} is not in wave {key.index} attempt {key.attempt} of rollout {key.rollout_id}"
        )
    return _device_from_row(row)


def _lock_device(connection: Connection, device_id: str, *, required: bool = True) -> int | None:
    """Lock a device row and return its desired generation; None (or NotFoundError if required) when unknown."""
    generation = connection.execute(
        sa.select(devices.c.desired_generation).where(devices.c.device_id == device_id).with_for_update()
    ).scalar()
    if generation is None and required:
        raise NotFoundError(f"device {device_id!r} is not registered")
    return None if generation is None else int(generation)


def _load_assignment(connection: Connection, device_id: str, model_name: str) -> Assignment | None:
    row = connection.execute(
        sa.select(assignments).where(assignments.c.device_id == device_id, assignments.c.model_name == model_name)
    ).first()
    return None if row is None else rows.assignment_from_row(row)
