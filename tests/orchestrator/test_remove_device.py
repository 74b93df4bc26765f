"""RemoveDevice over gRPC, `edgefleet devices remove` and what a removed device's agent gets afterwards."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from edgefleet.agent.agent import FatalAgentError
from edgefleet.agent.identity import IDENTITY_FILE
from edgefleet.cli.main import main as cli_main
from edgefleet.common.serde import timestamp
from edgefleet.common.sketch import LatencySketch
from edgefleet.orchestrator.domain import ModelStatus
from edgefleet.orchestrator.store import queries
from edgefleet.orchestrator.store.tables_security import device_credentials, enrollment_tokens, rollback_orders
from edgefleet.v1 import agent_pb2, common_pb2, operator_pb2
from tests.servers import (
    STEP_TIMEOUT_S,
    AgentThread,
    ControlStream,
    OrchestratorThread,
    linear_onnx,
    register,
    upload,
    wait_until,
)

pytest_plugins = ["tests.servers"]

MODEL = "classifier"


def remove(orchestrator: OrchestratorThread, device_id: str, force: bool = False) -> operator_pb2.RemoveDeviceResponse:
    request = operator_pb2.RemoveDeviceRequest(device_id=device_id, force=force)
    return orchestrator.operator.RemoveDevice(request, timeout=30)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def listed_ids(orchestrator: OrchestratorThread) -> list[str]:
    response = orchestrator.operator.ListDevices(operator_pb2.ListDevicesRequest(), timeout=30)
    return [d.device_id for d in response.devices]


def upload_window(orchestrator: OrchestratorThread, device_id: str, variant_id: str, version: str = "1") -> None:
    """Upload one window of 30 inferences at 5 ms for the device through the real UploadMetrics call."""
    sketch = LatencySketch()
    for _ in range(30):
        sketch.add(5.0)
    window = common_pb2.MetricWindow(
        model_name=MODEL,
        model_version=version,
        variant_id=variant_id,
        window_start=timestamp(datetime.now(UTC)),
        window_seconds=1,
        inference_count=30,
        latency=sketch.to_proto(),
    )
    request = agent_pb2.UploadMetricsRequest(
        device_id=device_id, batch_id=f"{device_id}-{datetime.now(UTC).timestamp()}", windows=[window]
    )
    orchestrator.agent.UploadMetrics(request, timeout=30)


def query_count(orchestrator: OrchestratorThread, device_id: str) -> int:
    request = operator_pb2.QueryMetricsRequest(device_id=device_id)
    rows = orchestrator.operator.QueryMetrics(request, timeout=30).rows
    return sum(row.inference_count for row in rows)


def run_cli(capsys: pytest.CaptureFixture[str], orchestrator: OrchestratorThread, *args: str) -> tuple[int, str, str]:
    code = cli_main(["--orchestrator", orchestrator.address, "--insecure", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# What removal deletes and keeps


def test_remove_deletes_state_keeps_metrics(orchestrator: OrchestratorThread) -> None:
    store = orchestrator.state.store
    upload(orchestrator, linear_onnx(1), MODEL, "1")
    device_id, _ = register(orchestrator.agent, "edge-01", labels={"site": "a"})
    other_id, _ = register(orchestrator.agent, "edge-02")
    deploy = operator_pb2.DeployRequest(model_name=MODEL, model_version="1", device_id=device_id)
    orchestrator.operator.Deploy(deploy, timeout=30)
    status = ModelStatus(
        device_id=device_id,
        model_name=MODEL,
        model_version="1",
        variant_id=f"{MODEL}:1:source",
        digest="sha256:x",
        state="serving",
    )
    store.save_reported_state(device_id, 1, [status], datetime.now(UTC))
    upload_window(orchestrator, device_id, f"{MODEL}:1:source")
    now = datetime.now(UTC)
    with store.engine.begin() as connection:  # type: ignore[attr-defined]
        connection.execute(
            device_credentials.insert().values(device_id=device_id, cert_fingerprint="f" * 64, enrolled_at=now)
        )
        connection.execute(
            enrollment_tokens.insert().values(
                token_hash="h" * 64,
                device_id=device_id,
                created_at=now,
                expires_at=now + timedelta(hours=1),
                used_at=None,
                used_fingerprint="",
            )
        )
        connection.execute(
            rollback_orders.insert().values(device_id=device_id, model_name=MODEL, digest="sha256:x", ordered_at=now)
        )

    response = remove(orchestrator, device_id)

    assert response.device_id == device_id
    assert not response.stream_closed
    assert list(response.rollout_ids) == []
    assert store.get_device(device_id) is None
    assert listed_ids(orchestrator) == [other_id]
    assert store.get_reported_state(device_id) == []
    assert device_id not in store.fleet_states().desired
    assert store.hardware_history(device_id) == []
    removed = store.get_removed_device(device_id)
    assert removed is not None
    assert removed.removed_at == response.removed_at.ToDatetime(tzinfo=UTC)
    with store.engine.connect() as connection:  # type: ignore[attr-defined]
        for table in (device_credentials, enrollment_tokens, rollback_orders):
            assert connection.execute(table.select().where(table.c.device_id == device_id)).all() == []
    assert query_count(orchestrator, device_id) == 30
    assert query_count(orchestrator, other_id) == 0


def test_remove_metrics_query_empty_range(orchestrator: OrchestratorThread) -> None:
    device_id, _ = register(orchestrator.agent, "edge-01")
    remove(orchestrator, device_id)

    request = operator_pb2.QueryMetricsRequest(device_id=device_id)
    request.start.FromDatetime(datetime(2026, 1, 1, tzinfo=UTC))
    request.end.FromDatetime(datetime(2026, 1, 2, tzinfo=UTC))

    assert list(orchestrator.operator.QueryMetrics(request, timeout=30).rows) == []


def test_removed_device_not_found(orchestrator: OrchestratorThread) -> None:
    upload(orchestrator, linear_onnx(1), MODEL, "1")
    device_id, _ = register(orchestrator.agent, "edge-01")
    remove(orchestrator, device_id)

    shown = rpc_error(
        lambda: orchestrator.operator.GetDevice(operator_pb2.GetDeviceRequest(device_id=device_id), timeout=30)
    )
    deploy = operator_pb2.DeployRequest(model_name=MODEL, model_version="1", device_id=device_id)
    deployed = rpc_error(lambda: orchestrator.operator.Deploy(deploy, timeout=30))

    for error in (shown, deployed):
        details = error.details() or ""
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "device 'edge-01' was removed from the fleet at " in details
        assert "edgefleet metrics query --device edge-01" in details


def test_remove_unknown_device(orchestrator: OrchestratorThread) -> None:
    register(orchestrator.agent, "edge-01")

    error = rpc_error(lambda: remove(orchestrator, "edge-1"))

    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "device 'edge-1' not found; did you mean edge-01?"


def test_remove_twice(orchestrator: OrchestratorThread) -> None:
    device_id, _ = register(orchestrator.agent, "edge-01")
    remove(orchestrator, device_id)

    error = rpc_error(lambda: remove(orchestrator, device_id))

    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "'edge-01' was already removed at " in (error.details() or "")


# Connected and returning agents


def test_remove_closes_control_stream(
    orchestrator: OrchestratorThread, open_stream: Callable[..., ControlStream]
) -> None:
    device_id, key = register(orchestrator.agent, "edge-01")
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key)
    stream.heartbeat(1)
    stream.receive_kind("heartbeat_ack")

    response = remove(orchestrator, device_id)
    end = stream.wait_end()

    assert response.stream_closed
    assert end.code == grpc.StatusCode.PERMISSION_DENIED
    assert "device 'edge-01' was removed from the fleet at " in end.details
    assert "delete identity.json in the agent's state directory" in end.details


def test_remove_connected_logs_no_error(
    orchestrator: OrchestratorThread, open_stream: Callable[..., ControlStream], caplog: pytest.LogCaptureFixture
) -> None:
    """Closing a removed device's stream finds no row to mark disconnected, which is expected."""
    device_id, key = register(orchestrator.agent, "edge-01")
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key)
    stream.heartbeat(1)
    stream.receive_kind("heartbeat_ack")

    with caplog.at_level(logging.INFO, logger="edgefleet.orchestrator"):
        remove(orchestrator, device_id)
        stream.wait_end()
        not_recorded = f"device_id={device_id} was removed, so its disconnect is not recorded"
        wait_until(lambda: not_recorded in caplog.messages, "the disconnect write to find no device")

    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert f"control stream closed for device_id={device_id}: an operator removed the device" in caplog.messages


def test_removed_device_report_ends_stream(
    orchestrator: OrchestratorThread, open_stream: Callable[..., ControlStream], caplog: pytest.LogCaptureFixture
) -> None:
    """A report that arrives after another process removed the device ends the stream with the removal error."""
    store = orchestrator.state.store
    device_id, key = register(orchestrator.agent, "edge-01")
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key)
    wait_until(lambda: store.get_device(device_id).connected, "the control stream to open")  # type: ignore[union-attr]
    # Removed in the store alone, as another orchestrator process does, so this process keeps the stream open.
    store.remove_device(device_id, datetime.now(UTC))

    with caplog.at_level(logging.INFO, logger="edgefleet.orchestrator"):
        stream.send(agent_pb2.AgentMessage(reported_state=agent_pb2.ReportedState(desired_generation=0)))
        end = stream.wait_end()

    assert end.code == grpc.StatusCode.PERMISSION_DENIED
    assert "device 'edge-01' was removed from the fleet at " in end.details
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_deploy_racing_removal(orchestrator: OrchestratorThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """A removal that commits while a deploy to the device runs ends the deploy with NOT_FOUND, not INTERNAL."""
    store = orchestrator.state.store
    upload(orchestrator, linear_onnx(1), MODEL, "1")
    device_id, _ = register(orchestrator.agent, "edge-01")
    read_desired_state = store.get_desired_state

    def read_then_remove(requested_id: str) -> object:
        desired = read_desired_state(requested_id)
        store.remove_device(requested_id, datetime.now(UTC))
        return desired

    monkeypatch.setattr(store, "get_desired_state", read_then_remove)
    request = operator_pb2.DeployRequest(model_name=MODEL, model_version="1", device_id=device_id)
    error = rpc_error(lambda: orchestrator.operator.Deploy(request, timeout=30))

    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "device 'edge-01' was removed from the fleet at " in (error.details() or "")


def test_register_racing_removal(orchestrator: OrchestratorThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """A removal that commits after a registration passed the removed-device check rejects the registration."""
    store = orchestrator.state.store
    device_id, key = register(orchestrator.agent, "edge-01")
    register_device = store.register_device

    def remove_then_register(**arguments: Any) -> object:
        store.remove_device(arguments["device_id"], datetime.now(UTC))
        return register_device(**arguments)

    monkeypatch.setattr(store, "register_device", remove_then_register)
    error = rpc_error(lambda: register(orchestrator.agent, device_id, key))

    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "device 'edge-01' was removed from the fleet at " in (error.details() or "")
    assert store.get_device(device_id) is None
    assert store.get_removed_device(device_id) is not None


class ObservedLock:
    """A wrapper of the SQLite writer lock that sets waiting when a thread has to wait for the lock."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.waiting = threading.Event()

    def __enter__(self) -> None:
        if not self.lock.acquire(blocking=False):
            self.waiting.set()
            self.lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.lock.release()


def wait_for_writer(orchestrator: OrchestratorThread, writer_lock: ObservedLock | None) -> None:
    """Wait until a second writer waits: on SQLite for writer_lock, on PostgreSQL for a row lock."""
    if writer_lock is not None:
        assert writer_lock.waiting.wait(STEP_TIMEOUT_S), "the registration did not wait for the writer lock"
        return
    engine = orchestrator.state.store.engine  # type: ignore[attr-defined]
    waiting = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )

    def lock_waiters() -> int:
        with engine.connect() as connection:
            return int(connection.execute(waiting).scalar_one())

    wait_until(lock_waiters, "the registration to wait for the removal's row lock")


def test_register_during_removal_transaction(orchestrator: OrchestratorThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registration that reaches the store while a removal has the device row locked is rejected."""
    store = orchestrator.state.store
    device_id, key = register(orchestrator.agent, "edge-01")
    row_locked = threading.Event()
    release = threading.Event()
    rollouts_including = queries.rollouts_including

    def pause_after_row_lock(*arguments: Any) -> list[str]:
        # remove_device calls this after it locked the device row, inside its transaction.
        row_locked.set()
        release.wait(STEP_TIMEOUT_S)
        return rollouts_including(*arguments)

    monkeypatch.setattr(queries, "rollouts_including", pause_after_row_lock)
    writer_lock = None
    if store.engine.dialect.name == "sqlite":  # type: ignore[attr-defined]
        # SQLite writers of one process queue on the engine's writer lock before BEGIN IMMEDIATE.
        writer_lock = ObservedLock(store._write_lock)  # type: ignore[attr-defined]
        monkeypatch.setattr(store, "_write_lock", writer_lock)
    with ThreadPoolExecutor(max_workers=2) as pool:
        removal = pool.submit(store.remove_device, device_id, datetime.now(UTC))
        assert row_locked.wait(STEP_TIMEOUT_S), "the removal did not lock the device row"
        registration = pool.submit(register, orchestrator.agent, device_id, key)
        wait_for_writer(orchestrator, writer_lock)
        release.set()
        removal.result(STEP_TIMEOUT_S)
        error = registration.exception(STEP_TIMEOUT_S)

    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "device 'edge-01' was removed from the fleet at " in (error.details() or "")
    assert store.get_device(device_id) is None
    assert store.get_removed_device(device_id) is not None


def test_removed_device_rejected(orchestrator: OrchestratorThread, open_stream: Callable[..., ControlStream]) -> None:
    device_id, key = register(orchestrator.agent, "edge-01")
    remove(orchestrator, device_id)

    registration = rpc_error(lambda: register(orchestrator.agent, device_id, key))
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key)
    hello = stream.wait_end()
    upload = rpc_error(lambda: upload_window(orchestrator, device_id, f"{MODEL}:1:source"))

    for code, details in (
        (registration.code(), registration.details() or ""),
        (hello.code, hello.details),
        (upload.code(), upload.details() or ""),
    ):
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "device 'edge-01' was removed from the fleet" in details
    assert orchestrator.state.store.get_device(device_id) is None


def test_removed_id_new_instance_key(orchestrator: OrchestratorThread) -> None:
    """Without TLS the instance key is the credential: an agent with a new key may take the id again."""
    device_id, _ = register(orchestrator.agent, "edge-01")
    remove(orchestrator, device_id)

    register(orchestrator.agent, device_id)

    assert listed_ids(orchestrator) == [device_id]
    assert orchestrator.state.store.get_removed_device(device_id) is None


@pytest.mark.slow
def test_removed_agent_exits(orchestrator: OrchestratorThread, start_agent: Callable[..., AgentThread]) -> None:
    agent = start_agent(orchestrator.address, "edge")
    device_id = wait_until(lambda: agent.agent.device_id, "the agent to register")
    wait_until(lambda: device_id in orchestrator.state.hub.sessions, "the agent's control stream")

    remove(orchestrator, device_id)
    error = agent.join()

    assert isinstance(error, FatalAgentError)
    assert str(error).startswith(f"orchestrator rejected device {device_id}: ")
    assert f"device {device_id!r} was removed from the fleet" in str(error)

    restarted = start_agent(orchestrator.address, "edge")
    error = restarted.join()

    assert isinstance(error, FatalAgentError)
    assert "delete identity.json" in str(error)

    (agent.agent.config.state_dir / IDENTITY_FILE).unlink()
    fresh = start_agent(orchestrator.address, "edge")
    new_id = wait_until(lambda: fresh.agent.device_id, "the agent to register as a new device")

    assert new_id != device_id
    assert listed_ids(orchestrator) == [new_id]


@pytest.mark.slow
def test_readded_agent_takes_deploys(
    orchestrator: OrchestratorThread, start_agent: Callable[..., AgentThread], caplog: pytest.LogCaptureFixture
) -> None:
    """An agent added back under a new id, with its old state directory, accepts that id's first deploy."""
    upload(orchestrator, linear_onnx(1), MODEL, "1")
    agent = start_agent(orchestrator.address, "edge")
    device_id = wait_until(lambda: agent.agent.device_id, "the agent to register")
    wait_until(lambda: device_id in orchestrator.state.hub.sessions, "the agent's control stream")
    # Two deploys raise the agent's anti-rollback counter of the model to 2.
    for generation in (1, 2):
        deploy_model(orchestrator, device_id)
        wait_for_generation(orchestrator, device_id, generation)
    remove(orchestrator, device_id)
    agent.join()
    (agent.agent.config.state_dir / IDENTITY_FILE).unlink()
    caplog.clear()

    fresh = start_agent(orchestrator.address, "edge")
    new_id = wait_until(lambda: fresh.agent.device_id, "the agent to register as a new device")
    wait_until(lambda: new_id in orchestrator.state.hub.sessions, "the new device's control stream")
    generation = deploy_model(orchestrator, new_id)
    # The agent first restores the former id's desired state, whose signatures fail for the new id.
    wait_for_generation(orchestrator, new_id, generation)
    status = wait_until(lambda: model_status(orchestrator, new_id), "the new device to report the model")

    assert status.state == common_pb2.MODEL_STATE_SERVING, status.error
    assert fresh.agent.verifier.counters == {MODEL: 1}
    # The desired state that the former id received is not restored, so its signatures fail nowhere.
    agent_errors = [
        r.getMessage() for r in caplog.records if r.name.startswith("edgefleet.agent") and r.levelno >= logging.ERROR
    ]
    assert agent_errors == []


def deploy_model(orchestrator: OrchestratorThread, device_id: str) -> int:
    """Deploy MODEL:1 to the device; return its new desired generation."""
    request = operator_pb2.DeployRequest(model_name=MODEL, model_version="1", device_id=device_id)
    return orchestrator.operator.Deploy(request, timeout=30).device.desired_generation


def wait_for_generation(orchestrator: OrchestratorThread, device_id: str, generation: int) -> None:
    """Wait until the device reports that it applied the given desired generation."""
    request = operator_pb2.GetDeviceRequest(device_id=device_id)
    wait_until(
        lambda: orchestrator.operator.GetDevice(request, timeout=30).reported_generation == generation,
        f"{device_id} to apply generation {generation}",
    )


def model_status(orchestrator: OrchestratorThread, device_id: str) -> agent_pb2.ModelStatus | None:
    """Return the device's status of MODEL once it is serving or failed, else None."""
    device = orchestrator.operator.GetDevice(operator_pb2.GetDeviceRequest(device_id=device_id), timeout=30)
    done = (common_pb2.MODEL_STATE_SERVING, common_pb2.MODEL_STATE_FAILED)
    return next((m for m in device.models if m.model_name == MODEL and m.state in done), None)


# Rollouts


def start_rollout(orchestrator: OrchestratorThread) -> tuple[operator_pb2.Rollout, str, str]:
    """Start a two-wave rollout on two cameras; return it once wave 1 waits, with its device and the other one."""
    cameras = [register(orchestrator.agent, f"cam-{i}", labels={"kind": "camera"})[0] for i in range(2)]
    upload(orchestrator, linear_onnx(1), MODEL, "1")
    request = operator_pb2.CreateRolloutRequest(
        model_name=MODEL,
        model_version="1",
        target_labels={"kind": "camera"},
        wave_percents=[50, 100],
        budget_ms=50.0,
        max_error_rate_pct=1.0,
        min_samples=20,
    )
    created = orchestrator.operator.CreateRollout(request, timeout=30)

    def first_wave() -> operator_pb2.Rollout | None:
        rollout = orchestrator.operator.GetRollout(
            operator_pb2.GetRolloutRequest(rollout_id=created.rollout_id), timeout=30
        )
        return rollout if rollout.waves and rollout.waves[0].devices else None

    rollout = wait_until(first_wave, "wave 1 to start")
    canary = rollout.waves[0].devices[0].device_id
    later = next(c for c in cameras if c != canary)
    return rollout, canary, later


def test_remove_rejected_during_rollout(orchestrator: OrchestratorThread) -> None:
    rollout, canary, later = start_rollout(orchestrator)

    for device_id in (canary, later):
        error = rpc_error(lambda device_id=device_id: remove(orchestrator, device_id))  # type: ignore[misc]
        details = error.details() or ""

        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"rollout {rollout.rollout_id} includes it and is in progress" in details
        assert f"edgefleet rollout abort {rollout.rollout_id}" in details
        assert "--force" in details
        assert orchestrator.state.store.get_device(device_id) is not None


def test_remove_force_during_rollout(orchestrator: OrchestratorThread) -> None:
    rollout, canary, later = start_rollout(orchestrator)

    response = remove(orchestrator, canary, force=True)

    assert list(response.rollout_ids) == [rollout.rollout_id]
    assert orchestrator.state.store.get_device(canary) is None

    def second_wave() -> operator_pb2.Rollout | None:
        current = orchestrator.operator.GetRollout(
            operator_pb2.GetRolloutRequest(rollout_id=rollout.rollout_id), timeout=30
        )
        return current if current.current_wave == 1 and len(current.waves) == 2 else None

    moved = wait_until(second_wave, "the rollout to go on to wave 2 without the removed canary")
    first = moved.waves[0]

    assert first.decision == operator_pb2.WAVE_DECISION_PROCEED
    assert "1 device removed from the fleet before reporting enough samples" in first.reason
    assert first.devices[0].verdict == "skipped"
    assert [d.device_id for d in moved.waves[1].devices] == [later]


def test_remove_force_lowers_sample_bar(orchestrator: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    """A wave that still waits counts only the samples of the devices that remain in `rollout status`."""
    for i in range(2):
        register(orchestrator.agent, f"cam-{i}", labels={"kind": "camera"})
    upload(orchestrator, linear_onnx(1), MODEL, "1")
    request = operator_pb2.CreateRolloutRequest(
        model_name=MODEL,
        model_version="1",
        target_labels={"kind": "camera"},
        wave_percents=[100],
        budget_ms=50.0,
        max_error_rate_pct=1.0,
        min_samples=40,
    )
    rollout_id = orchestrator.operator.CreateRollout(request, timeout=30).rollout_id

    def wave_devices() -> dict[str, operator_pb2.WaveDevice]:
        rollout = orchestrator.operator.GetRollout(operator_pb2.GetRolloutRequest(rollout_id=rollout_id), timeout=30)
        return {d.device_id: d for d in rollout.waves[0].devices} if rollout.waves else {}

    remaining, removed = wait_until(lambda: len(wave_devices()) == 2 and sorted(wave_devices()), "wave 1 to start")
    upload_window(orchestrator, remaining, wave_devices()[remaining].variant_id)
    wait_until(lambda: wave_devices()[remaining].samples == 30, "the wave to count the uploaded samples")
    before = run_cli(capsys, orchestrator, "rollout", "status", rollout_id)

    remove(orchestrator, removed, force=True)
    wait_until(lambda: wave_devices()[removed].verdict == "skipped", "the wave to skip the removed device")
    after = run_cli(capsys, orchestrator, "rollout", "status", rollout_id)
    rollout = orchestrator.operator.GetRollout(operator_pb2.GetRolloutRequest(rollout_id=rollout_id), timeout=30)

    assert before[0] == 0
    assert "30/80 samples" in before[1]
    assert after[0] == 0
    assert "30/40 samples" in after[1], after[1]
    assert f"waiting for 40 samples per device ({remaining} 30)" in after[1]
    assert rollout.waves[0].decision == operator_pb2.WAVE_DECISION_WAITING


def test_rollout_of_removed_devices_ends_aborted(orchestrator: OrchestratorThread) -> None:
    """A rollout whose devices were all removed with --force does not end as succeeded: no device runs the version."""
    rollout, canary, later = start_rollout(orchestrator)

    remove(orchestrator, canary, force=True)

    def wave_two() -> operator_pb2.Rollout | None:
        current = orchestrator.operator.GetRollout(
            operator_pb2.GetRolloutRequest(rollout_id=rollout.rollout_id), timeout=30
        )
        return current if len(current.waves) == 2 and current.waves[1].devices else None

    wait_until(wave_two, "wave 2 to start")
    remove(orchestrator, later, force=True)

    def ended() -> operator_pb2.Rollout | None:
        current = orchestrator.operator.GetRollout(
            operator_pb2.GetRolloutRequest(rollout_id=rollout.rollout_id), timeout=30
        )
        return current if current.state == operator_pb2.ROLLOUT_STATE_ABORTED else None

    aborted = wait_until(ended, "the rollout to end as aborted")

    assert aborted.reason == (
        f"no device runs {MODEL}:1: all 2 waves passed, but the 2 devices that got it were removed from the "
        "fleet during the rollout; create a new rollout for the devices that remain"
    )


# CLI


def test_cli_remove(orchestrator: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    register(orchestrator.agent, "edge-01")
    register(orchestrator.agent, "edge-02")

    table = run_cli(capsys, orchestrator, "devices", "remove", "edge-01")
    as_json = run_cli(capsys, orchestrator, "devices", "remove", "edge-02", "--output", "json")
    missing = run_cli(capsys, orchestrator, "devices", "remove", "edge-03")

    assert table[0] == 0
    assert table[1].strip() == "removed edge-01"
    assert as_json[0] == 0
    result = json.loads(as_json[1])
    assert result["device_id"] == "edge-02"
    assert result["rollout_ids"] == []
    assert result["stream_closed"] is False
    assert missing[0] != 0
    assert "device 'edge-03' not found" in missing[2]


def test_cli_remove_during_rollout(orchestrator: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    rollout, canary, _ = start_rollout(orchestrator)

    rejected = run_cli(capsys, orchestrator, "devices", "remove", canary)
    forced = run_cli(capsys, orchestrator, "devices", "remove", canary, "--force")

    assert rejected[0] != 0
    assert rollout.rollout_id in rejected[2]
    assert forced[0] == 0
    assert forced[1].strip() == f"removed {canary}; rollouts {rollout.rollout_id} go on without it"
