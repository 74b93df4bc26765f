"""Device registration, reported state and fleet listing."""

from __future__ import annotations

import logging
import secrets
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import grpc

from edgefleet.common.errors import (
    AlreadyExists,
    EdgefleetError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    without_error_id,
)
from edgefleet.common.hardware import hardware_class_of
from edgefleet.common.serde import DEVICE_STATUS_NAMES, enum_to_name, hardware_from_proto, timestamp
from edgefleet.orchestrator import serde, validation
from edgefleet.orchestrator.domain import Device
from edgefleet.orchestrator.rollouts.reconcile import device_drift
from edgefleet.orchestrator.runtime_compat import parse_release
from edgefleet.orchestrator.state import OrchestratorState
from edgefleet.orchestrator.store.base import (
    DeleteBlockedError,
    DeviceRemovedError,
    FleetStates,
    IdentityMismatchError,
    NotFoundError,
    RemovedDevice,
)
from edgefleet.v1 import agent_pb2, operator_pb2

if TYPE_CHECKING:
    from edgefleet.orchestrator.security.auth import DeviceIdentity

log = logging.getLogger(__name__)

# Devices in one ListDevices page: about 2.5 MB of messages, under the 8 MiB message limit.
MAX_PAGE_SIZE = 10_000


def register(
    request: agent_pb2.RegisterRequest,
    state: OrchestratorState,
    peer: str,
    identity: DeviceIdentity | None = None,
) -> agent_pb2.RegisterResponse:
    """Validate and store a registration; a new device without an id gets one.

    identity is the caller from Security.identify: with TLS its certificate's device id is used, and
    its enrollment is checked (consuming the request's enrollment token when one is needed).
    Raises InvalidArgument for a malformed request and AlreadyExists when the id is registered
    with another instance key. Nothing is stored in either case, apart from the conflict record.
    Raises UNAUTHENTICATED or PERMISSION_DENIED errors from Security.admit.
    """
    validation.check_device_id(request.device_id, required=False)
    validation.check_instance_key(request.instance_key)
    if not request.HasField("hardware"):
        raise InvalidArgument("hardware", "missing; the agent sends its probed hardware profile")
    validation.check_hardware(request.hardware)
    validation.check_labels(request.labels)
    validation.check_text(request.agent_version, "agent_version", 64)
    try:
        hardware = hardware_from_proto(request.hardware)
    except ValueError as error:
        raise InvalidArgument("hardware", str(error)) from None
    # The class is derived here so that every device is grouped by the same rule.
    hardware = replace(hardware, hardware_class=hardware_class_of(hardware))

    instance_key_hash = serde.key_hash(request.instance_key)
    claimed_id = (identity.device_id if identity else "") or request.device_id
    readmitted: RemovedDevice | None = None
    if claimed_id:
        readmitted = _check_not_removed(claimed_id, instance_key_hash, request.enrollment_token, state, peer)
    if state.security is not None and identity is not None:
        state.security.admit(identity, request.enrollment_token, datetime.now(UTC), instance_key_hash, peer)
    device_id = claimed_id or f"dev-{secrets.token_hex(6)}"
    registered = state.store.get_device(device_id)
    rekeyed = registered is not None and registered.instance_key_hash != instance_key_hash
    token_rejected = ""
    if rekeyed and state.security is not None and identity is not None:
        # A device re-imaged with its enrolled certificate has a new instance key; a new token lets it in.
        token_rejected = state.security.rebind(identity, request.enrollment_token, datetime.now(UTC), instance_key_hash)
    try:
        device = state.store.register_device(
            device_id=device_id,
            instance_key_hash=instance_key_hash,
            hardware=hardware,
            labels=dict(request.labels),
            agent_version=request.agent_version,
            peer=peer,
            now=datetime.now(UTC),
            readmitted_removal=readmitted.removed_at if readmitted is not None else None,
        )
    except DeviceRemovedError as error:
        # An operator removed the device after _check_not_removed read the record. The removal wins,
        # so the agent gets the removal error that its next registration would get.
        log.warning(
            "rejected registration of device_id=%s from %s: the device was removed while it registered",
            device_id,
            peer,
        )
        raise removed_error(error.removed, state) from None
    except IdentityMismatchError:
        state.telemetry.rejected_registrations.labels("identity_conflict").inc()
        log.warning(
            "rejected registration of device_id=%s from %s: the id is registered with another instance key",
            device_id,
            peer,
        )
        if token_rejected:
            fix = f"it presented an enrollment token that cannot rebind the id: {token_rejected}"
        elif state.security is not None and state.security.tls:
            fix = (
                "if this is a re-imaged or replaced device, start it once with a new enrollment token "
                f"(`edgefleet enroll create --device-id {device_id}`), which rebinds the id to it"
            )
        else:
            fix = "give this agent another device id, or restore the state directory of the agent that registered it"
        raise AlreadyExists(
            f"device id {device_id!r} is already registered by another agent (different instance key); {fix}"
        ) from None
    state.hub.heartbeat(device.device_id)
    state.telemetry.registrations.inc()
    if registered is not None:
        from edgefleet.orchestrator.handlers.deploy import replan_for_hardware

        # The agent fetches the new desired state when its control stream opens.
        replan_for_hardware(device, state)
    log.info(
        "registered device_id=%s class=%s profile=%s from %s",
        device.device_id,
        hardware.hardware_class,
        hardware.profile_name or "-",
        peer,
    )
    for runtime in hardware.runtimes:
        if parse_release(runtime.version) is None:
            log.warning(
                "device_id=%s reports %s version %r, which does not parse as MAJOR.MINOR[.PATCH]; variant "
                "selection treats it as unknown and cannot check which opsets or models it loads",
                device.device_id,
                runtime.name,
                runtime.version,
            )
    response = agent_pb2.RegisterResponse(
        device_id=device.device_id,
        heartbeat_interval_seconds=max(1, round(state.config.heartbeat_interval_s)),
        server_time=timestamp(datetime.now(UTC)),
    )
    if state.security is not None:
        response.trusted_keys.CopyFrom(state.security.signer.key_set())
    return response


def _uses_tls(state: OrchestratorState) -> bool:
    return state.security is not None and state.security.tls


def removed_error(removed: RemovedDevice, state: OrchestratorState) -> EdgefleetError:
    """Return the PERMISSION_DENIED error that an agent of a removed device gets, naming how to add it back.

    The agent treats PERMISSION_DENIED as fatal, so it exits instead of reconnecting in a loop.
    """
    if _uses_tls(state):
        fix = (
            "to add it back, create an enrollment token with "
            f"`edgefleet enroll create --device-id {removed.device_id}` and start the agent with --enrollment-token"
        )
    else:
        fix = (
            "to add this machine back as a new device, delete identity.json in the agent's state directory "
            "(--state-dir) and start the agent again"
        )
    return EdgefleetError(
        f"device {removed.device_id!r} was removed from the fleet at {removed.removed_at:%Y-%m-%dT%H:%M:%SZ}; {fix}",
        code=grpc.StatusCode.PERMISSION_DENIED,
    )


def _check_not_removed(
    device_id: str, instance_key_hash: str, enrollment_token: str, state: OrchestratorState, peer: str
) -> RemovedDevice | None:
    """Reject a registration that presents a removed device's credentials, and return the removal it readmits.

    With TLS only a new enrollment token readmits the id, because the removal deleted its credential.
    Without TLS the instance key is the only credential, so an agent with another key may take the id.
    Returns None for an id that is not removed. Store.register_device checks the removal again in its
    transaction, so a removal that commits after this check rejects the registration there.
    """
    removed = state.store.get_removed_device(device_id)
    if removed is None:
        return None
    readmitted = bool(enrollment_token) if _uses_tls(state) else removed.instance_key_hash != instance_key_hash
    if readmitted:
        log.info("device_id=%s was removed at %s and registers again from %s", device_id, removed.removed_at, peer)
        return removed
    log.warning("rejected registration of the removed device_id=%s from %s", device_id, peer)
    raise removed_error(removed, state)


def reject_if_removed(device_id: str, state: OrchestratorState) -> None:
    """Raise removed_error when an operator removed device_id; for calls of agents that found no device."""
    removed = state.store.get_removed_device(device_id)
    if removed is not None:
        raise removed_error(removed, state)


def verify_identity(device_id: str, instance_key: str, state: OrchestratorState, peer: str) -> Device:
    """Check that a control stream comes from the agent that registered device_id."""
    validation.check_device_id(device_id, "hello.device_id")
    validation.check_instance_key(instance_key)
    device = state.store.get_device(device_id)
    if device is None:
        reject_if_removed(device_id, state)
        raise NotFound(f"device {device_id!r} is not registered; call Register before opening the control stream")
    if device.instance_key_hash != serde.key_hash(instance_key):
        log.warning("rejected control stream of device_id=%s from %s: instance key mismatch", device_id, peer)
        raise AlreadyExists(f"device id {device_id!r} belongs to another agent (different instance key)")
    return device


def save_reported_state(device_id: str, message: agent_pb2.ReportedState, state: OrchestratorState) -> None:
    if len(message.models) > 256:
        raise InvalidArgument("reported_state.models", f"has {len(message.models)} entries; at most 256")
    try:
        statuses = [serde.model_status_from_proto(device_id, m, i) for i, m in enumerate(message.models)]
        trusted_keys = serde.trusted_keys_from_proto(message.trusted_keys) if message.HasField("trusted_keys") else None
    except ValueError as error:
        raise InvalidArgument("reported_state", str(error)) from None
    # Agents send their whole state on every change, so a failure stays in each report until it is
    # fixed. Only a failure that is new or changed is logged, once. A download that fails on an INTERNAL
    # error of this orchestrator reports a new error id with each retry, which does not count as a change.
    logged_before = {
        (s.model_name, s.variant_id, without_error_id(s.error))
        for s in state.store.get_reported_state(device_id)
        if s.state == "failed"
    }
    try:
        state.store.save_reported_state(
            device_id, message.desired_generation, statuses, datetime.now(UTC), trusted_keys=trusted_keys
        )
    except NotFoundError:
        # Another orchestrator process removed the device while this process still has its stream open.
        reject_if_removed(device_id, state)
        raise NotFound(f"device {device_id!r} is not registered; register it again") from None
    for status in statuses:
        failure = (status.model_name, status.variant_id, without_error_id(status.error))
        if status.state == "failed" and failure not in logged_before:
            log.warning(
                "device_id=%s reports model=%s variant=%s failed: %s",
                device_id,
                status.model_name,
                status.variant_id,
                status.error,
            )


def describe_device(
    device: Device,
    state: OrchestratorState,
    fleet: FleetStates | None = None,
    revoked: frozenset[str] | None = None,
) -> operator_pb2.Device:
    """Build a Device message; pass fleet (from Store.fleet_states) and revoked when describing many devices."""
    if fleet is None:
        desired = state.store.get_desired_state(device.device_id)[1]
        reported = state.store.get_reported_state(device.device_id)
        conflicts = state.store.list_identity_conflicts(device.device_id)
    else:
        desired = fleet.desired.get(device.device_id, [])
        reported = fleet.reported.get(device.device_id, [])
        conflicts = fleet.conflicts.get(device.device_id, [])
    message = serde.device_to_proto(
        device,
        status=state.hub.status_of(device),
        reported=reported,
        desired=desired,
        conflicts=conflicts,
    )
    message.clock_skew_seconds = state.hub.clock_skew_s.get(device.device_id, 0.0)
    message.clock_skewed = state.hub.is_clock_skewed(device.device_id)
    message.drift.extend(operator_pb2.Drift(**asdict(d)) for d in device_drift(device, desired, reported))
    message.revoked = device.device_id in (revoked if revoked is not None else state.revoked_device_ids())
    return message


def list_devices(
    request: operator_pb2.ListDevicesRequest, state: OrchestratorState
) -> operator_pb2.ListDevicesResponse:
    requested_status = ""
    if request.status:
        try:
            requested_status = enum_to_name(request.status, DEVICE_STATUS_NAMES, "status")
        except ValueError as error:
            raise InvalidArgument("status", str(error)) from None
    validation.check_labels(request.label_selector, "label_selector")
    if request.page_size > MAX_PAGE_SIZE:
        raise InvalidArgument("page_size", f"{request.page_size} is over the maximum of {MAX_PAGE_SIZE}")
    # The page token is the last device id of the previous page: devices are listed in id order.
    if request.page_token:
        validation.check_device_id(request.page_token, "page_token")
    page_size = request.page_size or MAX_PAGE_SIZE
    devices: list[operator_pb2.Device] = []
    fleet = state.store.fleet_states()
    revoked = state.revoked_device_ids()
    next_token = ""
    for device in sorted(state.store.list_devices(), key=lambda d: d.device_id):
        if device.device_id <= request.page_token:
            continue
        if len(devices) == page_size:
            next_token = devices[-1].device_id
            break
        if requested_status and state.hub.status_of(device) != requested_status:
            continue
        if any(device.labels.get(k) != v for k, v in request.label_selector.items()):
            continue
        if request.hardware_class and device.hardware.hardware_class != request.hardware_class:
            continue
        described = describe_device(device, state, fleet, revoked)
        if request.drift_only and not described.drift:
            continue
        devices.append(described)
    return operator_pb2.ListDevicesResponse(devices=devices, next_page_token=next_token)


def get_device(request: operator_pb2.GetDeviceRequest, state: OrchestratorState) -> operator_pb2.Device:
    validation.check_device_id(request.device_id)
    device = state.store.get_device(request.device_id)
    if device is None:
        raise device_not_found(request.device_id, state)
    return describe_device(device, state)


def device_not_found(device_id: str, state: OrchestratorState) -> NotFound:
    """Return the NotFound error for a device id that is not registered: removed, or with the closest known ids."""
    removed = state.store.get_removed_device(device_id)
    if removed is not None:
        return NotFound(
            f"device {device_id!r} was removed from the fleet at {removed.removed_at:%Y-%m-%dT%H:%M:%SZ}; "
            f"its metrics stay queryable with `edgefleet metrics query --device {device_id}`"
        )
    return unknown_device(device_id, state)


def unknown_device(device_id: str, state: OrchestratorState) -> NotFound:
    """Return the NotFound error for a device id that was never registered, with the closest known ids."""
    known = [d.device_id for d in state.store.list_devices()]
    return NotFound(f"device {device_id!r} not found{suggest(device_id, known, DEVICES_LISTING)}")


# CLI commands that list the known ids, for not-found errors.
DEVICES_LISTING = "edgefleet devices list"
MODELS_LISTING = "edgefleet models list"
ROLLOUTS_LISTING = "edgefleet rollout list"


def suggest(value: str, known: list[str], listing: str = "") -> str:
    """Return '; did you mean ...?' for up to three known names within a few edits of value.

    A name is close when its edit distance from value (insertions, deletions, substitutions and swaps
    of adjacent characters) is at most a quarter of value's length, and at least 1. So
    'dev-6cfbfb36dd7' finds 'dev-6cfbfb36dd7f' but not 'dev-cb5b1982288d', which shares only the
    prefix; a similarity ratio with a cutoff would suggest that unrelated device. With no close name
    it returns '; list them with `LISTING`' when listing names the CLI command that lists the known
    names, and an empty string otherwise.
    """
    max_edits = max(1, len(value) // 4)

    def edit_distance(name: str) -> int:
        # Optimal string alignment distance, the Levenshtein distance with adjacent swaps, row by row.
        before, previous = [0] * (len(name) + 1), list(range(len(name) + 1))
        for i, char in enumerate(value, 1):
            current = [i] + [0] * len(name)
            for j, other in enumerate(name, 1):
                current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != other))
                if i > 1 and j > 1 and char == name[j - 2] and value[i - 2] == other:
                    current[j] = min(current[j], before[j - 2] + 1)
            before, previous = previous, current
        return previous[-1]

    distances: dict[str, int] = {}
    for name in known:
        # Names whose length differs by more than max_edits are further away, so skip computing it.
        if name != value and abs(len(name) - len(value)) <= max_edits:
            distance = edit_distance(name)
            if distance <= max_edits:
                distances[name] = distance
    close = sorted(distances, key=lambda name: (distances[name], name))[:3]
    if close:
        return f"; did you mean {', '.join(close)}?"
    return f"; list them with `{listing}`" if listing else ""


def remove_device(
    request: operator_pb2.RemoveDeviceRequest, state: OrchestratorState
) -> operator_pb2.RemoveDeviceResponse:
    """Remove a device from the fleet and close its control stream on this process.

    Raises NotFound for an unknown device and FailedPrecondition, removing nothing, when a rollout in
    progress includes it and force is not set.
    """
    validation.check_device_id(request.device_id)
    device_id = request.device_id
    try:
        removal = state.store.remove_device(device_id, datetime.now(UTC), force=request.force)
    except NotFoundError:
        removed = state.store.get_removed_device(device_id)
        if removed is not None:
            raise NotFound(
                f"device {device_id!r} was already removed at {removed.removed_at:%Y-%m-%dT%H:%M:%SZ}"
            ) from None
        raise unknown_device(device_id, state) from None
    except DeleteBlockedError as error:
        raise FailedPrecondition(str(error)) from None
    if state.security is not None:
        state.security.forget(device_id)
    session = state.hub.sessions.get(device_id)
    if session is not None and state.hub.loop is not None:
        state.hub.loop.call_soon_threadsafe(session.close, "an operator removed the device")
    log.warning(
        "removed device_id=%s%s%s",
        device_id,
        f"; rollouts {', '.join(removal.rollout_ids)} in progress go on without it" if removal.rollout_ids else "",
        "; closing its control stream" if session is not None else "",
    )
    return operator_pb2.RemoveDeviceResponse(
        device_id=device_id,
        stream_closed=session is not None,
        rollout_ids=removal.rollout_ids,
        removed_at=timestamp(removal.removed.removed_at),
    )
