"""The Store implementation on SQLAlchemy Core, shared by the SQLite and PostgreSQL backends."""

from __future__ import annotations

import logging
from collections.abc import Collection, Generator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from edgefleet.common.hardware import HardwareProfile
from edgefleet.orchestrator.domain import (
    MODEL_STATES,
    Assignment,
    Device,
    IdentityConflict,
    MetricWindow,
    ModelStatus,
    ModelVersion,
    Variant,
)
from edgefleet.orchestrator.jobs.store import QUEUED, RUNNING
from edgefleet.orchestrator.rollouts.domain import ACTIVE_STATES
from edgefleet.orchestrator.store import queries, rows
from edgefleet.orchestrator.store.base import (
    AlreadyExistsError,
    DeleteBlockedError,
    DeletedModel,
    DeviceRemoval,
    DeviceRemovedError,
    FleetStates,
    IdentityMismatchError,
    NotFoundError,
    RemovedDevice,
    Store,
    StoreError,
)
from edgefleet.orchestrator.store.codec import hardware_from_dict
from edgefleet.orchestrator.store.engine import SqlTransactions
from edgefleet.orchestrator.store.tables import (
    UtcDateTime,
    assignments,
    device_labels,
    devices,
    hardware_profiles,
    identity_conflicts,
    metric_batches,
    metric_windows,
    model_statuses,
    model_versions,
    removed_devices,
    variants,
)
from edgefleet.orchestrator.store.tables_security import (
    device_credentials,
    enrollment_tokens,
    revoked_devices,
    rollback_orders,
)

logger = logging.getLogger(__name__)

# How many devices a rejected deletion names; the message gives the total as well.
MAX_NAMED_DEVICES = 5
# Rows that iter_metric_windows fetches at a time: about 1 MiB of sketches and columns.
METRIC_WINDOW_BATCH_ROWS = 2000
# Compression job states in which a job still reads its source variant and adds variants to its version.
ACTIVE_JOB_STATES = (QUEUED, RUNNING)


class SqlStore(SqlTransactions, Store):
    """A Store on a SQLAlchemy engine made by engine.create_store_engine, with the schema at head.

    Every method runs in one transaction. Writes lock the device row they change first, so
    concurrent writers on PostgreSQL serialize per device. SQLite serializes all writers.
    """

    # Devices

    def register_device(
        self,
        *,
        device_id: str,
        instance_key_hash: str,
        hardware: HardwareProfile,
        labels: Mapping[str, str],
        agent_version: str,
        peer: str,
        now: datetime,
        readmitted_removal: datetime | None = None,
    ) -> Device:
        if not device_id:
            raise StoreError("device_id is empty; the agent must send its device id")
        if not instance_key_hash:
            raise StoreError(f"instance_key_hash of device {device_id!r} is empty")
        rows.require_aware("now", now)

        with self._write() as connection:
            conflict = queries.register(
                connection, device_id, instance_key_hash, hardware, labels, agent_version, peer, now
            )
            if conflict is None:
                # queries.register locked the device row, or inserted it, so a removal of this id has
                # either committed before this read or waits for this transaction to end.
                removed = connection.execute(
                    sa.select(removed_devices).where(removed_devices.c.device_id == device_id)
                ).first()
                if removed is not None and removed.removed_at != readmitted_removal:
                    # Raising rolls the registration back.
                    raise DeviceRemovedError(_removed_device_from_row(removed))
                # The caller readmitted this registration, so a removed device is a fleet member again. Its
                # generations continue above the last one it was sent, because they are the counters of its
                # signed assignments, and its agent rejects counters below those of models it has run.
                if removed is not None:
                    removed_generation = removed.desired_generation
                    connection.execute(sa.delete(removed_devices).where(removed_devices.c.device_id == device_id))
                    connection.execute(
                        sa.update(devices)
                        .where(devices.c.device_id == device_id, devices.c.desired_generation <= removed_generation)
                        .values(desired_generation=removed_generation + 1)
                    )
            device = None if conflict else queries.load_device(connection, device_id)

        if conflict is not None:
            logger.warning(
                "rejected registration of device %s from %s: instance key %s does not match the stored one",
                device_id,
                peer,
                conflict.key_fingerprint,
            )
            raise IdentityMismatchError(
                f"device {device_id!r} is registered with another instance key (presented key "
                f"{conflict.key_fingerprint}); restore the agent's original instance key or register "
                "under a new device id"
            )
        assert device is not None
        return device

    def get_device(self, device_id: str) -> Device | None:
        with self._read() as connection:
            return queries.load_device(connection, device_id)

    def list_devices(self) -> list[Device]:
        with self._read() as connection:
            device_rows = connection.execute(
                sa.select(devices, queries.PROFILE_REVISIONS).order_by(devices.c.device_id)
            ).all()
            labels: dict[str, dict[str, str]] = {}
            for device_id, key, value in connection.execute(sa.select(device_labels)):
                labels.setdefault(device_id, {})[key] = value
        return [rows.device_from_row(row, labels.get(row.device_id, {}), row.profile_revisions) for row in device_rows]

    def hardware_history(self, device_id: str) -> list[tuple[datetime, HardwareProfile]]:
        """Return the recorded hardware profiles of a device, oldest first; [] for an unknown device.

        A profile that differs from the previous one only in codec.VOLATILE_HARDWARE_FIELDS is
        not recorded.
        """
        with self._read() as connection:
            result = connection.execute(
                sa.select(hardware_profiles.c.recorded_at, hardware_profiles.c.profile)
                .where(hardware_profiles.c.device_id == device_id)
                .order_by(hardware_profiles.c.id)
            ).all()
        return [(recorded_at, hardware_from_dict(profile)) for recorded_at, profile in result]

    def list_identity_conflicts(self, device_id: str | None = None) -> list[IdentityConflict]:
        query = sa.select(identity_conflicts).order_by(identity_conflicts.c.seen_at, identity_conflicts.c.id)
        if device_id is not None:
            query = query.where(identity_conflicts.c.device_id == device_id)
        with self._read() as connection:
            return [rows.conflict_from_row(row) for row in connection.execute(query)]

    def record_identity_conflict(self, conflict: IdentityConflict) -> None:
        rows.require_aware("seen_at", conflict.seen_at)
        with self._write() as connection:
            known = connection.execute(
                sa.select(devices.c.device_id).where(devices.c.device_id == conflict.device_id)
            ).first()
            if known is None:
                raise NotFoundError(f"device {conflict.device_id!r} is not registered")
            connection.execute(
                sa.insert(identity_conflicts).values(
                    device_id=conflict.device_id,
                    key_fingerprint=conflict.key_fingerprint,
                    peer=conflict.peer,
                    seen_at=conflict.seen_at,
                )
            )

    def touch_devices(self, last_seen: Mapping[str, datetime]) -> frozenset[str]:
        """Set last_seen for many devices in one transaction and return the ids that are not registered.

        A value older than the stored one is skipped, so a late flush from another process never
        moves last_seen backwards. Unknown ids are otherwise ignored: a device removed while its stream
        is open on another orchestrator process is one.
        """
        for device_id, seen in last_seen.items():
            rows.require_aware(f"last_seen[{device_id!r}]", seen)
        if not last_seen:
            return frozenset()
        seen_param = sa.bindparam("seen", type_=UtcDateTime())
        statement = (
            sa.update(devices)
            .where(devices.c.device_id == sa.bindparam("id"))
            .where(sa.or_(devices.c.last_seen.is_(None), devices.c.last_seen < seen_param))
            .values(last_seen=seen_param)
        )
        # Sorted ids make two concurrent touch batches lock rows in the same order, so on
        # PostgreSQL they cannot deadlock each other.
        parameters = [{"id": device_id, "seen": last_seen[device_id]} for device_id in sorted(last_seen)]
        with self._write() as connection:
            connection.execute(statement, parameters)
            known = connection.execute(
                sa.select(devices.c.device_id).where(devices.c.device_id.in_(list(last_seen)))
            ).scalars()
            return frozenset(last_seen) - frozenset(known)

    def set_connected(self, device_id: str, connected: bool, seen: datetime) -> None:
        """Record whether a control stream is open and advance last_seen to seen; raise NotFoundError."""
        rows.require_aware("seen", seen)
        last_seen = sa.case(
            (
                sa.or_(devices.c.last_seen.is_(None), devices.c.last_seen < seen),
                sa.literal(seen, UtcDateTime()),
            ),
            else_=devices.c.last_seen,
        )
        with self._write() as connection:
            result = connection.execute(
                sa.update(devices)
                .where(devices.c.device_id == device_id)
                .values(connected=connected, last_seen=last_seen)
            )
            if result.rowcount == 0:
                raise NotFoundError(f"device {device_id!r} is not registered")

    def update_disk_free(self, device_id: str, free_bytes: int) -> None:
        if free_bytes < 0:
            raise ValueError(f"free_bytes must be 0 or more, got {free_bytes}")
        with self._write() as connection:
            stored = connection.execute(
                sa.select(devices.c.hardware).where(devices.c.device_id == device_id).with_for_update()
            ).first()
            if stored is None:
                raise NotFoundError(f"device {device_id!r} is not registered")
            connection.execute(
                sa.update(devices)
                .where(devices.c.device_id == device_id)
                .values(hardware={**stored.hardware, "disk_free_bytes": free_bytes})
            )

    def remove_device(self, device_id: str, now: datetime, *, force: bool = False) -> DeviceRemoval:
        rows.require_aware("now", now)
        with self._write() as connection:
            stored = connection.execute(
                sa.select(devices.c.instance_key_hash, devices.c.desired_generation)
                .where(devices.c.device_id == device_id)
                .with_for_update()
            ).first()
            if stored is None:
                raise NotFoundError(f"device {device_id!r} not found")
            instance_key_hash, desired_generation = stored.instance_key_hash, stored.desired_generation
            rollout_ids = queries.rollouts_including(connection, device_id, sorted(ACTIVE_STATES))
            if rollout_ids and not force:
                raise DeleteBlockedError(
                    f"cannot remove device {device_id}: rollout {', '.join(rollout_ids)} includes it and is in "
                    f"progress; wait for it to finish, abort it (edgefleet rollout abort {rollout_ids[0]}), "
                    f"or remove the device anyway with --force"
                )
            # The foreign keys delete the labels, hardware history, identity conflicts, assignments,
            # reported states and benchmark results with the device row. The metric tables have none.
            connection.execute(sa.delete(devices).where(devices.c.device_id == device_id))
            for table in (device_credentials, revoked_devices, rollback_orders):
                connection.execute(sa.delete(table).where(table.c.device_id == device_id))
            connection.execute(
                sa.delete(enrollment_tokens).where(
                    enrollment_tokens.c.device_id == device_id, enrollment_tokens.c.used_at.is_(None)
                )
            )
            removed = RemovedDevice(
                device_id=device_id,
                instance_key_hash=instance_key_hash,
                removed_at=now,
                desired_generation=desired_generation,
            )
            connection.execute(sa.delete(removed_devices).where(removed_devices.c.device_id == device_id))
            connection.execute(
                sa.insert(removed_devices).values(
                    device_id=device_id,
                    instance_key_hash=instance_key_hash,
                    removed_at=now,
                    desired_generation=desired_generation,
                )
            )
        return DeviceRemoval(removed=removed, rollout_ids=tuple(rollout_ids))

    def get_removed_device(self, device_id: str) -> RemovedDevice | None:
        with self._read() as connection:
            row = connection.execute(sa.select(removed_devices).where(removed_devices.c.device_id == device_id)).first()
        return None if row is None else _removed_device_from_row(row)

    def removed_device_ids_with_windows(self) -> list[str]:
        has_windows = sa.exists().where(metric_windows.c.device_id == removed_devices.c.device_id)
        query = sa.select(removed_devices.c.device_id).where(has_windows).order_by(removed_devices.c.device_id)
        with self._read() as connection:
            return list(connection.scalars(query))

    # Models and variants

    def add_model_version(self, model: ModelVersion, source_variant: Variant) -> ModelVersion:
        if (source_variant.model_name, source_variant.model_version) != (model.name, model.version):
            raise StoreError(
                f"source variant {source_variant.variant_id!r} belongs to {source_variant.model_name}:"
                f"{source_variant.model_version}, not {model.name}:{model.version}"
            )
        values = rows.model_version_values(model)
        variant_values = rows.variant_values(source_variant, created_at=model.created_at)
        with self._write() as connection:
            inserted = queries.insert_unless_exists(connection, model_versions, values, ("name", "version"))
            stored = queries.load_model_version(connection, model.name, model.version)
            if not inserted:
                if stored.digest != model.digest:
                    raise AlreadyExistsError(
                        f"model {model.name}:{model.version} already exists with digest {stored.digest}, "
                        f"not {model.digest}; upload the new file under another version"
                    )
                return stored
            if not queries.insert_unless_exists(connection, variants, variant_values, ("variant_id",)):
                raise AlreadyExistsError(f"variant {source_variant.variant_id!r} already exists")
        logger.info("stored model %s:%s (%s)", model.name, model.version, model.digest)
        return stored

    def get_model_version(self, name: str, version: str | None = None) -> ModelVersion:
        with self._read() as connection:
            return queries.load_model_version(connection, name, version)

    def list_model_versions(self, name: str | None = None) -> list[ModelVersion]:
        """Return model versions ordered by name, then oldest first."""
        query = sa.select(model_versions).order_by(
            model_versions.c.name, model_versions.c.created_at, model_versions.c.id
        )
        if name is not None:
            query = query.where(model_versions.c.name == name)
        with self._read() as connection:
            return [rows.model_version_from_row(row) for row in connection.execute(query)]

    def add_variant(self, variant: Variant) -> Variant:
        values = rows.variant_values(variant, created_at=datetime.now(UTC))
        with self._write() as connection:
            queries.load_model_version(connection, variant.model_name, variant.model_version)
            if not queries.insert_unless_exists(connection, variants, values, ("variant_id",)):
                raise AlreadyExistsError(f"variant {variant.variant_id!r} already exists")
            return queries.load_variant(connection, variant.variant_id)

    def get_variant(self, variant_id: str) -> Variant:
        with self._read() as connection:
            return queries.load_variant(connection, variant_id)

    def list_variants(self, model_name: str, model_version: str | None = None) -> list[Variant]:
        """Return the variants of a model, or of one version of it, oldest first."""
        query = (
            sa.select(variants)
            .where(variants.c.model_name == model_name)
            .order_by(variants.c.created_at, variants.c.variant_id)
        )
        if model_version is not None:
            query = query.where(variants.c.model_version == model_version)
        with self._read() as connection:
            return [rows.variant_from_row(row) for row in connection.execute(query)]

    def list_tflite_variants_without_min_runtime_version(self) -> list[Variant]:
        # The JSON column is filtered here, not in SQL, because SQLite and PostgreSQL test for a missing
        # key differently. The orchestrator calls this once at start-up, so reading every TFLite row is cheap.
        query = (
            sa.select(variants)
            .where(variants.c.format == "tflite")
            .order_by(variants.c.created_at, variants.c.variant_id)
        )
        with self._read() as connection:
            return [
                rows.variant_from_row(row)
                for row in connection.execute(query)
                if "min_runtime_version" not in row.metadata
            ]

    def set_min_runtime_version(self, variant_id: str, version: str) -> None:
        with self._write() as connection:
            query = sa.select(variants.c.metadata).where(variants.c.variant_id == variant_id).with_for_update()
            stored = connection.execute(query).scalar()
            if stored is None:
                raise NotFoundError(f"variant {variant_id!r} not found")
            metadata = {**stored, "min_runtime_version": version}
            connection.execute(sa.update(variants).where(variants.c.variant_id == variant_id).values(metadata=metadata))

    def delete_model(self, name: str, version: str, variant_id: str = "") -> DeletedModel:
        with self._write() as connection:
            # The lock makes concurrent deletions of one version on PostgreSQL wait for each other.
            model = queries.lock_model_version(connection, name, version)
            if variant_id:
                variant = queries.load_variant(connection, variant_id)
                if (variant.model_name, variant.model_version) != (name, version):
                    raise NotFoundError(f"variant {variant_id!r} of {name}:{version} not found")
                if variant.kind == "source":
                    raise DeleteBlockedError(
                        f"variant {variant_id} is the source variant of {name}:{version} and cannot be deleted "
                        f"alone; delete the version {name}:{version} instead"
                    )
                targets = [variant]
            else:
                targets = [
                    rows.variant_from_row(row)
                    for row in connection.execute(
                        sa.select(variants).where(variants.c.model_name == name, variants.c.model_version == version)
                    )
                ]
            variant_ids = sorted(v.variant_id for v in targets)
            blockers = _delete_blockers(connection, name, version, variant_ids, whole_version=not variant_id)
            if blockers:
                target = f"variant {variant_id}" if variant_id else f"model {name}:{version}"
                raise DeleteBlockedError(f"cannot delete {target}: " + "; ".join(blockers))

            connection.execute(sa.delete(variants).where(variants.c.variant_id.in_(variant_ids)))
            digests = {v.digest for v in targets}
            if not variant_id:
                connection.execute(
                    sa.delete(model_versions).where(model_versions.c.name == name, model_versions.c.version == version)
                )
                digests.add(model.digest)
            unreferenced = queries.unreferenced_digests(connection, sorted(digests))
        return DeletedModel(variant_ids=tuple(variant_ids), unreferenced_digests=tuple(unreferenced))

    # Desired and reported state

    def set_assignment(self, assignment: Assignment) -> int:
        """Replace the device's assignment for assignment.model_name and return the new generation.

        Raises NotFoundError for an unknown device or variant, and StoreError when the assignment's
        model name, version or digest differ from the variant's.
        """
        with self._write() as connection:
            generation = queries.bump_generation(connection, assignment.device_id)
            variant = queries.load_variant(connection, assignment.variant_id)
            variant_identity = (variant.model_name, variant.model_version, variant.digest)
            assigned_identity = (assignment.model_name, assignment.model_version, assignment.digest)
            if assigned_identity != variant_identity:
                raise StoreError(
                    f"assignment of variant {variant.variant_id!r} names model, version and digest "
                    f"{assigned_identity}, but the variant has {variant_identity}; copy them from the variant"
                )
            queries.delete_assignment(connection, assignment.device_id, assignment.model_name)
            connection.execute(sa.insert(assignments).values(rows.assignment_values(assignment)))
        return generation

    def remove_assignment(self, device_id: str, model_name: str) -> int:
        """Remove a model from the device's desired state and return the new generation.

        The generation advances even when the model was not assigned. Raises NotFoundError for an
        unknown device.
        """
        with self._write() as connection:
            generation = queries.bump_generation(connection, device_id)
            queries.delete_assignment(connection, device_id, model_name)
        return generation

    def get_desired_state(self, device_id: str) -> tuple[int, list[Assignment]]:
        with self._read() as connection:
            generation = connection.execute(
                sa.select(devices.c.desired_generation).where(devices.c.device_id == device_id)
            ).scalar()
            if generation is None:
                raise NotFoundError(f"device {device_id!r} is not registered")
            result = connection.execute(
                sa.select(assignments).where(assignments.c.device_id == device_id).order_by(assignments.c.model_name)
            )
            return int(generation), [rows.assignment_from_row(row) for row in result]

    def save_reported_state(
        self,
        device_id: str,
        generation: int,
        statuses: Sequence[ModelStatus],
        now: datetime,
        *,
        trusted_keys: tuple[int, Sequence[str]] | None = None,
    ) -> None:
        """Replace the device's reported model states and record the desired generation they report on.

        trusted_keys, the key set version and key ids the agent trusts, replaces the stored ones when
        given. Raises NotFoundError for an unknown device and StoreError for a status of another device
        or with a state outside MODEL_STATES.
        """
        rows.require_aware("now", now)
        for status in statuses:
            if status.device_id != device_id:
                raise StoreError(f"status of device {status.device_id!r} in a report of device {device_id!r}")
            if status.state not in MODEL_STATES:
                raise StoreError(f"invalid model state {status.state!r}; expected one of {MODEL_STATES}")
        values = [rows.status_values(status, updated_at=now) for status in statuses]

        device_values: dict[str, Any] = {"reported_generation": generation}
        if trusted_keys is not None:
            device_values["trusted_key_set_version"] = trusted_keys[0]
            device_values["trusted_key_ids"] = sorted(trusted_keys[1])

        with self._write() as connection:
            result = connection.execute(
                sa.update(devices).where(devices.c.device_id == device_id).values(**device_values)
            )
            if result.rowcount == 0:
                raise NotFoundError(f"device {device_id!r} is not registered")
            connection.execute(sa.delete(model_statuses).where(model_statuses.c.device_id == device_id))
            if values:
                connection.execute(sa.insert(model_statuses), values)

    def get_reported_state(self, device_id: str) -> list[ModelStatus]:
        """Return the last reported model states in report order; [] for an unknown device."""
        with self._read() as connection:
            result = connection.execute(
                sa.select(model_statuses).where(model_statuses.c.device_id == device_id).order_by(model_statuses.c.id)
            )
            return [rows.status_from_row(row) for row in result]

    def fleet_states(self) -> FleetStates:
        """Read every device's assignments, reported states and identity conflicts in three queries."""
        states = FleetStates()
        with self._read() as connection:
            for row in connection.execute(
                sa.select(assignments).order_by(assignments.c.device_id, assignments.c.model_name)
            ):
                assignment = rows.assignment_from_row(row)
                states.desired.setdefault(assignment.device_id, []).append(assignment)
            for row in connection.execute(sa.select(model_statuses).order_by(model_statuses.c.id)):
                status = rows.status_from_row(row)
                states.reported.setdefault(status.device_id, []).append(status)
            query = sa.select(identity_conflicts).order_by(identity_conflicts.c.seen_at, identity_conflicts.c.id)
            for row in connection.execute(query):
                conflict = rows.conflict_from_row(row)
                states.conflicts.setdefault(conflict.device_id, []).append(conflict)
        return states

    # Metrics

    def add_metric_batch(self, device_id: str, batch_id: str, windows: Sequence[MetricWindow]) -> bool:
        """Store a batch of metric windows once; return False, storing nothing, for a known batch_id.

        Raises NotFoundError for an unknown device and StoreError for an empty batch_id or a window
        of another device.
        """
        if not batch_id:
            raise StoreError(f"metric batch of device {device_id!r} has an empty batch_id")
        for window in windows:
            if window.device_id != device_id:
                raise StoreError(f"window of device {window.device_id!r} in a batch of device {device_id!r}")
        values = [rows.window_values(window, batch_id) for window in windows]

        with self._write() as connection:
            known = connection.execute(sa.select(devices.c.device_id).where(devices.c.device_id == device_id))
            if known.first() is None:
                raise NotFoundError(f"device {device_id!r} is not registered")
            # On PostgreSQL a concurrent insert of the same key waits for the other transaction and
            # then does nothing, so exactly one copy of a raced batch is stored.
            batch = {"device_id": device_id, "batch_id": batch_id, "received_at": datetime.now(UTC)}
            if not queries.insert_unless_exists(connection, metric_batches, batch, ("device_id", "batch_id")):
                logger.debug("skipped duplicate metric batch %s of device %s", batch_id, device_id)
                return False
            if values:
                connection.execute(sa.insert(metric_windows), values)
        return True

    def iter_metric_windows(
        self,
        *,
        device_id: str = "",
        model_name: str = "",
        variant_id: str = "",
        hardware_class: str = "",
        start: datetime | None = None,
        end: datetime | None = None,
        received_start: datetime | None = None,
        received_end: datetime | None = None,
        received_device_ids: Collection[str] = (),
    ) -> Generator[MetricWindow, None, None]:
        query = _metric_windows_query(
            device_id,
            model_name,
            variant_id,
            hardware_class,
            start,
            end,
            received_start,
            received_end,
            received_device_ids,
        )
        with self._read() as connection:
            # yield_per fetches in batches, through a server-side cursor on PostgreSQL.
            result = connection.execution_options(yield_per=METRIC_WINDOW_BATCH_ROWS).execute(query)
            try:
                for row in result:
                    yield rows.window_from_row(row)
            finally:
                result.close()  # A caller that stops early leaves the cursor open otherwise.

    def downsample_metric_windows(self, *, received_before: datetime, bucket_seconds: int) -> tuple[int, int]:
        """Merge old windows per bucket (see Store), one transaction per device; return (removed, written).

        Raises ValueError for a naive received_before or bucket_seconds below 1. A bucket whose
        sketches cannot be merged (different relative accuracies) is left alone with a warning.
        """
        rows.require_aware("received_before", received_before)
        if bucket_seconds < 1:
            raise ValueError(f"bucket_seconds must be at least 1, got {bucket_seconds}")
        with self._read() as connection:
            device_ids = list(
                connection.execute(
                    sa.select(metric_windows.c.device_id)
                    .where(
                        metric_windows.c.received_at < received_before,
                        metric_windows.c.batch_id != queries.DOWNSAMPLED_BATCH_ID,
                    )
                    .distinct()
                    .order_by(metric_windows.c.device_id)
                ).scalars()
            )
        removed = written = 0
        for device_id in device_ids:
            with self._write() as connection:
                device_removed, device_written = queries.downsample_device_windows(
                    connection, device_id, received_before, bucket_seconds
                )
            removed += device_removed
            written += device_written
        return removed, written

    def delete_metric_windows(self, *, received_before: datetime) -> int:
        rows.require_aware("received_before", received_before)
        with self._write() as connection:
            deleted = connection.execute(
                sa.delete(metric_windows).where(metric_windows.c.received_at < received_before)
            ).rowcount
            connection.execute(sa.delete(metric_batches).where(metric_batches.c.received_at < received_before))
        return int(deleted)

    def reclaim_space(self) -> None:
        """Give the pages of deleted rows back to the file system (SQLite) or mark them reusable (PostgreSQL).

        SQLite: a database created without auto_vacuum is converted once with PRAGMA
        auto_vacuum=INCREMENTAL and a full VACUUM, which rewrites the file and blocks writers while
        it runs; later calls run PRAGMA incremental_vacuum. The WAL is then checkpointed and
        truncated, so the database file shrinks. PostgreSQL: VACUUM on the metric tables makes the
        space of deleted rows reusable; the file keeps its size (autovacuum does the same in time).
        """
        if self._engine.dialect.name == "sqlite":
            with self._write_lock:
                raw = self._engine.raw_connection()
                try:
                    cursor = raw.cursor()
                    # The pool's SQLite connections run in autocommit mode (engine.py), so VACUUM runs
                    # outside a transaction as it must.
                    mode = cursor.execute("PRAGMA auto_vacuum").fetchone()[0]
                    if mode != queries.SQLITE_AUTO_VACUUM_INCREMENTAL:
                        logger.info("converting the SQLite database to auto_vacuum=INCREMENTAL with a full VACUUM")
                        cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
                        cursor.execute("VACUUM")
                    else:
                        # Each step of this pragma frees one page and pysqlite's execute() steps
                        # once; executescript() runs it to the end.
                        cursor.executescript("PRAGMA incremental_vacuum;")
                    cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                    cursor.close()
                finally:
                    raw.close()
            return
        with self._engine.connect() as connection:
            autocommit = connection.execution_options(isolation_level="AUTOCOMMIT")
            for table in (metric_windows, metric_batches):
                autocommit.exec_driver_sql(f"VACUUM {table.name}")

    def close(self) -> None:
        self._engine.dispose()


def _removed_device_from_row(row: sa.Row[Any]) -> RemovedDevice:
    return RemovedDevice(
        device_id=row.device_id,
        instance_key_hash=row.instance_key_hash,
        removed_at=row.removed_at,
        desired_generation=row.desired_generation,
    )


def _delete_blockers(
    connection: sa.Connection, name: str, version: str, variant_ids: list[str], *, whole_version: bool
) -> list[str]:
    """Return what keeps the variants (and with whole_version the version) from being deleted, with the fix."""
    # NOTE: on PostgreSQL a rollout or compression job created while this transaction runs is not seen,
    # because creating one does not lock the model version row. A concurrent assignment fails on its foreign key.
    blockers: list[str] = []
    active = sorted(ACTIVE_STATES)

    rollout_ids = queries.rollouts_of_version(connection, name, version, active)
    if rollout_ids:
        blockers.append(
            f"rollout {', '.join(rollout_ids)} of {name}:{version} is active; abort it first "
            f"(edgefleet rollout abort {rollout_ids[0]})"
        )
    restoring = [r for r in queries.rollouts_restoring(connection, variant_ids, active) if r not in rollout_ids]
    if restoring:
        blockers.append(
            f"active rollout {', '.join(restoring)} restores these variants when it rolls back; wait for it to "
            f"finish or abort it first (edgefleet rollout abort {restoring[0]})"
        )

    job_ids = queries.jobs_using(connection, name, version, variant_ids, whole_version, ACTIVE_JOB_STATES)
    if job_ids:
        blockers.append(
            f"compression job {', '.join(job_ids)} of {name}:{version} is queued or running; cancel it first "
            f"(edgefleet jobs cancel {job_ids[0]})"
        )

    running: dict[str, list[str]] = {}
    for device_id, state, variant_id in queries.devices_running(connection, name, version, variant_ids, whole_version):
        running.setdefault(device_id, []).append(f"{state} {variant_id}")
    if running:
        running_ids = sorted(running)
        named = ", ".join(f"{d} ({', '.join(running[d])})" for d in running_ids[:MAX_NAMED_DEVICES])
        more = len(running_ids) - MAX_NAMED_DEVICES
        listed = f"{named} and {more} more" if more > 0 else named
        devices_text = "1 device reports" if len(running_ids) == 1 else f"{len(running_ids)} devices report"
        blockers.append(
            f"{devices_text} serving or loading it: {listed}; deploy another version to them "
            f"(edgefleet deploy --model {name}:VERSION --device {running_ids[0]}), or remove a device that is "
            f"gone for good (edgefleet devices remove {running_ids[0]})"
        )

    device_ids = queries.assigned_devices(connection, variant_ids)
    if device_ids:
        named = ", ".join(device_ids[:MAX_NAMED_DEVICES])
        more = len(device_ids) - MAX_NAMED_DEVICES
        listed = f"{named} and {more} more" if more > 0 else named
        devices_text = "1 device has" if len(device_ids) == 1 else f"{len(device_ids)} devices have"
        blockers.append(
            f"{devices_text} it in their desired state ({listed}); deploy another variant or version to them first"
        )
    return blockers


def _metric_windows_query(
    device_id: str,
    model_name: str,
    variant_id: str,
    hardware_class: str,
    start: datetime | None,
    end: datetime | None,
    received_start: datetime | None,
    received_end: datetime | None,
    received_device_ids: Collection[str],
) -> sa.Select[Any]:
    """Build the select of query_metric_windows and iter_metric_windows, ordered by window_start."""
    query = sa.select(metric_windows).order_by(metric_windows.c.window_start, metric_windows.c.id)
    filters = {
        metric_windows.c.device_id: device_id,
        metric_windows.c.model_name: model_name,
        metric_windows.c.variant_id: variant_id,
        metric_windows.c.hardware_class: hardware_class,
    }
    for column, value in filters.items():
        if value:
            query = query.where(column == value)
    by_start = queries.time_range(metric_windows.c.window_start, "", start, end)
    if received_start is None and received_end is None:
        return query.where(by_start)

    # Only windows that the caller may place by receive time match by it. Matching every window
    # received in the range would read all old windows that agents delivered late in it, and on
    # PostgreSQL 15 the OR then kept the planner from using the range of the window_start indexes.
    placed_by_receipt: list[sa.ColumnElement[bool]] = []
    if received_device_ids:
        placed_by_receipt.append(metric_windows.c.device_id.in_(sorted(received_device_ids)))
    if end is not None:
        placed_by_receipt.append(metric_windows.c.window_start >= end)
    if not placed_by_receipt:
        return query.where(by_start)
    by_receipt = sa.and_(
        queries.time_range(metric_windows.c.received_at, "received_", received_start, received_end),
        sa.or_(*placed_by_receipt),
    )
    return query.where(sa.or_(by_start, by_receipt))
