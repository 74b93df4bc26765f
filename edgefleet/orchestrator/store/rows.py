"""Conversion between rows of the SQL store's tables and the orchestrator's domain records."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Row

from edgefleet.orchestrator.domain import (
    Assignment,
    Device,
    IdentityConflict,
    MetricWindow,
    ModelStatus,
    ModelVersion,
    Variant,
)
from edgefleet.orchestrator.store.codec import hardware_from_dict, metadata_from_dict, metadata_to_dict


def require_aware(name: str, value: datetime) -> None:
    """Raise ValueError when value is a naive datetime, which the store cannot place on the UTC axis."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{name}={value.isoformat()} has no time zone; pass an aware datetime such as datetime.now(UTC)"
        )


def device_from_row(row: Row[Any], labels: Mapping[str, str], profile_revisions: int) -> Device:
    """Build a Device from a devices row, its labels and the length of its hardware history."""
    return Device(
        device_id=row.device_id,
        instance_key_hash=row.instance_key_hash,
        hardware=hardware_from_dict(row.hardware),
        labels=dict(labels),
        agent_version=row.agent_version,
        registered_at=row.registered_at,
        last_seen=row.last_seen,
        connected=row.connected,
        profile_revisions=profile_revisions,
        desired_generation=row.desired_generation,
        reported_generation=row.reported_generation,
        trusted_key_set_version=row.trusted_key_set_version,
        trusted_key_ids=tuple(row.trusted_key_ids or ()),
    )


def conflict_from_row(row: Row[Any]) -> IdentityConflict:
    return IdentityConflict(
        device_id=row.device_id, key_fingerprint=row.key_fingerprint, peer=row.peer, seen_at=row.seen_at
    )


def model_version_values(model: ModelVersion) -> dict[str, Any]:
    require_aware("created_at", model.created_at)
    return {
        "name": model.name,
        "version": model.version,
        "digest": model.digest,
        "size_bytes": model.size_bytes,
        "metadata": metadata_to_dict(model.metadata),
        "created_at": model.created_at,
    }


def model_version_from_row(row: Row[Any]) -> ModelVersion:
    return ModelVersion(
        name=row.name,
        version=row.version,
        digest=row.digest,
        size_bytes=row.size_bytes,
        metadata=metadata_from_dict(row.metadata),
        created_at=row.created_at,
    )


def variant_values(variant: Variant, created_at: datetime) -> dict[str, Any]:
    """Return the variants row of a variant; created_at applies when variant.created_at is None."""
    stored_created_at = variant.created_at or created_at
    require_aware("created_at", stored_created_at)
    return {
        "variant_id": variant.variant_id,
        "model_name": variant.model_name,
        "model_version": variant.model_version,
        "kind": variant.kind,
        "format": variant.format,
        "precision": variant.precision,
        "digest": variant.digest,
        "size_bytes": variant.size_bytes,
        "metadata": metadata_to_dict(variant.metadata),
        "status": variant.status,
        "rejection_reason": variant.rejection_reason,
        "accuracy": variant.accuracy,
        "accuracy_metric": variant.accuracy_metric,
        "accuracy_drop": variant.accuracy_drop,
        "evaluation_samples": variant.evaluation_samples,
        "evaluation_digest": variant.evaluation_digest,
        "latency_ms": {str(key): float(value) for key, value in variant.latency_ms.items()},
        "source_latency_ms": {str(key): float(value) for key, value in variant.source_latency_ms.items()},
        "parent_variant_id": variant.parent_variant_id,
        "created_at": stored_created_at,
    }


def variant_from_row(row: Row[Any]) -> Variant:
    return Variant(
        variant_id=row.variant_id,
        model_name=row.model_name,
        model_version=row.model_version,
        kind=row.kind,
        format=row.format,
        precision=row.precision,
        digest=row.digest,
        size_bytes=row.size_bytes,
        metadata=metadata_from_dict(row.metadata),
        status=row.status,
        rejection_reason=row.rejection_reason,
        accuracy=row.accuracy,
        accuracy_metric=row.accuracy_metric,
        accuracy_drop=row.accuracy_drop,
        evaluation_samples=row.evaluation_samples or 0,
        evaluation_digest=row.evaluation_digest or "",
        latency_ms={str(key): float(value) for key, value in row.latency_ms.items()},
        source_latency_ms={str(key): float(value) for key, value in (row.source_latency_ms or {}).items()},
        parent_variant_id=row.parent_variant_id,
        created_at=row.created_at,
    )


def assignment_values(assignment: Assignment) -> dict[str, Any]:
    return {
        "device_id": assignment.device_id,
        "model_name": assignment.model_name,
        "model_version": assignment.model_version,
        "variant_id": assignment.variant_id,
        "digest": assignment.digest,
        "size_bytes": assignment.size_bytes,
        "format": assignment.format,
        "threads": assignment.threads,
        "rollout_id": assignment.rollout_id,
    }


def assignment_from_row(row: Row[Any]) -> Assignment:
    return Assignment(
        device_id=row.device_id,
        model_name=row.model_name,
        model_version=row.model_version,
        variant_id=row.variant_id,
        digest=row.digest,
        size_bytes=row.size_bytes,
        format=row.format,
        threads=row.threads,
        rollout_id=row.rollout_id,
    )


def status_values(status: ModelStatus, updated_at: datetime) -> dict[str, Any]:
    """Return the model_statuses row of a status; updated_at applies when status.updated_at is None."""
    stored_updated_at = status.updated_at or updated_at
    require_aware("updated_at", stored_updated_at)
    return {
        "device_id": status.device_id,
        "model_name": status.model_name,
        "model_version": status.model_version,
        "variant_id": status.variant_id,
        "digest": status.digest,
        "state": status.state,
        "error": status.error,
        "runtime": status.runtime,
        "providers": list(status.providers),
        "threads": status.threads,
        "updated_at": stored_updated_at,
    }


def status_from_row(row: Row[Any]) -> ModelStatus:
    return ModelStatus(
        device_id=row.device_id,
        model_name=row.model_name,
        model_version=row.model_version,
        variant_id=row.variant_id,
        digest=row.digest,
        state=row.state,
        error=row.error,
        runtime=row.runtime,
        providers=tuple(row.providers),
        threads=row.threads,
        updated_at=row.updated_at,
    )


def window_values(window: MetricWindow, batch_id: str) -> dict[str, Any]:
    require_aware("window_start", window.window_start)
    require_aware("received_at", window.received_at)
    return {
        "device_id": window.device_id,
        "batch_id": batch_id,
        "model_name": window.model_name,
        "model_version": window.model_version,
        "variant_id": window.variant_id,
        "hardware_class": window.hardware_class,
        "window_start": window.window_start,
        "window_seconds": window.window_seconds,
        "received_at": window.received_at,
        "inference_count": window.inference_count,
        "error_count": window.error_count,
        "sketch": bytes(window.sketch),
    }


def window_from_row(row: Row[Any]) -> MetricWindow:
    return MetricWindow(
        device_id=row.device_id,
        model_name=row.model_name,
        model_version=row.model_version,
        variant_id=row.variant_id,
        hardware_class=row.hardware_class,
        window_start=row.window_start,
        window_seconds=row.window_seconds,
        received_at=row.received_at,
        inference_count=row.inference_count,
        error_count=row.error_count,
        sketch=bytes(row.sketch),
    )
