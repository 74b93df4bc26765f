"""Conversions between the orchestrator's domain records and edgefleet.v1 messages."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

from edgefleet.common.models import PRECISIONS
from edgefleet.common.serde import (
    DEVICE_STATUS_NAMES,
    MODEL_STATE_NAMES,
    enum_to_name,
    format_to_proto,
    from_timestamp,
    hardware_to_proto,
    metadata_to_proto,
    name_to_enum,
    timestamp,
)
from edgefleet.orchestrator.domain import (
    Assignment,
    Device,
    IdentityConflict,
    ModelStatus,
    ModelVersion,
    Variant,
)
from edgefleet.v1 import agent_pb2, operator_pb2

# A key set contains the active key and the keys not yet retired, far fewer than this in practice.
MAX_TRUSTED_KEYS = 64
KEY_ID = re.compile(r"[0-9a-f]{16}")

def key_hash(instance_key: str) -> str:
    return hashlib.sha256(instance_key.encode()).hexdigest()


def assignment_to_proto(assignment: Assignment) -> agent_pb2.ModelAssignment:
    return agent_pb2.ModelAssignment(
        model_name=assignment.model_name,
        model_version=assignment.model_version,
        variant_id=assignment.variant_id,
        digest=assignment.digest,
        size_bytes=assignment.size_bytes,
        format=format_to_proto(assignment.format),
        threads=assignment.threads,
    )


def desired_state_message(generation: int, assignments: Sequence[Assignment]) -> agent_pb2.OrchestratorMessage:
    return agent_pb2.OrchestratorMessage(
        command_id=f"desired-{generation}",
        desired_state=agent_pb2.DesiredState(
            generation=generation, models=[assignment_to_proto(a) for a in assignments]
        ),
    )


def model_status_to_proto(status: ModelStatus) -> agent_pb2.ModelStatus:
    return agent_pb2.ModelStatus(
        model_name=status.model_name,
        model_version=status.model_version,
        variant_id=status.variant_id,
        digest=status.digest,
        state=name_to_enum(status.state, MODEL_STATE_NAMES),
        error=status.error,
        runtime=status.runtime,
        providers=list(status.providers),
        threads=status.threads,
        updated_at=timestamp(status.updated_at),
    )


def model_status_from_proto(device_id: str, message: agent_pb2.ModelStatus, index: int) -> ModelStatus:
    """Convert one reported model; raise ValueError naming the field for an unknown state."""
    return ModelStatus(
        device_id=device_id,
        model_name=message.model_name,
        model_version=message.model_version,
        variant_id=message.variant_id,
        digest=message.digest,
        state=enum_to_name(message.state, MODEL_STATE_NAMES, f"reported_state.models[{index}].state"),
        error=message.error,
        runtime=message.runtime,
        providers=tuple(message.providers),
        threads=message.threads,
        updated_at=from_timestamp(message.updated_at),
    )


def conflict_to_proto(conflict: IdentityConflict) -> operator_pb2.IdentityConflict:
    return operator_pb2.IdentityConflict(
        instance_key_fingerprint=conflict.key_fingerprint,
        peer=conflict.peer,
        seen_at=timestamp(conflict.seen_at),
    )


def device_to_proto(
    device: Device,
    *,
    status: str,
    reported: Sequence[ModelStatus] = (),
    desired: Sequence[Assignment] = (),
    conflicts: Sequence[IdentityConflict] = (),
) -> operator_pb2.Device:
    return operator_pb2.Device(
        device_id=device.device_id,
        status=name_to_enum(status, DEVICE_STATUS_NAMES),
        hardware=hardware_to_proto(device.hardware),
        labels=device.labels,
        agent_version=device.agent_version,
        registered_at=timestamp(device.registered_at),
        last_seen=timestamp(device.last_seen),
        models=[model_status_to_proto(s) for s in reported],
        desired=[assignment_to_proto(a) for a in desired],
        desired_generation=device.desired_generation,
        reported_generation=device.reported_generation,
        identity_conflicts=[conflict_to_proto(c) for c in conflicts],
        profile_revisions=device.profile_revisions,
        trusted_key_set_version=device.trusted_key_set_version or 0,
        trusted_key_ids=device.trusted_key_ids,
    )


def trusted_keys_from_proto(message: agent_pb2.TrustedKeysReport) -> tuple[int, list[str]]:
    """Return the key set version and key ids of an agent's report; raise ValueError for invalid ids."""
    key_ids = list(message.key_ids)
    if len(key_ids) > MAX_TRUSTED_KEYS:
        raise ValueError(f"trusted_keys.key_ids has {len(key_ids)} ids; at most {MAX_TRUSTED_KEYS}")
    for key_id in key_ids:
        if not KEY_ID.fullmatch(key_id):
            raise ValueError(f"trusted_keys.key_ids has {key_id!r}, which is not a key id (16 lowercase hex digits)")
    return message.version, key_ids


def variant_to_proto(variant: Variant) -> operator_pb2.Variant:
    return operator_pb2.Variant(
        variant_id=variant.variant_id,
        model_name=variant.model_name,
        model_version=variant.model_version,
        kind=variant.kind,
        format=format_to_proto(variant.format),
        precision=name_to_enum(variant.precision, PRECISIONS),
        digest=variant.digest,
        size_bytes=variant.size_bytes,
        metadata=metadata_to_proto(variant.metadata),
        status=variant.status,
        rejection_reason=variant.rejection_reason,
        accuracy=math.nan if variant.accuracy is None else variant.accuracy,
        accuracy_metric=variant.accuracy_metric,
        accuracy_drop=math.nan if variant.accuracy_drop is None else variant.accuracy_drop,
        evaluation_samples=variant.evaluation_samples,
        evaluation_digest=variant.evaluation_digest,
        latency_ms=variant.latency_ms,
        source_latency_ms=variant.source_latency_ms,
        parent_variant_id=variant.parent_variant_id,
        created_at=timestamp(variant.created_at),
    )


def model_to_proto(model: ModelVersion, variants: Sequence[Variant] = ()) -> operator_pb2.Model:
    return operator_pb2.Model(
        name=model.name,
        version=model.version,
        digest=model.digest,
        size_bytes=model.size_bytes,
        metadata=metadata_to_proto(model.metadata),
        created_at=timestamp(model.created_at),
        variants=[variant_to_proto(v) for v in variants],
    )
