"""Rollout and drift requests over gRPC and the `edgefleet rollout` CLI, against a real orchestrator."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime

import grpc
import pytest

from edgefleet.cli.main import main as cli_main
from edgefleet.common.serde import timestamp
from edgefleet.common.sketch import LatencySketch
from edgefleet.v1 import agent_pb2, common_pb2, operator_pb2
from tests.servers import (
    ControlStream,
    OrchestratorThread,
    get_device,
    hardware_message,
    linear_onnx,
    register,
    upload,
    wait_until,
)

pytest_plugins = ["tests.servers"]

MODEL = "classifier"
RUNNING = operator_pb2.ROLLOUT_STATE_RUNNING
SUCCEEDED = operator_pb2.ROLLOUT_STATE_SUCCEEDED
PENDING = operator_pb2.ROLLOUT_STATE_PENDING


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def create_request(**fields: object) -> operator_pb2.CreateRolloutRequest:
    values: dict[str, object] = {
        "model_name": MODEL,
        "model_version": "2",
        "target_labels": {"kind": "camera"},
        "wave_percents": [50, 100],
        "budget_ms": 50.0,
        "max_p95_regression_pct": 50.0,
        "max_error_rate_pct": 1.0,
        "min_samples": 20,
    }
    values.update(fields)
    return operator_pb2.CreateRolloutRequest(**values)  # type: ignore[arg-type]


def fleet(orchestrator: OrchestratorThread, cameras: int = 2) -> list[str]:
    """Register cameras and upload versions 1 and 2 of the model; return the device ids."""
    devices = [register(orchestrator.agent, labels={"kind": "camera"})[0] for _ in range(cameras)]
    upload(orchestrator, linear_onnx(1), MODEL, "1")
    upload(orchestrator, linear_onnx(2), MODEL, "2")
    return devices


def get_rollout(orchestrator: OrchestratorThread, rollout_id: str) -> operator_pb2.Rollout:
    return orchestrator.operator.GetRollout(operator_pb2.GetRolloutRequest(rollout_id=rollout_id), timeout=30)


def wait_rollout(
    orchestrator: OrchestratorThread, rollout_id: str, done: Callable[[operator_pb2.Rollout], bool], what: str
) -> operator_pb2.Rollout:
    """Poll the rollout until done(rollout) is true and return it; fail naming what after the step timeout."""
    latest: list[operator_pb2.Rollout] = []

    def check() -> bool:
        latest[:] = [get_rollout(orchestrator, rollout_id)]
        return done(latest[0])

    wait_until(check, what)
    return latest[0]


def report_latency(orchestrator: OrchestratorThread, device: operator_pb2.WaveDevice, latency_ms: float) -> None:
    """Upload one window of 30 inferences of latency_ms for the device's wave variant."""
    sketch = LatencySketch()
    for _ in range(30):
        sketch.add(latency_ms)
    window = common_pb2.MetricWindow(
        model_name=MODEL,
        model_version="2",
        variant_id=device.variant_id,
        window_start=timestamp(datetime.now(UTC)),
        window_seconds=1,
        inference_count=30,
        latency=sketch.to_proto(),
    )
    request = agent_pb2.UploadMetricsRequest(
        device_id=device.device_id, batch_id=f"{device.device_id}-{datetime.now(UTC).timestamp()}", windows=[window]
    )
    orchestrator.agent.UploadMetrics(request, timeout=30)


def serve_current_wave(orchestrator: OrchestratorThread, rollout_id: str, latency_ms: float) -> operator_pb2.Wave:
    rollout = get_rollout(orchestrator, rollout_id)
    wave = [w for w in rollout.waves if w.index == rollout.current_wave][-1]
    for device in wave.devices:
        report_latency(orchestrator, device, latency_ms)
    return wave


def run_cli(capsys: pytest.CaptureFixture[str], orchestrator: OrchestratorThread, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process against the orchestrator; return the exit code, stdout and stderr."""
    code = cli_main(["--orchestrator", orchestrator.address, "--insecure", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# Requests


def test_create_pending(orchestrator: OrchestratorThread) -> None:
    fleet(orchestrator)
    rollout = orchestrator.operator.CreateRollout(create_request(), timeout=30)
    assert rollout.rollout_id.startswith("ro-")
    assert rollout.state == operator_pb2.ROLLOUT_STATE_PENDING
    assert rollout.min_samples == 20


def test_create_latest_version(orchestrator: OrchestratorThread) -> None:
    fleet(orchestrator)
    rollout = orchestrator.operator.CreateRollout(create_request(model_version=""), timeout=30)
    assert rollout.model_version == "2"


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"wave_percents": [50, 40, 100]}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"wave_percents": [10, 50]}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"budget_ms": 0.0}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"max_error_rate_pct": 150.0}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"model_version": "9"}, grpc.StatusCode.NOT_FOUND),
    ],
)
def test_create_rejects(orchestrator: OrchestratorThread, fields: dict[str, object], code: grpc.StatusCode) -> None:
    fleet(orchestrator, cameras=0)
    error = rpc_error(lambda: orchestrator.operator.CreateRollout(create_request(**fields), timeout=30))
    assert error.code() == code


def test_create_budget_error_plain_numbers(orchestrator: OrchestratorThread) -> None:
    fleet(orchestrator, cameras=0)
    error = rpc_error(lambda: orchestrator.operator.CreateRollout(create_request(budget_ms=5_000_000.0), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "5000000 must be above 0 and at most 3600000" in (error.details() or "")


def test_get_unknown(orchestrator: OrchestratorThread) -> None:
    error = rpc_error(lambda: get_rollout(orchestrator, "ro-missing"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_rollout_succeeds(orchestrator: OrchestratorThread) -> None:
    devices = fleet(orchestrator)
    rollout = orchestrator.operator.CreateRollout(create_request(), timeout=30)
    running = wait_until(lambda: get_rollout(orchestrator, rollout.rollout_id).state == RUNNING, "wave 1")
    first = serve_current_wave(orchestrator, rollout.rollout_id, 5.0)
    wait_until(lambda: get_rollout(orchestrator, rollout.rollout_id).current_wave == 1, "wave 2")
    serve_current_wave(orchestrator, rollout.rollout_id, 5.0)
    done = wait_rollout(orchestrator, rollout.rollout_id, lambda r: r.state == SUCCEEDED, "success")
    assert running
    assert len(first.devices) == 1
    assert [w.decision for w in done.waves] == [operator_pb2.WAVE_DECISION_PROCEED] * 2
    assert {a.model_version for d in devices for a in get_device(orchestrator, d).desired} == {"2"}


def test_rollout_all_skipped_aborts(orchestrator: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    litert_only = hardware_message(runtimes=[common_pb2.Runtime(name="litert", version="2.3.0")])
    devices = [register(orchestrator.agent, hardware=litert_only, labels={"kind": "camera"})[0] for _ in range(2)]
    upload(orchestrator, linear_onnx(2), MODEL, "2")
    rollout = orchestrator.operator.CreateRollout(create_request(), timeout=30)

    done = wait_rollout(
        orchestrator, rollout.rollout_id, lambda r: r.state not in (PENDING, RUNNING), "the end of the rollout"
    )
    code, out, _ = run_cli(capsys, orchestrator, "rollout", "status", rollout.rollout_id)
    watch_code, watch_out, watch_err = run_cli(capsys, orchestrator, "rollout", "status", rollout.rollout_id, "--watch")

    assert done.state == operator_pb2.ROLLOUT_STATE_ABORTED
    assert done.reason.startswith(f"no device runs {MODEL}:2: 2 devices skipped")
    for device_id in devices:
        assert f"{device_id}: no variant qualifies" in done.reason
    assert "format not runnable: onnx" in done.reason
    assert any(f"edgefleet explain --model {MODEL}:2 --device {d}`" in done.reason for d in devices)
    assert "create a new rollout" in done.reason
    assert code == 0
    assert "ABORTED" in out
    assert "SUCCEEDED" not in out
    assert watch_code == 1
    assert "ABORTED" in watch_out
    assert f"rollout {rollout.rollout_id} ended aborted: no device runs {MODEL}:2" in watch_err


def test_rollout_some_skipped_succeeds(orchestrator: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    litert_only = hardware_message(runtimes=[common_pb2.Runtime(name="litert", version="2.3.0")])
    skipped = register(orchestrator.agent, hardware=litert_only, labels={"kind": "camera"})[0]
    runnable = register(orchestrator.agent, labels={"kind": "camera"})[0]
    upload(orchestrator, linear_onnx(2), MODEL, "2")
    rollout = orchestrator.operator.CreateRollout(create_request(wave_percents=[100]), timeout=30)
    wait_until(lambda: get_rollout(orchestrator, rollout.rollout_id).state == RUNNING, "wave 1")
    wave = serve_current_wave(orchestrator, rollout.rollout_id, 5.0)

    done = wait_rollout(orchestrator, rollout.rollout_id, lambda r: r.state == SUCCEEDED, "success")
    watch_code, watch_out, watch_err = run_cli(capsys, orchestrator, "rollout", "status", rollout.rollout_id, "--watch")

    assert watch_code == 0, watch_err
    assert "SUCCEEDED" in watch_out
    assert {d.device_id: d.variant_id != "" for d in wave.devices} == {skipped: False, runnable: True}
    assert done.reason == f"all 1 waves passed; 1 device runs {MODEL}:2"
    assert "1 device skipped" in done.waves[0].reason


def test_revoked_device_not_in_rollout(orchestrator: OrchestratorThread) -> None:
    revoked, kept = fleet(orchestrator)
    orchestrator.operator.RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id=revoked, reason="lost"), timeout=30)
    rollout = orchestrator.operator.CreateRollout(create_request(wave_percents=[100]), timeout=30)
    running = wait_rollout(orchestrator, rollout.rollout_id, lambda r: r.state == RUNNING, "wave 1")
    assert [d.device_id for w in running.waves for d in w.devices] == [kept]


def test_over_budget_rolls_back(orchestrator: OrchestratorThread) -> None:
    devices = fleet(orchestrator, cameras=1)
    rollout = orchestrator.operator.CreateRollout(create_request(wave_percents=[100]), timeout=30)
    wait_until(lambda: get_rollout(orchestrator, rollout.rollout_id).state == RUNNING, "wave 1")
    serve_current_wave(orchestrator, rollout.rollout_id, 500.0)
    done = wait_rollout(
        orchestrator, rollout.rollout_id, lambda r: r.state == operator_pb2.ROLLOUT_STATE_ROLLED_BACK, "rollback"
    )
    assert done.waves[0].decision == operator_pb2.WAVE_DECISION_ROLLBACK
    assert done.waves[0].devices[0].verdict == "over_budget"
    assert list(get_device(orchestrator, devices[0]).desired) == []


def test_update_actions(orchestrator: OrchestratorThread) -> None:
    fleet(orchestrator)
    rollout = orchestrator.operator.CreateRollout(create_request(), timeout=30)
    update = orchestrator.operator.UpdateRollout
    paused = update(
        operator_pb2.UpdateRolloutRequest(rollout_id=rollout.rollout_id, action=operator_pb2.ROLLOUT_ACTION_PAUSE),
        timeout=30,
    )
    error = rpc_error(
        lambda: update(
            operator_pb2.UpdateRolloutRequest(rollout_id=rollout.rollout_id, action=operator_pb2.ROLLOUT_ACTION_PAUSE),
            timeout=30,
        )
    )
    aborted = update(
        operator_pb2.UpdateRolloutRequest(rollout_id=rollout.rollout_id, action=operator_pb2.ROLLOUT_ACTION_ABORT),
        timeout=30,
    )
    assert paused.state == operator_pb2.ROLLOUT_STATE_PAUSED
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert aborted.state == operator_pb2.ROLLOUT_STATE_ABORTED


def test_list_filters(orchestrator: OrchestratorThread) -> None:
    fleet(orchestrator)
    upload(orchestrator, linear_onnx(3), MODEL, "3")
    old = orchestrator.operator.CreateRollout(create_request(), timeout=30)
    new = orchestrator.operator.CreateRollout(create_request(model_version="3"), timeout=30)
    # The new rollout supersedes the old one when it assigns its first device.
    wait_rollout(orchestrator, old.rollout_id, lambda r: r.superseded_by == new.rollout_id, "old rollout superseded")
    superseded = orchestrator.operator.ListRollouts(
        operator_pb2.ListRolloutsRequest(states=[operator_pb2.ROLLOUT_STATE_SUPERSEDED]), timeout=30
    )
    every = orchestrator.operator.ListRollouts(operator_pb2.ListRolloutsRequest(model_name=MODEL), timeout=30)
    assert [r.rollout_id for r in superseded.rollouts] == [old.rollout_id]
    assert superseded.rollouts[0].superseded_by == new.rollout_id
    assert [r.rollout_id for r in every.rollouts] == [new.rollout_id, old.rollout_id]


def test_drift_on_device(orchestrator: OrchestratorThread) -> None:
    devices = fleet(orchestrator, cameras=2)
    orchestrator.operator.Deploy(
        operator_pb2.DeployRequest(model_name=MODEL, model_version="1", device_id=devices[0]), timeout=30
    )
    device = get_device(orchestrator, devices[0])
    drifting = orchestrator.operator.ListDevices(operator_pb2.ListDevicesRequest(drift_only=True), timeout=30)
    assert {d.kind for d in device.drift} == {"generation_lag", "missing"}
    assert [d.device_id for d in drifting.devices] == [devices[0]]


# CLI


def test_cli_create_and_status(orchestrator: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    fleet(orchestrator)
    code, out, _ = run_cli(
        capsys,
        orchestrator,
        "rollout",
        "create",
        "--model",
        f"{MODEL}:2",
        "--target",
        "kind=camera",
        "--waves",
        "50,100",
        "--budget-ms",
        "40",
        "--max-p95-regression",
        "20",
        "--max-error-rate",
        "1",
        "--min-samples",
        "20",
        "-o",
        "json",
    )
    created = json.loads(out)
    wait_until(lambda: get_rollout(orchestrator, created["rollout_id"]).state == RUNNING, "wave 1")
    status_code, status, _ = run_cli(capsys, orchestrator, "rollout", "status", created["rollout_id"])
    assert code == 0
    assert created["state"] == "pending"
    assert created["target"] == "kind=camera"
    assert status_code == 0
    assert "RUNNING" in status
    assert "wave 1 (50%)" in status
    assert "0/20 samples" in status


def report_wave_serving(stream: ControlStream, device: operator_pb2.WaveDevice, key: str) -> None:
    """Open the device's control stream and report its wave variant serving."""
    stream.hello(device.device_id, key)
    status = agent_pb2.ModelStatus(
        model_name=MODEL,
        model_version="2",
        variant_id=device.variant_id,
        state=common_pb2.MODEL_STATE_SERVING,
        runtime="onnxruntime",
        threads=1,
    )
    status.updated_at.GetCurrentTime()
    stream.send(agent_pb2.AgentMessage(reported_state=agent_pb2.ReportedState(models=[status])))


def test_cli_status_marks_wave_ended_undecided(
    orchestrator: OrchestratorThread,
    capsys: pytest.CaptureFixture[str],
    open_stream: Callable[..., ControlStream],
) -> None:
    """A rollback by the operator while a wave device downloads leaves the wave undecided, as status shows."""
    device_id, key = register(orchestrator.agent, labels={"kind": "camera"})
    upload(orchestrator, linear_onnx(1), MODEL, "1")
    upload(orchestrator, linear_onnx(2), MODEL, "2")
    rollout = orchestrator.operator.CreateRollout(create_request(wave_percents=[100]), timeout=30)
    running = wait_rollout(orchestrator, rollout.rollout_id, lambda r: bool(r.waves), "wave 1 to start")
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key)
    status = agent_pb2.ModelStatus(
        model_name=MODEL,
        model_version="2",
        variant_id=running.waves[0].devices[0].variant_id,
        state=common_pb2.MODEL_STATE_DOWNLOADING,
    )
    status.updated_at.GetCurrentTime()
    stream.send(agent_pb2.AgentMessage(reported_state=agent_pb2.ReportedState(models=[status])))
    downloading = common_pb2.MODEL_STATE_DOWNLOADING
    wait_rollout(
        orchestrator, rollout.rollout_id, lambda r: r.waves[0].devices[0].state == downloading, "the download to count"
    )
    stream.close()  # A connected device that does not apply the rollback would hold it for minutes.
    wait_until(lambda: not orchestrator.state.store.get_device(device_id).connected, "the device to disconnect")

    rollback_code, _, rollback_err = run_cli(capsys, orchestrator, "rollout", "rollback", rollout.rollout_id)
    wait_rollout(
        orchestrator, rollout.rollout_id, lambda r: r.state == operator_pb2.ROLLOUT_STATE_ROLLED_BACK, "rollback"
    )
    code, table, err = run_cli(capsys, orchestrator, "rollout", "status", rollout.rollout_id)

    assert rollback_code == 0, rollback_err
    assert code == 0, err
    # A long wave line wraps; joining the lines back checks its text.
    assert "UNDECIDED: the rollout ended rolled_back first; it was waiting:" in " ".join(table.split())
    assert re.search(r" downloading when the rollout ended \(last seen \d+s ago\) ", table)


def test_cli_long_reason_wrapped_and_cut(capsys: pytest.CaptureFixture[str]) -> None:
    """A long reason wraps in `rollout status` and is cut in `rollout list`; JSON keeps it whole."""
    from edgefleet.cli.rollout import REASON_WIDTH, WRAP_WIDTH, _wrapped, render_rollouts

    reason = "no device runs m:2: " + "; ".join(f"dev-{i:03d}: no variant fits the budget of 5 ms" for i in range(30))
    lines = _wrapped("reason:  ", reason).splitlines()
    listed = {
        "rollout_id": "ro-1", "model": "m", "version": "2", "state": "aborted", "stuck": False, "current_wave": 0,
        "waves": [], "wave_percents": [100], "target": "kind=camera", "budget_ms": 5.0, "created_at": "-",
        "reason": reason,
    }

    assert len(lines) > 1
    assert all(len(line) <= WRAP_WIDTH for line in lines)
    assert " ".join(" ".join(lines).split()) == "reason: " + reason
    row = render_rollouts([listed]).splitlines()[1]
    assert row.endswith(reason[: REASON_WIDTH - 3] + "...")


def test_cli_status_offline_state_marked(
    orchestrator: OrchestratorThread,
    capsys: pytest.CaptureFixture[str],
    open_stream: Callable[..., ControlStream],
) -> None:
    """A wave device that is offline now shows its recorded state as its last report, with its age."""
    keys = dict(register(orchestrator.agent, labels={"kind": "camera"}) for _ in range(2))
    upload(orchestrator, linear_onnx(1), MODEL, "1")
    upload(orchestrator, linear_onnx(2), MODEL, "2")
    rollout = orchestrator.operator.CreateRollout(create_request(wave_percents=[100]), timeout=30)
    running = wait_rollout(orchestrator, rollout.rollout_id, lambda r: bool(r.waves), "wave 1 to start")
    online, offline = running.waves[0].devices
    report_wave_serving(open_stream(orchestrator.agent), online, keys[online.device_id])
    closed = open_stream(orchestrator.agent)
    report_wave_serving(closed, offline, keys[offline.device_id])
    serving = common_pb2.MODEL_STATE_SERVING
    wait_rollout(
        orchestrator,
        rollout.rollout_id,
        lambda r: all(d.state == serving for d in r.waves[0].devices),
        "both devices to be judged serving",
    )
    closed.close()
    offline_status = common_pb2.DEVICE_STATUS_OFFLINE
    wait_until(lambda: get_device(orchestrator, offline.device_id).status == offline_status, "a device to go offline")

    code, table, err = run_cli(capsys, orchestrator, "rollout", "status", rollout.rollout_id)
    json_code, json_out, json_err = run_cli(capsys, orchestrator, "rollout", "status", rollout.rollout_id, "-o", "json")
    list_code, list_out, list_err = run_cli(capsys, orchestrator, "rollout", "list", "-o", "json")

    assert code == 0, err
    rows = {line.split()[0]: line for line in table.splitlines() if line.startswith("  ") and "DEVICE" not in line}
    assert re.search(r" serving \(last seen \d+s ago\) ", rows[offline.device_id])
    assert re.search(r" serving +\d+ ", rows[online.device_id])
    assert json_code == 0, json_err
    devices = {d["device_id"]: d for d in json.loads(json_out)["waves"][0]["devices"]}
    assert devices[offline.device_id]["state"] == "serving"
    assert devices[offline.device_id]["device_status"] == "offline"
    assert devices[offline.device_id]["current"] is False
    assert devices[offline.device_id]["last_seen"] is not None
    assert devices[online.device_id]["state"] == "serving"
    assert devices[online.device_id]["device_status"] == "online"
    assert devices[online.device_id]["current"] is True
    assert list_code == 0, list_err
    listed = json.loads(list_out)[0]["waves"][0]["devices"]
    assert {d["device_id"]: d["current"] for d in listed} == {offline.device_id: False, online.device_id: True}


def test_cli_actions(orchestrator: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    fleet(orchestrator)
    rollout = orchestrator.operator.CreateRollout(create_request(), timeout=30)
    wait_until(lambda: get_rollout(orchestrator, rollout.rollout_id).state == RUNNING, "wave 1")
    states = []
    for verb in ("pause", "resume", "abort", "rollback"):
        code, out, err = run_cli(capsys, orchestrator, "rollout", verb, rollout.rollout_id, "-o", "json")
        assert code == 0, err
        states.append(json.loads(out)["state"])
    assert states == ["paused", "running", "aborted", "rolling_back"]


def test_cli_action_wrong_state(orchestrator: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    fleet(orchestrator)
    rollout = orchestrator.operator.CreateRollout(create_request(), timeout=30)
    code, _, err = run_cli(capsys, orchestrator, "rollout", "resume", rollout.rollout_id)
    assert code == 4
    assert "cannot resume" in err


def test_cli_list(orchestrator: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    fleet(orchestrator)
    rollout = orchestrator.operator.CreateRollout(create_request(), timeout=30)
    code, out, _ = run_cli(capsys, orchestrator, "rollout", "list", "--model", MODEL)
    json_code, json_out, _ = run_cli(capsys, orchestrator, "rollout", "list", "--state", "superseded", "-o", "json")
    assert code == 0
    assert rollout.rollout_id in out
    assert json_code == 0
    assert json.loads(json_out) == []


def test_cli_create_unmatched_target_warns(
    orchestrator: OrchestratorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet(orchestrator)
    running = orchestrator.operator.CreateRollout(create_request(), timeout=30)
    wait_until(lambda: get_rollout(orchestrator, running.rollout_id).state == RUNNING, "wave 1")
    code, out, err = run_cli(
        capsys,
        orchestrator,
        "rollout",
        "create",
        "--model",
        f"{MODEL}:2",
        "--target",
        "kidn=camera",
        "--budget-ms",
        "5",
    )
    typo = re.search(r"rollout (ro-[0-9a-f]+)", out)
    assert code == 0
    assert "warning: no registered device matches the target kidn=camera" in err
    text = " ".join(out.split())  # The reason wraps over lines.
    assert "no device has the label 'kidn'; did you mean kind?" in text
    assert f"{running.rollout_id} (running) goes on until this rollout assigns its first device" in text
    assert typo is not None
    assert get_rollout(orchestrator, running.rollout_id).state == RUNNING
    assert get_rollout(orchestrator, typo.group(1)).state == PENDING


def test_cli_create_matched_target_no_warning(
    orchestrator: OrchestratorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet(orchestrator)
    code, _, err = run_cli(
        capsys,
        orchestrator,
        "rollout",
        "create",
        "--model",
        f"{MODEL}:2",
        "--target",
        "kind=camera",
        "--budget-ms",
        "5",
    )
    assert code == 0
    assert "no registered device matches" not in err


def test_cli_rollback_superseded_names_newer(
    orchestrator: OrchestratorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet(orchestrator)
    old = orchestrator.operator.CreateRollout(create_request(), timeout=30)
    new = orchestrator.operator.CreateRollout(create_request(), timeout=30)
    wait_rollout(orchestrator, old.rollout_id, lambda r: r.superseded_by == new.rollout_id, "old rollout superseded")
    code, _, err = run_cli(capsys, orchestrator, "rollout", "rollback", old.rollout_id)
    assert code == 4
    assert f"superseded by rollout {new.rollout_id}" in err
    assert f"edgefleet rollout rollback {new.rollout_id}" in err


def test_cli_deploy_in_wave_warns(orchestrator: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    devices = fleet(orchestrator)
    rollout = orchestrator.operator.CreateRollout(create_request(), timeout=30)
    running = wait_rollout(orchestrator, rollout.rollout_id, lambda r: r.state == RUNNING, "wave 1")
    in_wave = running.waves[0].devices[0].device_id
    outside = next(d for d in devices if d != in_wave)
    code, _, err = run_cli(capsys, orchestrator, "deploy", "--model", f"{MODEL}:1", "--device", in_wave)
    outside_code, _, outside_err = run_cli(capsys, orchestrator, "deploy", "--model", f"{MODEL}:1", "--device", outside)

    def reassigned(r: operator_pb2.Rollout) -> bool:
        return any(d.device_id == in_wave and d.verdict == "reassigned" for d in r.waves[0].devices)

    judged = wait_rollout(orchestrator, rollout.rollout_id, reassigned, "wave device marked reassigned")
    assert code == 0
    assert f"device {in_wave} was in wave 1 of rollout {rollout.rollout_id}" in err
    assert outside_code == 0
    assert "was in wave" not in outside_err
    # The wave's only device left it unmeasured, so the wave waits for an operator instead of passing.
    assert judged.waves[0].decision == operator_pb2.WAVE_DECISION_PAUSE
    assert "no device of this wave was measured" in judged.waves[0].reason


def test_cli_bad_target(orchestrator: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        capsys, orchestrator, "rollout", "create", "--model", f"{MODEL}:2", "--target", "camera", "--budget-ms", "5"
    )
    assert code == 2
    assert "expected KEY=VALUE" in err


def test_cli_devices_drift(orchestrator: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    devices = fleet(orchestrator)
    orchestrator.operator.Deploy(
        operator_pb2.DeployRequest(model_name=MODEL, model_version="1", device_id=devices[1]), timeout=30
    )
    show_code, shown, _ = run_cli(capsys, orchestrator, "devices", "show", devices[1])
    list_code, listed, _ = run_cli(capsys, orchestrator, "devices", "list", "--drift", "-o", "json")
    assert show_code == 0
    assert "DRIFT: generation_lag" in shown
    assert list_code == 0
    assert [d["device_id"] for d in json.loads(listed)] == [devices[1]]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"target_labels": {"knd": "camera"}}, "(no device has the label 'knd'; did you mean kind?)"),
        ({"target_labels": {"kind": "camra"}}, "(no device has kind=camra; the values of kind are camera)"),
        ({"target_hardware_class": "plc-*"}, "(no hardware class matches 'plc-*'; the classes are "),
    ],
)
def test_unmatched_target_reason(orchestrator: OrchestratorThread, fields: dict[str, object], expected: str) -> None:
    fleet(orchestrator)
    rollout = orchestrator.operator.CreateRollout(create_request(**fields), timeout=30)

    waiting = wait_rollout(
        orchestrator, rollout.rollout_id, lambda r: r.reason.startswith("waiting for a device"), "waiting reason"
    )

    assert waiting.state == operator_pb2.ROLLOUT_STATE_PENDING
    assert expected in waiting.reason


@pytest.mark.parametrize(
    ("state", "status", "expected"),
    [
        ("serving", "online", "serving"),
        ("serving", None, "serving (removed)"),
        ("", None, "- (removed)"),
        ("", "offline", "- (offline)"),
        ("", "online", "-"),
    ],
)
def test_cli_wave_device_state_marks_removed_and_silent(state: str, status: str | None, expected: str) -> None:
    from edgefleet.cli.rollout import wave_device_state

    device = {"state": state, "device_status": status, "last_seen": None}

    assert wave_device_state(device) == expected
