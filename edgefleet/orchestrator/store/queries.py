"""Statements of the SQL store that run inside a transaction the caller opened."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.sketch import LatencySketch
from edgefleet.orchestrator.domain import Device, IdentityConflict, ModelVersion, Variant
from edgefleet.orchestrator.store import rows
from edgefleet.orchestrator.store.base import NotFoundError
from edgefleet.orchestrator.store.codec import hardware_from_dict, hardware_identity, hardware_to_dict
from edgefleet.orchestrator.store.tables import (
    assignments,
    device_labels,
    devices,
    hardware_profiles,
    identity_conflicts,
    metric_windows,
    model_statuses,
    model_versions,
    variants,
)
from edgefleet.orchestrator.store.tables_jobs import compression_jobs
from edgefleet.orchestrator.store.tables_rollouts import rollout_wave_devices, rollouts

logger = logging.getLogger(__name__)

# PRAGMA auto_vacuum value of INCREMENTAL (0 is NONE, 1 is FULL).
SQLITE_AUTO_VACUUM_INCREMENTAL = 2
# batch_id of windows that downsample_device_windows wrote, or left alone in their bucket.
DOWNSAMPLED_BATCH_ID = "downsampled"

# Length of a device's hardware history, as a column of a select on devices.
PROFILE_REVISIONS = (
    sa.select(sa.func.count())
    .where(hardware_profiles.c.device_id == devices.c.device_id)
    .scalar_subquery()
    .label("profile_revisions")
)


def register(
    connection: Connection,
    device_id: str,
    instance_key_hash: str,
    hardware: HardwareProfile,
    labels: Mapping[str, str],
    agent_version: str,
    peer: str,
    now: datetime,
) -> IdentityConflict | None:
    """Insert or update the device; return the recorded conflict instead when the key differs."""
    current = sa.select(devices.c.instance_key_hash).where(devices.c.device_id == device_id)
    stored_hash = connection.execute(current.with_for_update()).scalar()
    new_values = {
        "hardware": hardware_to_dict(hardware),
        "hardware_class": hardware.hardware_class,
        "agent_version": agent_version,
        "last_seen": now,
    }
    if stored_hash is None:
        inserted = insert_unless_exists(
            connection,
            devices,
            {
                "device_id": device_id,
                "instance_key_hash": instance_key_hash,
                "registered_at": now,
                "connected": False,
                "desired_generation": 0,
                "reported_generation": 0,
                **new_values,
            },
        )
        if not inserted:
            # Another transaction registered this id after the select above; lock its row.
            stored_hash = connection.execute(current.with_for_update()).scalar_one()

    if stored_hash is not None:
        if stored_hash != instance_key_hash:
            conflict = IdentityConflict(
                device_id=device_id, key_fingerprint=instance_key_hash[:12], peer=peer, seen_at=now
            )
            connection.execute(
                sa.insert(identity_conflicts).values(
                    device_id=device_id, key_fingerprint=conflict.key_fingerprint, peer=peer, seen_at=now
                )
            )
            return conflict
        connection.execute(sa.update(devices).where(devices.c.device_id == device_id).values(new_values))

    connection.execute(sa.delete(device_labels).where(device_labels.c.device_id == device_id))
    if labels:
        connection.execute(
            sa.insert(device_labels),
            [{"device_id": device_id, "key": key, "value": value} for key, value in labels.items()],
        )

    latest = connection.execute(
        sa.select(hardware_profiles.c.profile)
        .where(hardware_profiles.c.device_id == device_id)
        .order_by(hardware_profiles.c.id.desc())
        .limit(1)
    ).scalar()
    if latest is None or hardware_identity(hardware_from_dict(latest)) != hardware_identity(hardware):
        connection.execute(
            sa.insert(hardware_profiles).values(
                device_id=device_id, recorded_at=now, profile=hardware_to_dict(hardware)
            )
        )
    return None


def load_device(connection: Connection, device_id: str) -> Device | None:
    row = connection.execute(sa.select(devices, PROFILE_REVISIONS).where(devices.c.device_id == device_id)).first()
    if row is None:
        return None
    labels = connection.execute(
        sa.select(device_labels.c.key, device_labels.c.value).where(device_labels.c.device_id == device_id)
    ).all()
    return rows.device_from_row(row, {key: value for key, value in labels}, row.profile_revisions)


def load_model_version(connection: Connection, name: str, version: str | None) -> ModelVersion:
    query = sa.select(model_versions).where(model_versions.c.name == name)
    if version is None:
        query = query.order_by(model_versions.c.created_at.desc(), model_versions.c.id.desc()).limit(1)
    else:
        query = query.where(model_versions.c.version == version)
    row = connection.execute(query).first()
    if row is None:
        requested = name if version is None else f"{name}:{version}"
        raise NotFoundError(f"model {requested} not found; upload it first")
    return rows.model_version_from_row(row)


def load_variant(connection: Connection, variant_id: str) -> Variant:
    row = connection.execute(sa.select(variants).where(variants.c.variant_id == variant_id)).first()
    if row is None:
        raise NotFoundError(f"variant {variant_id!r} not found")
    return rows.variant_from_row(row)


def bump_generation(connection: Connection, device_id: str) -> int:
    generation = connection.execute(
        sa.update(devices)
        .where(devices.c.device_id == device_id)
        .values(desired_generation=devices.c.desired_generation + 1)
        .returning(devices.c.desired_generation)
    ).scalar()
    if generation is None:
        raise NotFoundError(f"device {device_id!r} is not registered")
    return int(generation)


def insert_unless_exists(
    connection: Connection, table: sa.Table, values: Mapping[str, Any], conflict_columns: Sequence[str] = ()
) -> bool:
    """Insert one row unless it violates the unique key on conflict_columns; return whether it did.

    conflict_columns defaults to the primary key.
    """
    columns = list(conflict_columns) or [column.name for column in table.primary_key.columns]
    statement: postgresql.Insert | sqlite.Insert
    if connection.dialect.name == "postgresql":
        statement = postgresql.insert(table).values(**values).on_conflict_do_nothing(index_elements=columns)
    else:
        statement = sqlite.insert(table).values(**values).on_conflict_do_nothing(index_elements=columns)
    # rowcount is -1 on psycopg when SQLAlchemy adds RETURNING for an autoincrement key, so the
    # returned row tells whether the insert happened: DO NOTHING returns none.
    returned = connection.execute(statement.returning(*table.primary_key.columns)).first()
    return returned is not None


def delete_assignment(connection: Connection, device_id: str, model_name: str) -> None:
    connection.execute(
        sa.delete(assignments).where(assignments.c.device_id == device_id, assignments.c.model_name == model_name)
    )


def lock_model_version(connection: Connection, name: str, version: str) -> ModelVersion:
    """Load a model version and lock its row until the transaction ends; raise NotFoundError."""
    row = connection.execute(
        sa.select(model_versions)
        .where(model_versions.c.name == name, model_versions.c.version == version)
        .with_for_update()
    ).first()
    if row is None:
        raise NotFoundError(f"model {name}:{version} not found")
    return rows.model_version_from_row(row)


def assigned_devices(connection: Connection, variant_ids: Sequence[str]) -> list[str]:
    """Return the ids of the devices whose desired state contains one of variant_ids, sorted."""
    result = connection.execute(
        sa.select(assignments.c.device_id)
        .where(assignments.c.variant_id.in_(variant_ids))
        .distinct()
        .order_by(assignments.c.device_id)
    )
    return list(result.scalars())


def rollouts_of_version(connection: Connection, name: str, version: str, states: Sequence[str]) -> list[str]:
    """Return the ids of the rollouts of name:version in one of states, oldest first."""
    result = connection.execute(
        sa.select(rollouts.c.rollout_id)
        .where(rollouts.c.model_name == name, rollouts.c.model_version == version, rollouts.c.state.in_(states))
        .order_by(rollouts.c.created_at, rollouts.c.rollout_id)
    )
    return list(result.scalars())


def rollouts_restoring(connection: Connection, variant_ids: Sequence[str], states: Sequence[str]) -> list[str]:
    """Return the ids of the rollouts in one of states that restore one of variant_ids when a wave rolls back."""
    result = connection.execute(
        sa.select(rollouts.c.rollout_id)
        .join(rollout_wave_devices, rollout_wave_devices.c.rollout_id == rollouts.c.rollout_id)
        .where(rollout_wave_devices.c.prev_variant_id.in_(variant_ids), rollouts.c.state.in_(states))
        .distinct()
        .order_by(rollouts.c.rollout_id)
    )
    return list(result.scalars())


def rollouts_including(connection: Connection, device_id: str, states: Sequence[str]) -> list[str]:
    """Return the ids of the rollouts in one of states whose plan or waves include device_id, sorted."""
    in_waves = connection.execute(
        sa.select(rollout_wave_devices.c.rollout_id)
        .join(rollouts, rollout_wave_devices.c.rollout_id == rollouts.c.rollout_id)
        .where(rollout_wave_devices.c.device_id == device_id, rollouts.c.state.in_(states))
        .distinct()
    ).scalars()
    # The plan is a JSON list, which SQLite and PostgreSQL search differently; the active rollouts are few.
    planned = connection.execute(
        sa.select(rollouts.c.rollout_id, rollouts.c.plan).where(rollouts.c.state.in_(states))
    ).all()
    return sorted({*in_waves, *(row.rollout_id for row in planned if device_id in (row.plan or ()))})


def devices_running(
    connection: Connection, name: str, version: str, variant_ids: Sequence[str], whole_version: bool
) -> list[tuple[str, str, str]]:
    """Return (device_id, state, variant_id) of the devices that report serving or loading a deleted variant.

    With whole_version, a report of any variant of name:version counts, also one whose variant id the
    catalog no longer has.
    """
    matches: sa.ColumnElement[bool] = model_statuses.c.variant_id.in_(variant_ids)
    if whole_version:
        matches = sa.or_(
            matches, sa.and_(model_statuses.c.model_name == name, model_statuses.c.model_version == version)
        )
    result = connection.execute(
        sa.select(model_statuses.c.device_id, model_statuses.c.state, model_statuses.c.variant_id)
        .where(matches, model_statuses.c.state.in_(("serving", "loading")))
        .distinct()
        .order_by(model_statuses.c.device_id, model_statuses.c.variant_id)
    )
    return [(row.device_id, row.state, row.variant_id) for row in result]


def jobs_using(
    connection: Connection,
    name: str,
    version: str,
    variant_ids: Sequence[str],
    whole_version: bool,
    states: Sequence[str],
) -> list[str]:
    """Return the ids, oldest first, of the jobs in states that read one of variant_ids or, with whole_version,
    belong to name:version.

    A job reads its source variant and, for a gate job, the uploaded variant that its recipe's gate.variant names.
    """
    of_version = sa.and_(compression_jobs.c.model_name == name, compression_jobs.c.model_version == version)
    uses: sa.ColumnElement[bool] = compression_jobs.c.source_variant_id.in_(variant_ids)
    # The gated variant belongs to the job's own version. Its id is inside the recipe JSON, which SQLite and
    # PostgreSQL search differently, so the few active jobs of the version are filtered here.
    uses = sa.or_(uses, of_version)
    result = connection.execute(
        sa.select(compression_jobs.c.job_id, compression_jobs.c.source_variant_id, compression_jobs.c.recipe_json)
        .where(uses, compression_jobs.c.state.in_(states))
        .order_by(compression_jobs.c.created_at, compression_jobs.c.job_id)
    )
    read_ids = set(variant_ids)
    return [
        row.job_id
        for row in result
        if whole_version or row.source_variant_id in read_ids or _gated_variant_id(row.recipe_json) in read_ids
    ]


def _gated_variant_id(recipe_json: str) -> str:
    """Return the gate.variant of a stored recipe, or an empty string when it gates no uploaded variant."""
    try:
        recipe = json.loads(recipe_json)
    except ValueError:
        return ""
    gate = recipe.get("gate") if isinstance(recipe, dict) else None
    variant_id = gate.get("variant") if isinstance(gate, dict) else None
    return variant_id if isinstance(variant_id, str) else ""


def unreferenced_digests(connection: Connection, digests: Sequence[str]) -> list[str]:
    """Return the digests, sorted, that no model version or variant row references."""
    candidates = set(digests)
    referenced = set(
        connection.execute(sa.select(variants.c.digest).where(variants.c.digest.in_(candidates))).scalars()
    )
    referenced.update(
        connection.execute(sa.select(model_versions.c.digest).where(model_versions.c.digest.in_(candidates))).scalars()
    )
    return sorted(candidates - referenced)


def time_range(
    column: sa.ColumnElement[datetime], label: str, start: datetime | None, end: datetime | None
) -> sa.ColumnElement[bool]:
    """Return the condition start <= column < end; a missing bound is open. Raises ValueError for naive bounds."""
    conditions: list[sa.ColumnElement[bool]] = []
    if start is not None:
        rows.require_aware(f"{label}start", start)
        conditions.append(column >= start)
    if end is not None:
        rows.require_aware(f"{label}end", end)
        conditions.append(column < end)
    return sa.and_(sa.true(), *conditions)


def downsample_device_windows(
    connection: Connection, device_id: str, received_before: datetime, bucket_seconds: int
) -> tuple[int, int]:
    """Merge one device's windows received before received_before per bucket; return (removed, written).

    Only the buckets from the first to the last window without DOWNSAMPLED_BATCH_ID are read, so a
    run does not read the device's whole downsampled history again.
    """
    received_early = sa.and_(metric_windows.c.device_id == device_id, metric_windows.c.received_at < received_before)
    first_start, last_start = connection.execute(
        sa.select(sa.func.min(metric_windows.c.window_start), sa.func.max(metric_windows.c.window_start)).where(
            received_early, metric_windows.c.batch_id != DOWNSAMPLED_BATCH_ID
        )
    ).one()
    if first_start is None:
        return 0, 0
    span_start = int(first_start.timestamp()) // bucket_seconds * bucket_seconds
    span_end = (int(last_start.timestamp()) // bucket_seconds + 1) * bucket_seconds
    old_rows = connection.execute(
        sa.select(metric_windows)
        .where(
            received_early,
            metric_windows.c.window_start >= datetime.fromtimestamp(span_start, UTC),
            metric_windows.c.window_start < datetime.fromtimestamp(span_end, UTC),
        )
        .order_by(metric_windows.c.window_start, metric_windows.c.id)
    ).all()
    buckets: dict[tuple[str, str, str, str, int], list[sa.Row[Any]]] = defaultdict(list)
    for row in old_rows:
        start = int(row.window_start.timestamp()) // bucket_seconds * bucket_seconds
        buckets[(row.model_name, row.model_version, row.variant_id, row.hardware_class, start)].append(row)

    removed: list[int] = []
    merged_rows: list[dict[str, Any]] = []
    # A window alone in its bucket stays as it is, but gets DOWNSAMPLED_BATCH_ID so that later runs skip it.
    alone: list[int] = []
    for (model_name, model_version, variant_id, hardware_class, start), members in buckets.items():
        if len(members) < 2:
            if members[0].batch_id != DOWNSAMPLED_BATCH_ID:
                alone.append(members[0].id)
            continue
        try:
            sketch = LatencySketch.from_bytes(members[0].sketch)
            for member in members[1:]:
                sketch.merge(LatencySketch.from_bytes(member.sketch))
        except ValueError as error:
            logger.warning(
                "not downsampling %d windows of device %s, model %s:%s from %s: %s",
                len(members),
                device_id,
                model_name,
                model_version,
                datetime.fromtimestamp(start, UTC).isoformat(),
                error,
            )
            continue
        removed.extend(member.id for member in members)
        merged_rows.append(
            {
                "device_id": device_id,
                "batch_id": DOWNSAMPLED_BATCH_ID,
                "model_name": model_name,
                "model_version": model_version,
                "variant_id": variant_id,
                "hardware_class": hardware_class,
                "window_start": datetime.fromtimestamp(start, UTC),
                "window_seconds": min(sum(m.window_seconds for m in members), bucket_seconds),
                "received_at": max(m.received_at for m in members),
                "inference_count": sum(m.inference_count for m in members),
                "error_count": sum(m.error_count for m in members),
                "sketch": sketch.to_bytes(),
            }
        )
    # Chunks keep the statement under SQLite's limit on bound parameters.
    for offset in range(0, len(removed), 500):
        connection.execute(sa.delete(metric_windows).where(metric_windows.c.id.in_(removed[offset : offset + 500])))
    for offset in range(0, len(alone), 500):
        connection.execute(
            sa.update(metric_windows)
            .where(metric_windows.c.id.in_(alone[offset : offset + 500]))
            .values(batch_id=DOWNSAMPLED_BATCH_ID)
        )
    if merged_rows:
        connection.execute(sa.insert(metric_windows), merged_rows)
    return len(removed), len(merged_rows)
