"""Handlers of the admin calls: enrollment tokens, device revocation, API tokens and signing keys."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta

from edgefleet.common.errors import FailedPrecondition, InvalidArgument, NotFound
from edgefleet.common.serde import timestamp
from edgefleet.orchestrator import serde, validation
from edgefleet.orchestrator.domain import Device
from edgefleet.orchestrator.handlers.devices import unknown_device
from edgefleet.orchestrator.security import tokens
from edgefleet.orchestrator.security.auth import Security
from edgefleet.orchestrator.security.store import (
    ENROLLMENT_TOKEN_ID_LENGTH,
    ApiTokenRecord,
    EnrollmentTokenRecord,
    LastAdminTokenError,
)
from edgefleet.orchestrator.state import OrchestratorState
from edgefleet.orchestrator.store.base import NotFoundError, StoreError
from edgefleet.v1 import operator_pb2

log = logging.getLogger(__name__)


def security_of(state: OrchestratorState) -> Security:
    """Return the state's Security; raise FailedPrecondition when the orchestrator runs without one."""
    if state.security is None:
        raise FailedPrecondition("security is not set up on this orchestrator; start it with edgefleet-orchestrator")
    return state.security


def create_enrollment_token(
    request: operator_pb2.CreateEnrollmentTokenRequest, state: OrchestratorState
) -> operator_pb2.CreateEnrollmentTokenResponse:
    validation.check_device_id(request.device_id)
    security = security_of(state)
    ttl = timedelta(seconds=request.ttl_seconds) if request.ttl_seconds else tokens.DEFAULT_ENROLLMENT_TTL
    now = datetime.now(UTC)
    secret, expires_at = tokens.create_enrollment_token(security.store, request.device_id, ttl, now)
    return operator_pb2.CreateEnrollmentTokenResponse(
        token=secret,
        device_id=request.device_id,
        created_at=timestamp(now),
        expires_at=timestamp(expires_at),
        token_id=tokens.hash_secret(secret)[:ENROLLMENT_TOKEN_ID_LENGTH],
    )


def enrollment_token_to_proto(record: EnrollmentTokenRecord) -> operator_pb2.EnrollmentToken:
    message = operator_pb2.EnrollmentToken(
        token_id=record.token_id,
        device_id=record.device_id,
        created_at=timestamp(record.created_at),
        expires_at=timestamp(record.expires_at),
    )
    if record.used_at is not None:
        message.used_at.CopyFrom(timestamp(record.used_at))
    return message


def list_enrollment_tokens(
    request: operator_pb2.ListEnrollmentTokensRequest, state: OrchestratorState
) -> operator_pb2.ListEnrollmentTokensResponse:
    if request.device_id:
        validation.check_device_id(request.device_id)
    records = security_of(state).store.list_enrollment_tokens(request.device_id)
    return operator_pb2.ListEnrollmentTokensResponse(tokens=[enrollment_token_to_proto(r) for r in records])


def revoke_enrollment_token(
    request: operator_pb2.RevokeEnrollmentTokenRequest, state: OrchestratorState
) -> operator_pb2.EnrollmentToken:
    """Delete an unused enrollment token; raise NotFound or FailedPrecondition naming the fix."""
    token_id = request.token_id.lower()
    if not re.fullmatch(f"[0-9a-f]{{{ENROLLMENT_TOKEN_ID_LENGTH}}}", token_id):
        raise InvalidArgument(
            "token_id",
            f"{request.token_id!r} is not an enrollment token id ({ENROLLMENT_TOKEN_ID_LENGTH} hex digits); "
            "list them with `edgefleet enroll list`",
        )
    try:
        record = security_of(state).store.revoke_enrollment_token(token_id)
    except NotFoundError as error:
        raise NotFound(str(error)) from None
    except StoreError as error:
        raise FailedPrecondition(str(error)) from None
    log.warning("revoked the unused enrollment token %s of device_id=%s", record.token_id, record.device_id)
    return enrollment_token_to_proto(record)


def revoke_device(
    request: operator_pb2.RevokeDeviceRequest, state: OrchestratorState
) -> operator_pb2.RevokeDeviceResponse:
    """Revoke a device and close its control stream on this process. Its next connection is rejected.

    Raises NotFound, with the closest registered ids, for an id that is neither a registered device nor
    named by an unused enrollment token, so a mistyped id does not report success while the device stays
    trusted.
    """
    validation.check_device_id(request.device_id)
    validation.check_text(request.reason, "reason", 256)
    security = security_of(state)
    _check_revocable(request.device_id, security, state)
    security.revoke(request.device_id, request.reason)
    session = state.hub.sessions.get(request.device_id)
    if session is not None and state.hub.loop is not None:
        state.hub.loop.call_soon_threadsafe(session.close, "the device was revoked")
    log.warning(
        "revoked device_id=%s (%s)%s",
        request.device_id,
        request.reason or "no reason given",
        "; closing its control stream" if session is not None else "",
    )
    return operator_pb2.RevokeDeviceResponse(device_id=request.device_id, stream_closed=session is not None)


def _check_revocable(device_id: str, security: Security, state: OrchestratorState) -> None:
    if state.store.get_device(device_id) is not None:
        return
    # An unused token lets the id enroll, so revoking it before its first registration is allowed.
    if any(token.used_at is None for token in security.store.list_enrollment_tokens(device_id)):
        return
    removed = state.store.get_removed_device(device_id)
    if removed is not None:
        raise NotFound(
            f"device {device_id!r} was removed from the fleet at {removed.removed_at:%Y-%m-%dT%H:%M:%SZ}, "
            "which already deleted its credential and unused enrollment tokens; there is nothing to revoke"
        )
    raise unknown_device(device_id, state)


def token_to_proto(record: ApiTokenRecord) -> operator_pb2.ApiToken:
    message = operator_pb2.ApiToken(
        token_id=record.token_id, name=record.name, role=record.role, created_at=timestamp(record.created_at)
    )
    if record.revoked_at is not None:
        message.revoked_at.CopyFrom(timestamp(record.revoked_at))
    return message


def create_api_token(
    request: operator_pb2.CreateApiTokenRequest, state: OrchestratorState
) -> operator_pb2.CreateApiTokenResponse:
    record, secret = tokens.create_api_token(security_of(state).store, request.name, request.role, datetime.now(UTC))
    return operator_pb2.CreateApiTokenResponse(token=token_to_proto(record), secret=secret)


def list_api_tokens(
    request: operator_pb2.ListApiTokensRequest, state: OrchestratorState
) -> operator_pb2.ListApiTokensResponse:
    return operator_pb2.ListApiTokensResponse(
        tokens=[token_to_proto(r) for r in security_of(state).store.list_api_tokens()]
    )


def revoke_api_token(request: operator_pb2.RevokeApiTokenRequest, state: OrchestratorState) -> operator_pb2.ApiToken:
    if not request.token_id:
        raise InvalidArgument("token_id", "missing; list the tokens with `edgefleet tokens list`")
    security = security_of(state)
    try:
        record = security.store.revoke_api_token(request.token_id, datetime.now(UTC))
    except NotFoundError as error:
        raise NotFound(str(error)) from None
    except LastAdminTokenError as error:
        raise FailedPrecondition(str(error)) from None
    security.forget()
    log.warning("revoked API token %s (%s)", record.token_id, record.name)
    return token_to_proto(record)


def list_signing_keys(
    request: operator_pb2.ListSigningKeysRequest | None, state: OrchestratorState
) -> operator_pb2.ListSigningKeysResponse:
    version, keys = security_of(state).signer.keys()
    devices = _trusting_devices(state)
    return operator_pb2.ListSigningKeysResponse(
        keys=[
            operator_pb2.SigningKeyInfo(
                key_id=k.key_id,
                public_key=k.public_key,
                created_at=timestamp(k.created_at),
                active=index == len(keys) - 1,
                trusted_by=sum(k.key_id in d.trusted_key_ids for d in devices),
            )
            for index, k in enumerate(keys)
        ],
        key_set_version=version,
        devices=len(devices),
        behind=[_device_keys(d) for d in devices if (d.trusted_key_set_version or 0) < version],
    )


def _trusting_devices(state: OrchestratorState) -> list[Device]:
    """Return the registered devices that are not revoked: those that must keep trusting a signing key."""
    revoked = state.revoked_device_ids()
    return [d for d in state.store.list_devices() if d.device_id not in revoked]


def _device_keys(device: Device) -> operator_pb2.DeviceKeys:
    return operator_pb2.DeviceKeys(
        device_id=device.device_id,
        trusted_key_set_version=device.trusted_key_set_version or 0,
        trusted_key_ids=device.trusted_key_ids,
        last_seen=timestamp(device.last_seen),
    )


def rotate_signing_key(
    request: operator_pb2.RotateSigningKeyRequest, state: OrchestratorState
) -> operator_pb2.ListSigningKeysResponse:
    """Add a signing key and send the new key set to the devices connected to this process.

    Agents adopt a key set only from a desired state signed by a key they trust. Without the push, an
    online device would learn the new key only with its next deploy, and retiring the old key before
    then would leave it trusting no key at all.
    """
    key = security_of(state).signer.rotate(datetime.now(UTC))
    sent = _send_key_set(state)
    log.info("rotated to signing key %s; sent the new key set to %d connected devices", key.key_id, sent)
    return list_signing_keys(None, state)


def retire_signing_key(
    request: operator_pb2.RetireSigningKeyRequest, state: OrchestratorState
) -> operator_pb2.ListSigningKeysResponse:
    """Retire a signing key and send the key set without it to the devices connected to this process.

    A key is often retired because it leaked. Without the push, an online device would keep
    accepting assignments signed by it until its next deploy.
    """
    if not request.key_id:
        raise InvalidArgument("key_id", "missing; list the keys with `edgefleet keys list`")
    security = security_of(state)
    stranded = _stranded_devices(request.key_id, security, state)
    if stranded and not request.force:
        raise FailedPrecondition(
            f"retiring signing key {request.key_id} would leave {_describe_stranded(stranded)}. "
            f"{_stranded_fix(stranded)}"
        )
    try:
        security.signer.retire(request.key_id, datetime.now(UTC))
    except NotFoundError as error:
        raise NotFound(str(error)) from None
    if stranded:
        log.warning(
            "retired signing key %s with --force, leaving %s; a device that rejects the new key set must be "
            "enrolled again",
            request.key_id,
            _describe_stranded(stranded),
        )
    sent = _send_key_set(state)
    log.info("sent the key set without retired key %s to %d connected devices", request.key_id, sent)
    return list_signing_keys(None, state)


def _stranded_devices(key_id: str, security: Security, state: OrchestratorState) -> list[Device]:
    """Return the devices that would trust none of the signing keys left after retiring key_id.

    An agent adopts a key set only when a key it already trusts signed it, so such a device would reject
    every later key set and assignment until it is enrolled again. A device that has not reported its
    keys counts, because nothing shows that it learned a successor. Returns [] for the active key and
    for unknown keys, which the signer rejects.
    """
    _, keys = security.signer.keys()
    if key_id not in {k.key_id for k in keys[:-1]}:
        return []
    remaining = {k.key_id for k in keys if k.key_id != key_id}
    return [d for d in _trusting_devices(state) if not remaining.intersection(d.trusted_key_ids)]


def _describe_stranded(devices: list[Device], limit: int = 5) -> str:
    """Describe the devices that trust none of the remaining keys, then those that never reported keys.

    Agents of earlier releases send no key report, so a device without one may have learned the
    successor all the same. Such devices are named apart.
    """
    trusting = [d for d in devices if d.trusted_key_set_version is not None]
    unreported = [d for d in devices if d.trusted_key_set_version is None]
    parts = []
    if trusting:
        listed = ", ".join(f"{d.device_id} (trusts {', '.join(d.trusted_key_ids)})" for d in trusting[:limit])
        parts.append(f"{_devices(len(trusting))} trusting none of the remaining keys: {listed}{_more(trusting, limit)}")
    if unreported:
        listed = ", ".join(d.device_id for d in unreported[:limit])
        parts.append(
            f"{_devices(len(unreported))} that never reported {'its' if len(unreported) == 1 else 'their'} keys "
            f"(agents of earlier releases do not): {listed}{_more(unreported, limit)}"
        )
    return "; and ".join(parts)


def _stranded_fix(devices: list[Device]) -> str:
    """Return what the operator can do about the devices that block a key retirement."""
    steps = []
    if any(d.trusted_key_set_version is not None for d in devices):
        steps.append(
            "Wait until the devices trusting none of the remaining keys connect and report the new key "
            "(`edgefleet keys list` shows the devices behind)."
        )
    if any(d.trusted_key_set_version is None for d in devices):
        steps.append(
            "Upgrade the agents that never reported their keys, which then report them. An agent of an "
            "earlier release that was connected when the new key was added has learned it, so retiring with "
            "--force is safe for such a device."
        )
    steps.append("Pass --force to retire anyway, and enroll again each device that then rejects the new key set.")
    return " ".join(steps)


def _devices(count: int) -> str:
    return f"{count} device" if count == 1 else f"{count} devices"


def _more(devices: list[Device], limit: int) -> str:
    return f" and {len(devices) - limit} more" if len(devices) > limit else ""


def _send_key_set(state: OrchestratorState) -> int:
    """Push each connected device's desired state, which carries the current key set; return the count sent."""
    sent = 0
    for device_id in list(state.hub.sessions):
        generation, assignments = state.store.get_desired_state(device_id)
        sent += state.hub.push_threadsafe(device_id, serde.desired_state_message(generation, assignments))
    return sent
