"""AgentService.Control against a real orchestrator: hello checks, heartbeats, status, desired and reported state."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

import grpc
import pytest

from edgefleet.v1 import agent_pb2, agent_pb2_grpc, common_pb2, operator_pb2
from tests.servers import (
    ControlStream,
    OrchestratorThread,
    get_device,
    linear_onnx,
    new_instance_key,
    register,
    upload,
    wait_until,
)

pytest_plugins = ["tests.servers"]

OpenStream = Callable[[agent_pb2_grpc.AgentServiceStub], ControlStream]


def deploy(orchestrator: OrchestratorThread, device_id: str, model: str = "linear") -> operator_pb2.DeployResponse:
    return orchestrator.operator.Deploy(operator_pb2.DeployRequest(model_name=model, device_id=device_id), timeout=30)


def status_of(orchestrator: OrchestratorThread, device_id: str) -> int:
    return get_device(orchestrator, device_id).status


def test_stream_needs_hello(orchestrator: OrchestratorThread, open_stream: OpenStream) -> None:
    device_id, _ = register(orchestrator.agent)
    stream = open_stream(orchestrator.agent)

    stream.heartbeat(1)
    end = stream.wait_end()

    assert end.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello" in end.details
    assert status_of(orchestrator, device_id) != common_pb2.DEVICE_STATUS_ONLINE


def test_stream_unknown_device(orchestrator: OrchestratorThread, open_stream: OpenStream) -> None:
    stream = open_stream(orchestrator.agent)

    stream.hello("never-registered", new_instance_key())
    end = stream.wait_end()

    assert end.code == grpc.StatusCode.NOT_FOUND
    assert "never-registered" in end.details


def test_stream_wrong_key(orchestrator: OrchestratorThread, open_stream: OpenStream) -> None:
    device_id, _ = register(orchestrator.agent)
    stream = open_stream(orchestrator.agent)

    stream.hello(device_id, new_instance_key())
    end = stream.wait_end()

    assert end.code == grpc.StatusCode.ALREADY_EXISTS
    assert status_of(orchestrator, device_id) != common_pb2.DEVICE_STATUS_ONLINE


def test_stream_short_key(orchestrator: OrchestratorThread, open_stream: OpenStream) -> None:
    device_id, _ = register(orchestrator.agent)
    stream = open_stream(orchestrator.agent)

    stream.hello(device_id, "short")
    end = stream.wait_end()

    assert end.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "instance_key" in end.details


def test_heartbeat_acked(orchestrator: OrchestratorThread, open_stream: OpenStream) -> None:
    device_id, key = register(orchestrator.agent)
    registered_seen = get_device(orchestrator, device_id).last_seen.ToDatetime()
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key)

    stream.heartbeat(7)
    ack = stream.receive_kind("heartbeat_ack")

    assert ack.heartbeat_ack.sequence == 7
    assert ack.heartbeat_ack.server_time.seconds > 0
    wait_until(
        lambda: get_device(orchestrator, device_id).last_seen.ToDatetime() > registered_seen,
        "last_seen to advance after the heartbeat",
    )
    assert status_of(orchestrator, device_id) == common_pb2.DEVICE_STATUS_ONLINE


def test_status_online_stale_offline(
    start_orchestrator: Callable[..., OrchestratorThread], open_stream: OpenStream
) -> None:
    # A stale threshold of a few seconds: on a loaded 2-core machine, the status read right after a
    # heartbeat took over 0.6 s, so a device just heard from read as stale.
    orchestrator = start_orchestrator(stale_after_s=3.0, offline_after_s=4.5)
    device_id, key = register(orchestrator.agent)
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key)
    stream.heartbeat(1)
    stream.receive_kind("heartbeat_ack")

    online = status_of(orchestrator, device_id)
    wait_until(lambda: status_of(orchestrator, device_id) == common_pb2.DEVICE_STATUS_STALE, "status stale")
    wait_until(lambda: status_of(orchestrator, device_id) == common_pb2.DEVICE_STATUS_OFFLINE, "status offline")
    stream.heartbeat(2)
    stream.receive_kind("heartbeat_ack")
    back = status_of(orchestrator, device_id)

    assert online == common_pb2.DEVICE_STATUS_ONLINE
    assert back == common_pb2.DEVICE_STATUS_ONLINE


def test_status_offline_when_closed(orchestrator: OrchestratorThread, open_stream: OpenStream) -> None:
    device_id, key = register(orchestrator.agent)
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key)
    stream.heartbeat(1)
    stream.receive_kind("heartbeat_ack")

    stream.close()

    wait_until(
        lambda: status_of(orchestrator, device_id) == common_pb2.DEVICE_STATUS_OFFLINE,
        "status offline after the stream closed",
    )
    # The store learns of the closed stream just after the hub does, from a worker thread.
    wait_until(
        lambda: orchestrator.state.store.get_device(device_id).connected is False,  # type: ignore[union-attr]
        "device stored as disconnected",
    )


async def _occupy_default_executor(release: threading.Event, jobs: int = 40) -> None:
    """Queue more blocking jobs than the loop's default executor has threads (at most 32)."""
    loop = asyncio.get_running_loop()
    for _ in range(jobs):
        loop.run_in_executor(None, release.wait)


def test_disconnect_recorded_when_cancel_follows_close(
    orchestrator: OrchestratorThread, open_stream: OpenStream
) -> None:
    # The agent half-closes its stream and the call is cancelled while the disconnect write is still
    # queued for a worker thread: the cancellation must not drop that write.
    device_id, key = register(orchestrator.agent)
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key)
    stream.heartbeat(1)
    stream.receive_kind("heartbeat_ack")
    release = threading.Event()
    try:
        orchestrator.run(_occupy_default_executor(release))
        stream.half_close()
        wait_until(lambda: device_id not in orchestrator.state.hub.sessions, "the hub to forget the stream")
        stream.call.cancel()
        stream.wait_end()
    finally:
        release.set()

    wait_until(
        lambda: orchestrator.state.store.get_device(device_id).connected is False,  # type: ignore[union-attr]
        "device stored as disconnected",
    )


def test_missed_deploy_on_reconnect(orchestrator: OrchestratorThread, open_stream: OpenStream) -> None:
    device_id, key = register(orchestrator.agent)
    model = upload(orchestrator, linear_onnx(), "linear", "1")
    response = deploy(orchestrator, device_id)
    stream = open_stream(orchestrator.agent)

    stream.hello(device_id, key, generation=0)
    message = stream.receive()

    assert message.WhichOneof("body") == "desired_state"
    desired = message.desired_state
    assert desired.generation == response.device.desired_generation
    assert desired.generation >= 1
    assert [a.model_name for a in desired.models] == ["linear"]
    assert desired.models[0].digest == model.digest
    assert desired.models[0].variant_id == "linear:1:source"
    assert desired.models[0].format == common_pb2.MODEL_FORMAT_ONNX


def test_current_generation_no_resend(orchestrator: OrchestratorThread, open_stream: OpenStream) -> None:
    device_id, key = register(orchestrator.agent)
    upload(orchestrator, linear_onnx(), "linear", "1")
    generation = deploy(orchestrator, device_id).device.desired_generation
    stream = open_stream(orchestrator.agent)

    stream.hello(device_id, key, generation=generation)
    stream.heartbeat(1)
    first = stream.receive()

    assert first.WhichOneof("body") == "heartbeat_ack"


def test_deploy_pushed_live(orchestrator: OrchestratorThread, open_stream: OpenStream) -> None:
    device_id, key = register(orchestrator.agent)
    upload(orchestrator, linear_onnx(), "linear", "1")
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key)
    stream.heartbeat(1)
    stream.receive_kind("heartbeat_ack")

    generation = deploy(orchestrator, device_id).device.desired_generation
    message = stream.receive_kind("desired_state")

    assert message.desired_state.generation == generation
    assert message.command_id == f"desired-{generation}"


def test_deploy_during_stream_open(
    orchestrator: OrchestratorThread, open_stream: OpenStream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deploy that commits just after an opening stream read the desired state still reaches that stream."""
    device_id, key = register(orchestrator.agent)
    upload(orchestrator, linear_onnx(), "linear", "1")
    store = orchestrator.state.store
    read_desired_state = store.get_desired_state
    deployed: list[operator_pb2.DeployResponse] = []

    def read_then_deploy(requested_id: str) -> object:
        desired = read_desired_state(requested_id)
        # Only the stream's read deploys: the deploy handler reads the desired state with the original method.
        monkeypatch.setattr(store, "get_desired_state", read_desired_state)
        deployed.append(deploy(orchestrator, device_id))
        return desired

    monkeypatch.setattr(store, "get_desired_state", read_then_deploy)
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key)
    message = stream.receive_kind("desired_state")

    assert len(deployed) == 1
    assert message.desired_state.generation == deployed[0].device.desired_generation
    assert [a.model_name for a in message.desired_state.models] == ["linear"]


def test_second_stream_replaces_first(orchestrator: OrchestratorThread, open_stream: OpenStream) -> None:
    device_id, key = register(orchestrator.agent)
    first = open_stream(orchestrator.agent)
    first.hello(device_id, key)
    first.heartbeat(1)
    first.receive_kind("heartbeat_ack")

    second = open_stream(orchestrator.agent)
    second.hello(device_id, key)
    first_end = first.wait_end()
    second.heartbeat(2)
    ack = second.receive_kind("heartbeat_ack")

    assert first_end.code == grpc.StatusCode.ABORTED
    assert "replaced this one" in first_end.details
    assert ack.heartbeat_ack.sequence == 2
    assert status_of(orchestrator, device_id) == common_pb2.DEVICE_STATUS_ONLINE
    assert orchestrator.state.store.get_device(device_id).connected is True  # type: ignore[union-attr]


def test_repeated_takeovers_recorded_as_conflict(orchestrator: OrchestratorThread, open_stream: OpenStream) -> None:
    # Two agents started from one copied state directory keep closing each other's stream.
    device_id, key = register(orchestrator.agent)
    streams = []
    for sequence in range(1, 6):
        stream = open_stream(orchestrator.agent)
        stream.hello(device_id, key)
        stream.heartbeat(sequence)
        stream.receive_kind("heartbeat_ack")
        streams.append(stream)

    conflicts = wait_until(lambda: get_device(orchestrator, device_id).identity_conflicts, "an identity conflict")

    assert len(conflicts) == 1
    assert conflicts[0].instance_key_fingerprint
    assert all(s.wait_end().code == grpc.StatusCode.ABORTED for s in streams[:-1])


def test_single_takeover_not_a_conflict(orchestrator: OrchestratorThread, open_stream: OpenStream) -> None:
    device_id, key = register(orchestrator.agent)
    for sequence in (1, 2):
        stream = open_stream(orchestrator.agent)
        stream.hello(device_id, key)
        stream.heartbeat(sequence)
        stream.receive_kind("heartbeat_ack")

    assert not get_device(orchestrator, device_id).identity_conflicts


def test_reported_state_stored(orchestrator: OrchestratorThread, open_stream: OpenStream) -> None:
    device_id, key = register(orchestrator.agent)
    model = upload(orchestrator, linear_onnx(), "linear", "1")
    generation = deploy(orchestrator, device_id).device.desired_generation
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key, generation=generation)
    status = agent_pb2.ModelStatus(
        model_name="linear",
        model_version="1",
        variant_id="linear:1:source",
        digest=model.digest,
        state=common_pb2.MODEL_STATE_SERVING,
        runtime="onnxruntime",
        providers=["CPUExecutionProvider"],
        threads=2,
    )
    status.updated_at.GetCurrentTime()

    stream.send(
        agent_pb2.AgentMessage(reported_state=agent_pb2.ReportedState(desired_generation=generation, models=[status]))
    )

    def stored() -> operator_pb2.Device | None:
        device = get_device(orchestrator, device_id)
        return device if device.reported_generation == generation else None

    device = wait_until(stored, "the reported generation to be stored")

    assert len(device.models) == 1
    reported = device.models[0]
    assert reported.state == common_pb2.MODEL_STATE_SERVING
    assert reported.variant_id == "linear:1:source"
    assert reported.runtime == "onnxruntime"
    assert list(reported.providers) == ["CPUExecutionProvider"]
    assert reported.threads == 2
    assert reported.digest == model.digest
    assert [a.variant_id for a in device.desired] == ["linear:1:source"]


def test_failed_model_logged_once(
    orchestrator: OrchestratorThread, open_stream: OpenStream, caplog: pytest.LogCaptureFixture
) -> None:
    device_id, key = register(orchestrator.agent)
    model = upload(orchestrator, linear_onnx(), "linear", "1")
    generation = deploy(orchestrator, device_id).device.desired_generation
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key, generation=generation)

    def report(error: str) -> None:
        status = agent_pb2.ModelStatus(
            model_name="linear",
            model_version="1",
            variant_id="linear:1:source",
            digest=model.digest,
            state=common_pb2.MODEL_STATE_FAILED,
            error=error,
        )
        stream.send(
            agent_pb2.AgentMessage(
                reported_state=agent_pb2.ReportedState(desired_generation=generation, models=[status])
            )
        )

    with caplog.at_level(logging.WARNING, logger="edgefleet.orchestrator.handlers.devices"):
        for _ in range(3):
            report("runtime failed to load the model")
        # A download retried against an orchestrator error reports a new error id each time.
        for error_id in ("0a1b2c3d4e5f", "5f4e3d2c1b0a"):
            report(f"download failed: internal error (id {error_id}); see the orchestrator log")
        report("runtime failed again, differently")
        wait_until(
            lambda: [m for m in get_device(orchestrator, device_id).models if "differently" in m.error],
            "the last report to be stored",
        )

    logged = [r.getMessage() for r in caplog.records if f"device_id={device_id} reports model=linear" in r.getMessage()]
    assert len(logged) == 3
    assert logged[0].endswith("failed: runtime failed to load the model")
    assert logged[1].endswith("failed: download failed: internal error (id 0a1b2c3d4e5f); see the orchestrator log")
    assert logged[2].endswith("failed: runtime failed again, differently")


def test_reported_trusted_keys_stored(orchestrator: OrchestratorThread, open_stream: OpenStream) -> None:
    device_id, key = register(orchestrator.agent)
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key)
    report = agent_pb2.ReportedState(
        trusted_keys=agent_pb2.TrustedKeysReport(version=4, key_ids=["0123456789abcdef", "fedcba9876543210"])
    )

    stream.send(agent_pb2.AgentMessage(reported_state=report))
    device = wait_until(
        lambda: get_device(orchestrator, device_id) if get_device(orchestrator, device_id).trusted_key_ids else None,
        "the trusted keys to be stored",
    )

    assert device.trusted_key_set_version == 4
    assert list(device.trusted_key_ids) == ["0123456789abcdef", "fedcba9876543210"]


def test_reported_trusted_keys_invalid(orchestrator: OrchestratorThread, open_stream: OpenStream) -> None:
    device_id, key = register(orchestrator.agent)
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key)
    report = agent_pb2.ReportedState(trusted_keys=agent_pb2.TrustedKeysReport(version=1, key_ids=["not-a-key"]))

    stream.send(agent_pb2.AgentMessage(reported_state=report))
    end = stream.wait_end()

    assert end.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'not-a-key'" in end.details
    assert get_device(orchestrator, device_id).trusted_key_set_version == 0


def test_reported_state_invalid(orchestrator: OrchestratorThread, open_stream: OpenStream) -> None:
    device_id, key = register(orchestrator.agent)
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key)

    stream.send(
        agent_pb2.AgentMessage(
            reported_state=agent_pb2.ReportedState(
                models=[agent_pb2.ModelStatus(model_name="linear", state=42)]  # type: ignore[arg-type]
            )
        )
    )
    end = stream.wait_end()

    assert end.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "reported_state.models[0].state" in end.details
    assert list(get_device(orchestrator, device_id).models) == []


def test_server_stop_ends_streams(
    start_orchestrator: Callable[..., OrchestratorThread], open_stream: OpenStream
) -> None:
    orchestrator = start_orchestrator()
    device_id, key = register(orchestrator.agent)
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key)
    stream.heartbeat(1)
    stream.receive_kind("heartbeat_ack")

    orchestrator.stop(grace_s=1.0)
    end = stream.wait_end()

    assert end.code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


@pytest.mark.parametrize("count", [20])
def test_many_streams(orchestrator: OrchestratorThread, open_stream: OpenStream, count: int) -> None:
    streams = []
    for _ in range(count):
        device_id, key = register(orchestrator.agent)
        stream = open_stream(orchestrator.agent)
        stream.hello(device_id, key)
        streams.append(stream)

    for sequence, stream in enumerate(streams):
        stream.heartbeat(sequence)
    acks = [stream.receive_kind("heartbeat_ack").heartbeat_ack.sequence for stream in streams]
    online = orchestrator.operator.ListDevices(
        operator_pb2.ListDevicesRequest(status=common_pb2.DEVICE_STATUS_ONLINE), timeout=30
    )

    assert acks == list(range(count))
    assert len(online.devices) == count
