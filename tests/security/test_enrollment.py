"""Enrollment tokens bind a device id to its certificate once; revocation closes and refuses a device."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from edgefleet.cli.main import main as cli_main
from edgefleet.orchestrator.security.store import EnrollmentRejected, SqlSecurityStore
from edgefleet.orchestrator.security.tokens import hash_secret
from edgefleet.orchestrator.store.base import NotFoundError, StoreError
from edgefleet.orchestrator.store.engine import create_store_engine, upgrade_to_head
from edgefleet.v1 import agent_pb2, operator_pb2
from tests.security.helpers import SecureOrchestrator
from tests.servers import STEP_TIMEOUT_S, ControlStream, linear_onnx, register_request, upload_requests

pytest_plugins = ["tests.servers", "tests.security.helpers"]

StartSecure = Callable[..., SecureOrchestrator]


def register(orchestrator: SecureOrchestrator, device_id: str, token: str, instance_key: str = "") -> str:
    """Register device_id with its own certificate and token; return the instance key."""
    request = register_request(device_id, instance_key)
    request.enrollment_token = token
    orchestrator.agent(device_id).Register(request, timeout=STEP_TIMEOUT_S)
    return request.instance_key


def register_error(orchestrator: SecureOrchestrator, device_id: str, token: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        register(orchestrator, device_id, token)
    return raised.value


def test_enroll_needs_token(start_secure: StartSecure) -> None:
    orchestrator = start_secure()

    error = register_error(orchestrator, "cam-1", "")

    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "edgefleet enroll create --device-id cam-1" in (error.details() or "")


def test_enroll_without_token_logged_once(start_secure: StartSecure, caplog: pytest.LogCaptureFixture) -> None:
    """An unenrolled device that retries without a token gets one warning with its id and address."""
    orchestrator = start_secure()
    caplog.set_level(logging.WARNING, logger="edgefleet.orchestrator.security.auth")

    for _ in range(3):
        register_error(orchestrator, "cam-1", "")
    register_error(orchestrator, "cam-2", "")

    rejections = [record for record in caplog.records if "rejected the registration" in record.getMessage()]
    assert [record.levelno for record in rejections] == [logging.WARNING, logging.WARNING]
    first, second = (record.getMessage() for record in rejections)
    assert "device_id=cam-1 from ipv4:127.0.0.1:" in first
    assert "the device is not enrolled and it presented no enrollment token" in first
    assert "edgefleet enroll create --device-id cam-1" in first
    assert "device_id=cam-2 from ipv4:127.0.0.1:" in second


def test_enroll_token_single_use(start_secure: StartSecure) -> None:
    orchestrator = start_secure()
    token = orchestrator.enrollment_token("cam-1")
    register(orchestrator, "cam-1", token)
    rogue_key = orchestrator.pki.directory / "devices" / "cam-1.pem"
    rogue_key.unlink()
    rogue_key.with_suffix(".key").unlink()

    # A second certificate for the same id cannot reuse the token.
    error = register_error(orchestrator, "cam-1", token)

    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "already used" in (error.details() or "")


def test_enroll_reregister_without_token(start_secure: StartSecure) -> None:
    orchestrator = start_secure()
    key = register(orchestrator, "cam-1", orchestrator.enrollment_token("cam-1"))

    register(orchestrator, "cam-1", "", instance_key=key)


def test_enroll_token_other_device(start_secure: StartSecure) -> None:
    orchestrator = start_secure()
    token = orchestrator.enrollment_token("cam-2")

    error = register_error(orchestrator, "cam-1", token)

    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "created for device 'cam-2'" in (error.details() or "")


def test_enroll_token_expired(db_url: str) -> None:
    engine = create_store_engine(db_url)
    upgrade_to_head(engine)
    store = SqlSecurityStore(engine, owns_engine=True)
    created = datetime(2026, 1, 1, tzinfo=UTC)
    store.add_enrollment_token(hash_secret("efe_old"), "cam-1", created, created + timedelta(hours=1))

    with pytest.raises(EnrollmentRejected) as rejected:
        store.enroll(hash_secret("efe_old"), "cam-1", "f" * 64, created + timedelta(hours=2))
    store.close()

    assert rejected.value.reason == "expired"


def test_enroll_token_bad_ttl(start_secure: StartSecure) -> None:
    orchestrator = start_secure()

    with pytest.raises(grpc.RpcError) as raised:
        orchestrator.enrollment_token("cam-1", ttl_seconds=90 * 86400)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "7776000 s (90 days) is out of range" in raised.value.details()
    assert "at most 30 days (--ttl 30d)" in raised.value.details()


def test_enroll_store_single_use(db_url: str) -> None:
    engine = create_store_engine(db_url)
    upgrade_to_head(engine)
    store = SqlSecurityStore(engine, owns_engine=True)
    now = datetime.now(UTC)
    store.add_enrollment_token(hash_secret("efe_a"), "cam-1", now, now + timedelta(hours=1))
    store.enroll(hash_secret("efe_a"), "cam-1", "a" * 64, now)

    with pytest.raises(EnrollmentRejected) as rejected:
        store.enroll(hash_secret("efe_a"), "cam-1", "b" * 64, now)
    bound = store.credential_of("cam-1")
    store.close()

    assert rejected.value.reason == "used"
    assert bound == "a" * 64


def test_enroll_store_list_and_revoke(db_url: str) -> None:
    engine = create_store_engine(db_url)
    upgrade_to_head(engine)
    store = SqlSecurityStore(engine, owns_engine=True)
    now = datetime.now(UTC)
    for index, (secret, device_id) in enumerate([("efe_a", "cam-1"), ("efe_b", "cam-2"), ("efe_c", "cam-2")]):
        created_at = now + timedelta(seconds=index)
        store.add_enrollment_token(hash_secret(secret), device_id, created_at, now + timedelta(hours=1))
    store.enroll(hash_secret("efe_b"), "cam-2", "b" * 64, now)
    unused_id = hash_secret("efe_c")[:12]
    used_id = hash_secret("efe_b")[:12]

    listed = store.list_enrollment_tokens()
    of_cam_2 = store.list_enrollment_tokens("cam-2")
    revoked = store.revoke_enrollment_token(unused_id)
    with pytest.raises(StoreError, match="was used by device 'cam-2'"):
        store.revoke_enrollment_token(used_id)
    with pytest.raises(NotFoundError):
        store.revoke_enrollment_token(unused_id)
    remaining = [token.token_id for token in store.list_enrollment_tokens()]
    with pytest.raises(EnrollmentRejected) as rejected:
        store.enroll(hash_secret("efe_c"), "cam-2", "c" * 64, now)
    store.close()

    assert [(t.token_id, t.device_id) for t in listed] == [
        (unused_id, "cam-2"),
        (used_id, "cam-2"),
        (hash_secret("efe_a")[:12], "cam-1"),
    ]
    assert [t.token_id for t in of_cam_2] == [unused_id, used_id]
    assert of_cam_2[1].used_at is not None
    assert (revoked.token_id, revoked.device_id, revoked.used_at) == (unused_id, "cam-2", None)
    assert remaining == [used_id, hash_secret("efe_a")[:12]]
    assert rejected.value.reason == "unknown"


def open_control(orchestrator: SecureOrchestrator, device_id: str, instance_key: str) -> ControlStream:
    stream = ControlStream(orchestrator.agent(device_id))
    stream.hello(device_id, instance_key)
    stream.heartbeat(1)
    stream.receive_kind("heartbeat_ack")
    return stream


def test_revoke_closes_and_refuses(start_secure: StartSecure, caplog: pytest.LogCaptureFixture) -> None:
    orchestrator = start_secure()
    caplog.set_level(logging.INFO, logger="edgefleet.orchestrator.servicer")
    key = register(orchestrator, "cam-1", orchestrator.enrollment_token("cam-1"))
    stream = open_control(orchestrator, "cam-1", key)

    response = orchestrator.operator().RevokeDevice(
        operator_pb2.RevokeDeviceRequest(device_id="cam-1", reason="stolen"), timeout=STEP_TIMEOUT_S
    )
    end = stream.wait_end()
    stream.close()
    error = register_error(orchestrator, "cam-1", "")
    second = ControlStream(orchestrator.agent("cam-1"))
    second.hello("cam-1", key)
    second_end = second.wait_end()
    second.close()

    assert response.stream_closed
    assert end.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in (error.details() or "")
    assert second_end.code == grpc.StatusCode.PERMISSION_DENIED
    assert "device 'cam-1' is revoked" in second_end.details
    assert "edgefleet enroll create --device-id cam-1" in second_end.details
    closed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("control stream closed")]
    assert "control stream closed for device_id=cam-1: the device was revoked" in closed


def test_revoke_unknown_id_rejected(start_secure: StartSecure) -> None:
    orchestrator = start_secure()
    key = register(orchestrator, "cam-001", orchestrator.enrollment_token("cam-001"))

    with pytest.raises(grpc.RpcError) as raised:
        orchestrator.operator().RevokeDevice(
            operator_pb2.RevokeDeviceRequest(device_id="cam-01", reason="stolen"), timeout=STEP_TIMEOUT_S
        )
    stream = open_control(orchestrator, "cam-001", key)
    listed = orchestrator.operator().ListDevices(operator_pb2.ListDevicesRequest(), timeout=STEP_TIMEOUT_S)
    stream.close()

    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "device 'cam-01' not found; did you mean cam-001?" in (raised.value.details() or "")
    assert {d.device_id: d.revoked for d in listed.devices} == {"cam-001": False}


def test_revoke_before_enrollment(start_secure: StartSecure) -> None:
    orchestrator = start_secure()
    token = orchestrator.enrollment_token("cam-1")

    response = orchestrator.operator().RevokeDevice(
        operator_pb2.RevokeDeviceRequest(device_id="cam-1", reason="lost in transit"), timeout=STEP_TIMEOUT_S
    )
    error = register_error(orchestrator, "cam-1", token)

    assert response.device_id == "cam-1"
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "the enrollment token is not valid" in (error.details() or "")


def test_revoke_removed_device(start_secure: StartSecure) -> None:
    orchestrator = start_secure()
    register(orchestrator, "cam-1", orchestrator.enrollment_token("cam-1"))
    orchestrator.operator().RemoveDevice(operator_pb2.RemoveDeviceRequest(device_id="cam-1"), timeout=STEP_TIMEOUT_S)

    with pytest.raises(grpc.RpcError) as raised:
        orchestrator.operator().RevokeDevice(
            operator_pb2.RevokeDeviceRequest(device_id="cam-1"), timeout=STEP_TIMEOUT_S
        )

    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "device 'cam-1' was removed from the fleet at" in (raised.value.details() or "")
    assert "nothing to revoke" in (raised.value.details() or "")


def test_revoked_shown_on_device(start_secure: StartSecure) -> None:
    orchestrator = start_secure()
    register(orchestrator, "cam-1", orchestrator.enrollment_token("cam-1"))
    register(orchestrator, "cam-2", orchestrator.enrollment_token("cam-2"))
    orchestrator.operator().RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id="cam-1"), timeout=STEP_TIMEOUT_S)

    listed = orchestrator.operator().ListDevices(operator_pb2.ListDevicesRequest(), timeout=STEP_TIMEOUT_S)
    shown = orchestrator.operator().GetDevice(operator_pb2.GetDeviceRequest(device_id="cam-1"), timeout=STEP_TIMEOUT_S)

    assert {d.device_id: d.revoked for d in listed.devices} == {"cam-1": True, "cam-2": False}
    assert shown.revoked


def test_cli_lists_revoked(start_secure: StartSecure, capsys: pytest.CaptureFixture[str]) -> None:
    orchestrator = start_secure()
    register(orchestrator, "cam-1", orchestrator.enrollment_token("cam-1"))
    connection = [
        "--orchestrator",
        orchestrator.operator_address,
        "--ca-cert",
        str(orchestrator.pki.ca),
        "--token",
        orchestrator.admin_token,
    ]
    revoked = cli_main([*connection, "devices", "revoke", "cam-1", "--reason", "lost"])
    capsys.readouterr()
    listed = cli_main([*connection, "devices", "list"])
    table = capsys.readouterr().out
    shown = cli_main([*connection, "devices", "show", "cam-1"])
    detail = capsys.readouterr().out

    assert (revoked, listed, shown) == (0, 0, 0)
    assert table.splitlines()[1].split()[:2] == ["cam-1", "revoked"]
    assert "(offline, revoked," in detail


def test_deploy_to_revoked_refused(start_secure: StartSecure) -> None:
    orchestrator = start_secure()
    register(orchestrator, "cam-1", orchestrator.enrollment_token("cam-1"))
    operator = orchestrator.operator()
    operator.UploadModel(upload_requests(linear_onnx(), "linear", "1"), timeout=120)
    operator.RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id="cam-1"), timeout=STEP_TIMEOUT_S)

    with pytest.raises(grpc.RpcError) as raised:
        operator.Deploy(operator_pb2.DeployRequest(model_name="linear", device_id="cam-1"), timeout=STEP_TIMEOUT_S)

    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "revoked" in (raised.value.details() or "")


def test_revoke_refuses_uploads(start_secure: StartSecure) -> None:
    orchestrator = start_secure()
    register(orchestrator, "cam-1", orchestrator.enrollment_token("cam-1"))
    orchestrator.operator().RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id="cam-1"), timeout=STEP_TIMEOUT_S)

    with pytest.raises(grpc.RpcError) as raised:
        orchestrator.agent("cam-1").UploadMetrics(
            agent_pb2.UploadMetricsRequest(device_id="cam-1", batch_id="b1"), timeout=STEP_TIMEOUT_S
        )

    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_revoke_then_reenroll(start_secure: StartSecure) -> None:
    orchestrator = start_secure()
    key = register(orchestrator, "cam-1", orchestrator.enrollment_token("cam-1"))
    orchestrator.operator().RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id="cam-1"), timeout=STEP_TIMEOUT_S)

    register(orchestrator, "cam-1", orchestrator.enrollment_token("cam-1"), instance_key=key)


def test_reimaged_device_rebinds_with_token(start_secure: StartSecure) -> None:
    """A device that lost its instance key registers again with a new token, and the old agent is shut out."""
    orchestrator = start_secure()
    old_key = register(orchestrator, "cam-1", orchestrator.enrollment_token("cam-1"))

    conflict = register_error(orchestrator, "cam-1", "")
    token = orchestrator.enrollment_token("cam-1")
    new_key = register(orchestrator, "cam-1", token)
    stream = open_control(orchestrator, "cam-1", new_key)
    stream.close()
    # The new agent may keep the used token in its configuration; only another instance key needs a new one.
    register(orchestrator, "cam-1", token, instance_key=new_key)
    with pytest.raises(grpc.RpcError) as replayed:
        register(orchestrator, "cam-1", token, instance_key=old_key)
    old_agent = ControlStream(orchestrator.agent("cam-1"))
    old_agent.hello("cam-1", old_key)
    old_end = old_agent.wait_end()
    old_agent.close()

    assert conflict.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "start it once with a new enrollment token" in (conflict.details() or "")
    assert new_key != old_key
    assert replayed.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "presented an enrollment token that cannot rebind the id" in (replayed.value.details() or "")
    assert "already used at" in (replayed.value.details() or "")
    # The conflicts are the attempt before the new token and the replay; the rebinding itself does not count as one.
    conflicts = orchestrator.server.state.store.list_identity_conflicts("cam-1")
    assert len(conflicts) == 2
    assert old_end.code == grpc.StatusCode.ALREADY_EXISTS


def test_removed_device_needs_new_token(start_secure: StartSecure) -> None:
    orchestrator = start_secure()
    used_token = orchestrator.enrollment_token("cam-1")
    key = register(orchestrator, "cam-1", used_token)
    stream = open_control(orchestrator, "cam-1", key)

    response = orchestrator.operator().RemoveDevice(
        operator_pb2.RemoveDeviceRequest(device_id="cam-1"), timeout=STEP_TIMEOUT_S
    )
    end = stream.wait_end()
    stream.close()
    without_token = register_error(orchestrator, "cam-1", "")
    with pytest.raises(grpc.RpcError) as with_used_token:
        register(orchestrator, "cam-1", used_token, instance_key=key)

    assert response.stream_closed
    for code, details in ((end.code, end.details), (without_token.code(), without_token.details() or "")):
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "device 'cam-1' was removed from the fleet at " in details
        assert "edgefleet enroll create --device-id cam-1" in details
    assert with_used_token.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "already used" in (with_used_token.value.details() or "")
    store = orchestrator.server.state.store
    assert store.get_device("cam-1") is None

    register(orchestrator, "cam-1", orchestrator.enrollment_token("cam-1"), instance_key=key)

    assert store.get_device("cam-1") is not None
    assert store.get_removed_device("cam-1") is None
