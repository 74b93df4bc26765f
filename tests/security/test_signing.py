"""Signed assignments: agents verify signatures and counters before a model is fetched, and keys rotate."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from edgefleet.agent.verify import ArtifactVerifier, VerificationError
from edgefleet.common.errors import FailedPrecondition
from edgefleet.orchestrator.security.signing import Signer
from edgefleet.orchestrator.security.store import SqlSecurityStore
from edgefleet.orchestrator.store.engine import create_store_engine, upgrade_to_head
from edgefleet.v1 import agent_pb2, common_pb2, operator_pb2
from tests.security.helpers import SecureOrchestrator
from tests.security.test_cli import cli
from tests.servers import STEP_TIMEOUT_S, AgentThread, linear_onnx, upload_requests, wait_until

pytest_plugins = ["tests.servers", "tests.security.helpers"]

StartSecure = Callable[..., SecureOrchestrator]
StartAgent = Callable[..., AgentThread]


@pytest.fixture
def signer(db_url: str) -> Iterator[Signer]:
    engine = create_store_engine(db_url)
    upgrade_to_head(engine)
    store = SqlSecurityStore(engine, owns_engine=True)
    signer = Signer(store, cache_s=0.0)
    signer.ensure_key(datetime.now(UTC))
    yield signer
    store.close()


def desired(generation: int, digest_byte: str = "a", variant: str = "net:1:source") -> agent_pb2.DesiredState:
    assignment = agent_pb2.ModelAssignment(
        model_name="net",
        model_version=variant.split(":")[1],
        variant_id=variant,
        digest="sha256:" + digest_byte * 64,
        size_bytes=1000,
        format=common_pb2.MODEL_FORMAT_ONNX,
    )
    return agent_pb2.DesiredState(generation=generation, models=[assignment])


def trusting(signer: Signer, tmp_path: Path, device_id: str = "cam-1") -> ArtifactVerifier:
    verifier = ArtifactVerifier(tmp_path, device_id)
    verifier.update_keys(signer.key_set(), first_use=True)
    return verifier


def signed(signer: Signer, state: agent_pb2.DesiredState, rollback: bool = False) -> agent_pb2.ModelAssignment:
    rollbacks = {"net": state.models[0].digest} if rollback else {}
    return signer.sign_desired_state("cam-1", state, rollbacks).models[0]


def test_verify_accepts_signed(signer: Signer, tmp_path: Path) -> None:
    verifier = trusting(signer, tmp_path)

    verifier.check(signed(signer, desired(1)))


def test_verify_rejects_unsigned(signer: Signer, tmp_path: Path) -> None:
    verifier = trusting(signer, tmp_path)

    with pytest.raises(VerificationError, match="not signed"):
        verifier.check(desired(1).models[0])


def test_verify_rejects_tampered_digest(signer: Signer, tmp_path: Path) -> None:
    verifier = trusting(signer, tmp_path)
    assignment = signed(signer, desired(1))
    assignment.digest = "sha256:" + "b" * 64

    with pytest.raises(VerificationError, match="invalid"):
        verifier.check(assignment)


def test_verify_rejects_other_device(signer: Signer, tmp_path: Path) -> None:
    verifier = trusting(signer, tmp_path, device_id="cam-2")

    with pytest.raises(VerificationError, match="another device"):
        verifier.check(signed(signer, desired(1)))


def test_verify_rejects_replay(signer: Signer, tmp_path: Path) -> None:
    verifier = trusting(signer, tmp_path)
    old = signed(signer, desired(3, "a"))
    new = signed(signer, desired(7, "b"))
    verifier.check(new)
    verifier.accept(new)

    with pytest.raises(VerificationError, match="lower than 7"):
        verifier.check(old)


def test_verify_rollback_flag(signer: Signer, tmp_path: Path) -> None:
    verifier = trusting(signer, tmp_path)
    verifier.accept(signed(signer, desired(7, "b")))
    rollback = signed(signer, desired(3, "a"), rollback=True)

    verifier.check(rollback)
    verifier.accept(rollback)

    assert verifier.counters["net"] == 3


def test_verify_rollback_flag_is_signed(signer: Signer, tmp_path: Path) -> None:
    verifier = trusting(signer, tmp_path)
    verifier.accept(signed(signer, desired(7, "b")))
    forged = signed(signer, desired(3, "a"))
    forged.rollback = True

    with pytest.raises(VerificationError, match="invalid"):
        verifier.check(forged)


def test_verify_counters_persist(signer: Signer, tmp_path: Path) -> None:
    trusting(signer, tmp_path).accept(signed(signer, desired(7)))

    reloaded = ArtifactVerifier(tmp_path, "cam-1")

    assert reloaded.counters == {"net": 7}
    assert reloaded.has_keys


def test_rotation_reaches_verifier(signer: Signer, tmp_path: Path) -> None:
    verifier = trusting(signer, tmp_path)
    old_key = signer.keys()[1][0].key_id
    new_key = signer.rotate(datetime.now(UTC)).key_id
    # The device learns the new key from a set that the old key signed too, then the old key goes.
    learned = verifier.update_keys(signer.sign_desired_state("cam-1", desired(2), {}).trusted_keys)
    signer.retire(old_key, datetime.now(UTC))
    state = signer.sign_desired_state("cam-1", desired(3), {})

    retired = verifier.update_keys(state.trusted_keys)
    verifier.check(state.models[0])

    assert learned
    assert retired
    assert set(verifier.keys) == {new_key}


def test_rotation_needs_trusted_signer(signer: Signer, tmp_path: Path) -> None:
    verifier = trusting(signer, tmp_path)
    old_key = signer.keys()[1][0].key_id
    signer.rotate(datetime.now(UTC))
    signer.retire(old_key, datetime.now(UTC))

    # The set without the old key is signed only by the new key, which this device never learned.
    with pytest.raises(VerificationError, match="not signed by a key this device trusts"):
        verifier.update_keys(signer.key_set())


def test_rotation_keeps_active_key(signer: Signer) -> None:
    active = signer.keys()[1][-1].key_id

    with pytest.raises(FailedPrecondition, match="rotate to a new key"):
        signer.retire(active, datetime.now(UTC))


def test_first_keys_need_registration(signer: Signer, tmp_path: Path) -> None:
    verifier = ArtifactVerifier(tmp_path, "cam-1")

    with pytest.raises(VerificationError, match="no trusted signing keys"):
        verifier.update_keys(signer.key_set())


# A real agent on a TLS orchestrator.


def start_enrolled_agent(orchestrator: SecureOrchestrator, start_agent: StartAgent, device_id: str) -> AgentThread:
    cert, key = orchestrator.pki.device(device_id)
    return start_agent(
        orchestrator.agent_address,
        device_id,
        insecure=False,
        ca_cert=orchestrator.pki.ca,
        cert=cert,
        key=key,
        enrollment_token=orchestrator.enrollment_token(device_id),
    )


def status_of(orchestrator: SecureOrchestrator, device_id: str) -> agent_pb2.ModelStatus | None:
    device = orchestrator.operator().GetDevice(operator_pb2.GetDeviceRequest(device_id=device_id), timeout=30)
    return next((m for m in device.models if m.model_name == "linear"), None)


def deploy_and_wait(
    orchestrator: SecureOrchestrator, device_id: str, version: str, state: int
) -> agent_pb2.ModelStatus:
    request = operator_pb2.DeployRequest(model_name="linear", model_version=version, device_id=device_id)
    orchestrator.operator().Deploy(request, timeout=STEP_TIMEOUT_S)

    def reached() -> agent_pb2.ModelStatus | None:
        status = status_of(orchestrator, device_id)
        if status is None or status.model_version != version or status.state != state:
            return None
        return status

    return wait_until(reached, f"linear:{version} to reach state {state} on {device_id}")


def served_version(agent: AgentThread) -> str:
    served = agent.agent.host.get("linear")
    return served.version if served is not None else ""


def test_agent_rotation_without_reenrollment(start_secure: StartSecure, start_agent: StartAgent) -> None:
    orchestrator = start_secure()
    admin = orchestrator.operator()
    for version, seed in (("1", 0), ("2", 1), ("3", 2)):
        admin.UploadModel(upload_requests(linear_onnx(seed), "linear", version), timeout=120)
    agent = start_enrolled_agent(orchestrator, start_agent, "ecu-1")
    wait_until(lambda: agent.agent.connected, "the agent to connect")
    deploy_and_wait(orchestrator, "ecu-1", "1", common_pb2.MODEL_STATE_SERVING)
    first_key = admin.ListSigningKeys(operator_pb2.ListSigningKeysRequest(), timeout=30).keys[0].key_id

    rotated = admin.RotateSigningKey(operator_pb2.RotateSigningKeyRequest(), timeout=30)
    deploy_and_wait(orchestrator, "ecu-1", "2", common_pb2.MODEL_STATE_SERVING)
    admin.RetireSigningKey(operator_pb2.RetireSigningKeyRequest(key_id=first_key), timeout=30)
    third = deploy_and_wait(orchestrator, "ecu-1", "3", common_pb2.MODEL_STATE_SERVING)
    new_key = next(k.key_id for k in rotated.keys if k.active)

    assert third.variant_id == "linear:3:source"
    assert set(agent.agent.verifier.keys) == {new_key}
    assert agent.running


def test_rotation_reaches_connected_agent(start_secure: StartSecure, start_agent: StartAgent) -> None:
    """Rotating and then retiring at once, as docs/security.md lists the steps, keeps an online agent."""
    orchestrator = start_secure()
    admin = orchestrator.operator()
    for version, seed in (("1", 0), ("2", 1)):
        admin.UploadModel(upload_requests(linear_onnx(seed), "linear", version), timeout=120)
    agent = start_enrolled_agent(orchestrator, start_agent, "ecu-1")
    wait_until(lambda: agent.agent.connected, "the agent to connect")
    deploy_and_wait(orchestrator, "ecu-1", "1", common_pb2.MODEL_STATE_SERVING)
    first_key = admin.ListSigningKeys(operator_pb2.ListSigningKeysRequest(), timeout=30).keys[0].key_id

    rotated = admin.RotateSigningKey(operator_pb2.RotateSigningKeyRequest(), timeout=30)
    new_key = next(k.key_id for k in rotated.keys if k.active)
    wait_until(lambda: new_key in agent.agent.verifier.keys or None, "the agent to learn the new key")
    wait_reported_keys(orchestrator, "ecu-1")
    admin.RetireSigningKey(operator_pb2.RetireSigningKeyRequest(key_id=first_key), timeout=30)
    second = deploy_and_wait(orchestrator, "ecu-1", "2", common_pb2.MODEL_STATE_SERVING)

    assert second.variant_id == "linear:2:source"
    assert set(agent.agent.verifier.keys) == {new_key}
    assert served_version(agent) == "2"


def test_retire_reaches_connected_agent(start_secure: StartSecure, start_agent: StartAgent) -> None:
    """An online agent stops trusting a retired key at once, not only with its next deploy."""
    orchestrator = start_secure()
    admin = orchestrator.operator()
    agent = start_enrolled_agent(orchestrator, start_agent, "ecu-1")
    wait_until(lambda: agent.agent.connected, "the agent to connect")
    first_key = admin.ListSigningKeys(operator_pb2.ListSigningKeysRequest(), timeout=30).keys[0].key_id
    rotated = admin.RotateSigningKey(operator_pb2.RotateSigningKeyRequest(), timeout=30)
    new_key = next(k.key_id for k in rotated.keys if k.active)
    wait_reported_keys(orchestrator, "ecu-1")

    admin.RetireSigningKey(operator_pb2.RetireSigningKeyRequest(key_id=first_key), timeout=30)

    wait_until(lambda: first_key not in agent.agent.verifier.keys or None, "the agent to drop the retired key")
    assert set(agent.agent.verifier.keys) == {new_key}


def wait_reported_keys(orchestrator: SecureOrchestrator, device_id: str) -> None:
    """Wait until the orchestrator has the device's report of the current key set."""

    def reported() -> bool | None:
        listed = orchestrator.operator().ListSigningKeys(operator_pb2.ListSigningKeysRequest(), timeout=30)
        devices = orchestrator.operator().ListDevices(operator_pb2.ListDevicesRequest(), timeout=30).devices
        device = next((d for d in devices if d.device_id == device_id), None)
        return (device is not None and device.trusted_key_set_version == listed.key_set_version) or None

    wait_until(reported, f"{device_id} to report the current signing keys")


def miss_rotation(
    orchestrator: SecureOrchestrator, start_agent: StartAgent
) -> tuple[str, operator_pb2.ListSigningKeysResponse]:
    """Enroll ecu-1, wait for its key report, stop it and rotate; return the first key id and the new key list."""
    admin = orchestrator.operator()
    agent = start_enrolled_agent(orchestrator, start_agent, "ecu-1")
    wait_reported_keys(orchestrator, "ecu-1")
    first_key = admin.ListSigningKeys(operator_pb2.ListSigningKeysRequest(), timeout=30).keys[0].key_id
    agent.stop()
    return first_key, admin.RotateSigningKey(operator_pb2.RotateSigningKeyRequest(), timeout=30)


def test_keys_list_counts_trusting_devices(start_secure: StartSecure, start_agent: StartAgent) -> None:
    orchestrator = start_secure()
    admin = orchestrator.operator()

    first_key, rotated = miss_rotation(orchestrator, start_agent)
    device = admin.GetDevice(operator_pb2.GetDeviceRequest(device_id="ecu-1"), timeout=30)

    assert rotated.devices == 1
    assert [(k.key_id == first_key, k.trusted_by) for k in rotated.keys] == [(True, 1), (False, 0)]
    assert [d.device_id for d in rotated.behind] == ["ecu-1"]
    assert list(rotated.behind[0].trusted_key_ids) == [first_key]
    assert rotated.behind[0].trusted_key_set_version < rotated.key_set_version
    assert list(device.trusted_key_ids) == [first_key]


def test_retire_rejected_for_device_behind(start_secure: StartSecure, start_agent: StartAgent) -> None:
    """Retiring the only key an offline device trusts is rejected until the device reports the new key."""
    orchestrator = start_secure()
    admin = orchestrator.operator()
    first_key, rotated = miss_rotation(orchestrator, start_agent)
    new_key = next(k.key_id for k in rotated.keys if k.active)

    with pytest.raises(grpc.RpcError) as rejected:
        admin.RetireSigningKey(operator_pb2.RetireSigningKeyRequest(key_id=first_key), timeout=30)
    kept = admin.ListSigningKeys(operator_pb2.ListSigningKeysRequest(), timeout=30)
    agent = start_enrolled_agent(orchestrator, start_agent, "ecu-1")
    wait_reported_keys(orchestrator, "ecu-1")
    retired = admin.RetireSigningKey(operator_pb2.RetireSigningKeyRequest(key_id=first_key), timeout=30)

    assert rejected.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"ecu-1 (trusts {first_key})" in rejected.value.details()
    assert "Wait until the devices trusting none of the remaining keys connect" in rejected.value.details()
    assert "Upgrade the agents" not in rejected.value.details()
    assert "--force" in rejected.value.details()
    assert [k.key_id for k in kept.keys] == [first_key, new_key]
    assert [k.key_id for k in retired.keys] == [new_key]
    wait_until(lambda: first_key not in agent.agent.verifier.keys or None, "the agent to drop the retired key")


def test_retire_force_strands_device(start_secure: StartSecure, start_agent: StartAgent) -> None:
    orchestrator = start_secure()
    admin = orchestrator.operator()
    first_key, _ = miss_rotation(orchestrator, start_agent)

    retired = admin.RetireSigningKey(operator_pb2.RetireSigningKeyRequest(key_id=first_key, force=True), timeout=30)

    assert first_key not in [k.key_id for k in retired.keys]
    assert [d.device_id for d in retired.behind] == ["ecu-1"]
    assert retired.keys[0].trusted_by == 0


def test_agent_rejects_replay_and_tamper(start_secure: StartSecure, start_agent: StartAgent) -> None:
    orchestrator = start_secure()
    admin = orchestrator.operator()
    for version, seed in (("1", 0), ("2", 1)):
        admin.UploadModel(upload_requests(linear_onnx(seed), "linear", version), timeout=120)
    agent = start_enrolled_agent(orchestrator, start_agent, "ecu-1")
    wait_until(lambda: agent.agent.connected, "the agent to connect")
    deploy_and_wait(orchestrator, "ecu-1", "1", common_pb2.MODEL_STATE_SERVING)
    security = orchestrator.server.state.security
    assert security is not None
    store = orchestrator.server.state.store
    generation, assignments = store.get_desired_state("ecu-1")
    from edgefleet.orchestrator import serde

    captured = security.signer.sign_desired_state(
        "ecu-1", serde.desired_state_message(generation, assignments).desired_state, {}
    )
    deploy_and_wait(orchestrator, "ecu-1", "2", common_pb2.MODEL_STATE_SERVING)

    agent.agent.reconciler.apply(captured)
    replayed = agent.agent.reconciler.statuses["linear"]
    tampered = agent_pb2.DesiredState()
    tampered.CopyFrom(captured)
    tampered.generation = generation + 10
    tampered.models[0].version_counter = generation + 10
    agent.agent.reconciler.apply(tampered)
    rejected = agent.agent.reconciler.statuses["linear"]

    assert replayed.state == common_pb2.MODEL_STATE_FAILED
    assert "lower than" in replayed.error
    assert rejected.state == common_pb2.MODEL_STATE_FAILED
    assert "signature" in rejected.error
    assert served_version(agent) == "2"


def test_agent_accepts_rollback_deploy(start_secure: StartSecure, start_agent: StartAgent) -> None:
    orchestrator = start_secure()
    admin = orchestrator.operator()
    for version, seed in (("1", 0), ("2", 1)):
        admin.UploadModel(upload_requests(linear_onnx(seed), "linear", version), timeout=120)
    agent = start_enrolled_agent(orchestrator, start_agent, "ecu-1")
    wait_until(lambda: agent.agent.connected, "the agent to connect")
    deploy_and_wait(orchestrator, "ecu-1", "2", common_pb2.MODEL_STATE_SERVING)
    # As after a database restore: the device's floor is far above the orchestrator's generation.
    agent.agent.verifier.counters["linear"] = 1000
    request = operator_pb2.DeployRequest(model_name="linear", model_version="1", device_id="ecu-1")

    admin.Deploy(request, timeout=STEP_TIMEOUT_S)

    def rejected() -> agent_pb2.ModelStatus | None:
        status = status_of(orchestrator, "ecu-1")
        return status if status is not None and status.model_version == "1" and status.error else None

    refused = wait_until(rejected, "the rejected deploy")
    request.rollback = True
    admin.Deploy(request, timeout=STEP_TIMEOUT_S)
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while served_version(agent) != "1" and time.monotonic() < deadline:
        time.sleep(0.05)

    assert "lower than 1000" in refused.error
    assert served_version(agent) == "1"


def test_verify_unknown_key_names_recovery(signer: Signer, tmp_path: Path) -> None:
    """The error for an assignment signed by other keys, as after a new orchestrator database, names the fix."""
    verifier = trusting(signer, tmp_path)
    engine = create_store_engine(f"sqlite:///{tmp_path / 'other-orchestrator.db'}")
    upgrade_to_head(engine)
    other_store = SqlSecurityStore(engine, owns_engine=True)
    other_signer = Signer(other_store, cache_s=0.0)
    other_signer.ensure_key(datetime.now(UTC))
    try:
        with pytest.raises(VerificationError) as caught:
            verifier.check(signed(other_signer, desired(1)))
    finally:
        other_store.close()

    message = str(caught.value)
    assert "signed by unknown key" in message
    assert str(tmp_path / "trusted_keys.json") in message
    assert "edgefleet enroll create --device-id cam-1" in message


def test_retire_rejected_for_unreported_device(start_secure: StartSecure) -> None:
    """A device that registered but never reported its keys, like an agent of an earlier release, blocks too."""
    from tests.security.test_enrollment import register

    orchestrator = start_secure()
    admin = orchestrator.operator()
    register(orchestrator, "cam-1", orchestrator.enrollment_token("cam-1"))
    first_key = admin.ListSigningKeys(operator_pb2.ListSigningKeysRequest(), timeout=30).keys[0].key_id
    rotated = admin.RotateSigningKey(operator_pb2.RotateSigningKeyRequest(), timeout=30)

    with pytest.raises(grpc.RpcError) as rejected:
        admin.RetireSigningKey(operator_pb2.RetireSigningKeyRequest(key_id=first_key), timeout=30)

    assert [(d.device_id, d.trusted_key_set_version) for d in rotated.behind] == [("cam-1", 0)]
    assert rejected.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = rejected.value.details() or ""
    assert "1 device that never reported its keys (agents of earlier releases do not): cam-1" in details
    assert "Upgrade the agents that never reported their keys" in details
    assert "Wait until the devices trusting none" not in details


def test_unverified_repeat_reported_failed(start_secure: StartSecure, start_agent: StartAgent) -> None:
    """A device that cannot verify the assignment of the model it serves keeps serving and reports failed."""
    orchestrator = start_secure()
    admin = orchestrator.operator()
    admin.UploadModel(upload_requests(linear_onnx(0), "linear", "1"), timeout=120)
    agent = start_enrolled_agent(orchestrator, start_agent, "ecu-1")
    wait_until(lambda: agent.agent.connected, "the agent to connect")
    deploy_and_wait(orchestrator, "ecu-1", "1", common_pb2.MODEL_STATE_SERVING)
    first_key = admin.ListSigningKeys(operator_pb2.ListSigningKeysRequest(), timeout=30).keys[0].key_id
    agent.stop()
    admin.RotateSigningKey(operator_pb2.RotateSigningKeyRequest(), timeout=30)
    admin.RetireSigningKey(operator_pb2.RetireSigningKeyRequest(key_id=first_key, force=True), timeout=30)

    agent = start_enrolled_agent(orchestrator, start_agent, "ecu-1")
    wait_until(lambda: agent.agent.connected, "the agent to connect")
    # The same version again, so the agent takes the path for an assignment it already serves.
    status = deploy_and_wait(orchestrator, "ecu-1", "1", common_pb2.MODEL_STATE_FAILED)
    served_before_restart = served_version(agent)
    agent.stop()
    # The saved desired state now contains the rejected assignment, and a restart serves the verified one.
    agent = start_enrolled_agent(orchestrator, start_agent, "ecu-1")
    restored = wait_until(lambda: served_version(agent), "the agent to restore its model")

    assert "signed by unknown key" in status.error or "not signed by a key" in status.error
    assert "keeps serving" in status.error
    assert served_before_restart == "1"
    assert restored == "1"


def test_cli_keys_show_devices_behind(
    start_secure: StartSecure, start_agent: StartAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    orchestrator = start_secure()
    first_key, _ = miss_rotation(orchestrator, start_agent)

    listed = cli(orchestrator, "keys", "list")
    listing = capsys.readouterr().out
    shown = cli(orchestrator, "devices", "show", "ecu-1")
    device = capsys.readouterr().out
    rejected = cli(orchestrator, "keys", "retire", first_key)
    rejection = capsys.readouterr().err
    forced = cli(orchestrator, "-o", "json", "keys", "retire", first_key, "--force")
    after = json.loads(capsys.readouterr().out)

    assert listed == 0
    assert "TRUSTED BY" in listing
    assert "1 of 1 devices have not reported key set version 2:" in listing
    assert f"  ecu-1   1        {first_key}" in listing
    assert shown == 0
    assert f"signing keys:  {first_key} (key set version 1)" in device
    assert rejected != 0
    assert f"ecu-1 (trusts {first_key})" in rejection
    assert "--force" in rejection
    assert forced == 0
    assert [k["key_id"] for k in after["keys"]] != [first_key]
    assert [d["device_id"] for d in after["behind"]] == ["ecu-1"]
