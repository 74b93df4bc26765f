"""The operator CLI run as a subprocess against a real orchestrator."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgefleet.common.errors import EXIT_UNAVAILABLE
from edgefleet.v1 import agent_pb2, common_pb2, operator_pb2
from tests.servers import (
    ControlStream,
    OrchestratorThread,
    cli_command,
    get_device,
    hardware_message,
    linear_onnx,
    register,
    upload,
    wait_until,
)

pytest_plugins = ["tests.servers"]

StartOrchestrator = Callable[..., OrchestratorThread]
DEVICE_KEYS = {"device_id", "status", "usable_cores", "memory_bytes", "cpu_features", "runtimes"}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m edgefleet.cli.main ARGS` and return the finished process with text output."""
    environment = {key: value for key, value in os.environ.items() if key != "EDGEFLEET_ORCHESTRATOR"}
    environment.update(env or {})
    return subprocess.run(
        cli_command(*args),
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )


def closed_port() -> int:
    """Return a loopback port that nothing listens on (it was free a moment ago)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def fleet(start_orchestrator: StartOrchestrator) -> OrchestratorThread:
    """Return an orchestrator with two registered devices, camera-01 and plc-01."""
    orchestrator = start_orchestrator()
    register(
        orchestrator.agent,
        "camera-01",
        hardware=hardware_message(
            usable_cores=1.0,
            memory_total_bytes=512 * 1024**2,
            memory_available_bytes=0,
            cpu_features=["avx2"],
        ),
        labels={"kind": "camera"},
    )
    register(orchestrator.agent, "plc-01", labels={"kind": "plc"})
    return orchestrator


def test_devices_list_json(fleet: OrchestratorThread) -> None:
    result = run_cli("--orchestrator", fleet.address, "devices", "list", "--output", "json")

    assert result.returncode == 0, result.stderr
    devices = json.loads(result.stdout)
    assert isinstance(devices, list)
    assert [d["device_id"] for d in devices] == ["camera-01", "plc-01"]
    assert all(set(d) >= DEVICE_KEYS for d in devices)
    camera = devices[0]
    assert camera["status"] == "offline"
    assert camera["usable_cores"] == 1.0
    assert camera["memory_bytes"] == 512 * 1024**2
    assert camera["cpu_features"] == ["avx2"]
    assert [r["name"] for r in camera["runtimes"]] == ["onnxruntime", "litert"]


def test_devices_list_label(fleet: OrchestratorThread) -> None:
    result = run_cli("--orchestrator", fleet.address, "devices", "list", "--label", "kind=plc", "-o", "json")

    assert result.returncode == 0, result.stderr
    assert [d["device_id"] for d in json.loads(result.stdout)] == ["plc-01"]


def test_devices_list_table(fleet: OrchestratorThread) -> None:
    result = run_cli("--orchestrator", fleet.address, "devices", "list")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "STATUS", "PROFILE"]
    assert [line.split()[0] for line in lines[1:]] == ["camera-01", "plc-01"]


def test_models_list_small_counts(fleet: OrchestratorThread) -> None:
    upload(fleet, linear_onnx(), "linear", "1")

    listed = run_cli("--orchestrator", fleet.address, "--insecure", "models", "list")
    variants = run_cli("--orchestrator", fleet.address, "--insecure", "models", "variants", "linear:1")

    assert listed.returncode == 0, listed.stderr
    assert variants.returncode == 0, variants.stderr
    # linear_onnx has 12 MACs (a 1x4 by 4x3 MatMul) and 15 parameters, which once printed as 0.0M and 0.00M.
    assert listed.stdout.splitlines()[1].split()[6:8] == ["12", "15"]  # SIZE is two words, "254 B".
    assert variants.stdout.splitlines()[1].split()[6] == "12"


def test_models_list_unknown_name_says_so(fleet: OrchestratorThread) -> None:
    listed = run_cli("--orchestrator", fleet.address, "--insecure", "models", "list", "--name", "nope")
    as_json = run_cli("--orchestrator", fleet.address, "--insecure", "models", "list", "--name", "nope", "-o", "json")

    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1:] == []
    assert "no model named 'nope'; `edgefleet models list` shows every name" in listed.stderr
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == []


def test_devices_show_json(fleet: OrchestratorThread) -> None:
    result = run_cli("--orchestrator", fleet.address, "devices", "show", "plc-01", "-o", "json")

    assert result.returncode == 0, result.stderr
    device = json.loads(result.stdout)
    assert device["device_id"] == "plc-01"
    assert device["labels"] == {"kind": "plc"}


def test_env_orchestrator(fleet: OrchestratorThread) -> None:
    result = run_cli("devices", "list", "-o", "json", env={"EDGEFLEET_ORCHESTRATOR": fleet.address})

    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == 2


def test_flag_overrides_env(fleet: OrchestratorThread) -> None:
    unreachable = f"127.0.0.1:{closed_port()}"

    result = run_cli(
        "--orchestrator", fleet.address, "devices", "list", "-o", "json", env={"EDGEFLEET_ORCHESTRATOR": unreachable}
    )

    assert result.returncode == 0, result.stderr


def test_unreachable(tmp_path: Path) -> None:
    address = f"127.0.0.1:{closed_port()}"

    result = run_cli("--orchestrator", address, "--timeout", "3", "devices", "list")

    assert result.returncode == EXIT_UNAVAILABLE
    assert address in result.stderr
    assert "cannot reach the orchestrator" in result.stderr
    assert result.stdout == ""


def test_slow_call_names_timeout(fleet: OrchestratorThread) -> None:
    result = run_cli("--orchestrator", fleet.address, "--timeout", "0.0001", "devices", "list")

    assert result.returncode == EXIT_UNAVAILABLE
    assert f"the orchestrator at {fleet.address} did not finish the call within --timeout 0.0001 s" in result.stderr
    assert "retry with a larger --timeout" in result.stderr


def test_silent_listener_unreachable() -> None:
    """A port that accepts TCP connections but never responds is not a slow orchestrator."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"

        started = time.monotonic()
        result = run_cli("--orchestrator", address, "--timeout", "1", "devices", "list")
        elapsed_s = time.monotonic() - started

    assert result.returncode == EXIT_UNAVAILABLE
    assert f"cannot reach the orchestrator at {address}" in result.stderr
    # The call and the health check after it wait 1 s each; the rest is the interpreter's start.
    assert elapsed_s < 5, f"the CLI took {elapsed_s:.1f} s with --timeout 1"


def test_unknown_device(fleet: OrchestratorThread) -> None:
    result = run_cli("--orchestrator", fleet.address, "devices", "show", "camera-1")

    assert result.returncode == 3
    assert "camera-1" in result.stderr
    assert "did you mean camera-01" in result.stderr


def test_invalid_device_id(fleet: OrchestratorThread) -> None:
    result = run_cli("--orchestrator", fleet.address, "devices", "show", "../etc")

    assert result.returncode == 2
    assert "device_id" in result.stderr


def test_invalid_label_flag(fleet: OrchestratorThread) -> None:
    result = run_cli("--orchestrator", fleet.address, "devices", "list", "--label", "kind")

    assert result.returncode == 2
    assert "KEY=VALUE" in result.stderr


def test_models_add_and_deploy(fleet: OrchestratorThread, tmp_path: Path) -> None:
    model_path = tmp_path / "linear.onnx"
    model_path.write_bytes(linear_onnx())

    added = run_cli(
        "--orchestrator",
        fleet.address,
        "models",
        "add",
        str(model_path),
        "--name",
        "linear",
        "--version",
        "1",
        "-o",
        "json",
    )
    again = run_cli(
        "--orchestrator",
        fleet.address,
        "models",
        "add",
        str(model_path),
        "--name",
        "linear",
        "--version",
        "1",
        "-o",
        "json",
    )
    listed = run_cli("--orchestrator", fleet.address, "models", "list", "-o", "json")
    deployed = run_cli(
        "--orchestrator", fleet.address, "deploy", "--model", "linear", "--device", "plc-01", "-o", "json"
    )

    assert added.returncode == 0, added.stderr
    model = json.loads(added.stdout)
    assert model["name"] == "linear"
    assert model["macs"] == 12
    assert [v["variant_id"] for v in model["variants"]] == ["linear:1:source"]
    assert again.returncode == 0, again.stderr
    assert [m["name"] for m in json.loads(listed.stdout)] == ["linear"]
    assert deployed.returncode == 0, deployed.stderr
    result = json.loads(deployed.stdout)
    assert result["variant_id"] == "linear:1:source"
    assert result["desired_generation"] >= 1


def test_deploy_wait_times_out(fleet: OrchestratorThread) -> None:
    """A device without an agent never reports, so --wait runs out with its own exit code."""
    upload(fleet, linear_onnx(), "linear", "1")

    deployed = run_cli(
        "--orchestrator", fleet.address, "deploy", "--model", "linear", "--device", "plc-01", "--wait", "1"
    )

    assert deployed.returncode == 75, deployed.stderr
    assert (
        "timed out after 1 s waiting for linear:1:source on plc-01 "
        "(state: not reported yet; the device reports generation 0 of 1)"
    ) in deployed.stderr


def report_first_generation(
    fleet: OrchestratorThread, open_stream: Callable[..., ControlStream], state: int, error: str = ""
) -> str:
    """Deploy linear:1 to a new device edge-01, report it in state for generation 1, and return the device id."""
    upload(fleet, linear_onnx(), "linear", "1")
    device_id, key = register(fleet.agent, "edge-01")
    deploy = operator_pb2.DeployRequest(model_name="linear", model_version="1", device_id=device_id)
    assignment = fleet.operator.Deploy(deploy, timeout=30).assignment
    stream = open_stream(fleet.agent)
    stream.hello(device_id, key, generation=1)
    status = agent_pb2.ModelStatus(
        model_name="linear",
        model_version="1",
        variant_id=assignment.variant_id,
        digest=assignment.digest,
        state=state,
        error=error,
    )
    if state == common_pb2.MODEL_STATE_SERVING:
        status.runtime, status.threads = "onnxruntime", 1
    status.updated_at.GetCurrentTime()
    stream.send(agent_pb2.AgentMessage(reported_state=agent_pb2.ReportedState(desired_generation=1, models=[status])))
    wait_until(lambda: get_device(fleet, device_id).reported_generation == 1, "generation 1 to be reported")
    return device_id


def test_deploy_wait_ignores_earlier_report(
    fleet: OrchestratorThread, open_stream: Callable[..., ControlStream]
) -> None:
    """A redeploy of the served variant waits for the new generation, not the report of the one before."""
    device_id = report_first_generation(fleet, open_stream, common_pb2.MODEL_STATE_SERVING)

    # The device reports nothing more, so it never applies generation 2.
    deployed = run_cli(
        "--orchestrator", fleet.address, "deploy", "--model", "linear:1", "--device", device_id,
        "--threads", "2", "--wait", "1",
    )  # fmt: skip

    assert deployed.returncode == 75, deployed.stdout
    assert "(state: serving; the device reports generation 1 of 2)" in deployed.stderr


def test_deploy_earlier_failure_exits_zero(
    fleet: OrchestratorThread, open_stream: Callable[..., ControlStream]
) -> None:
    """A failure reported for the previous desired state does not fail a new deploy without --wait."""
    device_id = report_first_generation(fleet, open_stream, common_pb2.MODEL_STATE_FAILED, "no space left on device")
    command = ("--orchestrator", fleet.address, "deploy", "--model", "linear:1", "--device", device_id)

    # The device reports nothing more, so generations 2 and 3 stay unapplied.
    deployed = run_cli(*command, "--threads", "2")
    deployed_json = run_cli(*command, "--threads", "1", "-o", "json")

    assert deployed.returncode == 0, deployed.stderr
    assert "failed (reported for generation 1, before this deploy) no space left on device" in deployed.stdout
    assert deployed_json.returncode == 0, deployed_json.stderr
    result = json.loads(deployed_json.stdout)
    assert result["state"]["state"] == "failed"
    assert (result["reported_generation"], result["desired_generation"]) == (1, 3)


def report_serving(fleet: OrchestratorThread, stream: ControlStream, device_id: str, key: str) -> None:
    """Open the device's control stream and report linear:1 serving on it."""
    stream.hello(device_id, key)
    status = agent_pb2.ModelStatus(
        model_name="linear",
        model_version="1",
        variant_id="linear:1:source",
        digest="sha256:" + "0" * 64,
        state=common_pb2.MODEL_STATE_SERVING,
        runtime="onnxruntime",
        threads=1,
    )
    status.updated_at.GetCurrentTime()
    stream.send(agent_pb2.AgentMessage(reported_state=agent_pb2.ReportedState(models=[status])))
    wait_until(lambda: get_device(fleet, device_id).models, f"{device_id} to report its model")


def test_offline_model_state_marked(fleet: OrchestratorThread, open_stream: Callable[..., ControlStream]) -> None:
    """An offline device's model state is shown as its last report with its age, an online one's as it is."""
    online_id, online_key = register(fleet.agent, "edge-online")
    offline_id, offline_key = register(fleet.agent, "edge-offline")
    report_serving(fleet, open_stream(fleet.agent), online_id, online_key)
    closed = open_stream(fleet.agent)
    report_serving(fleet, closed, offline_id, offline_key)
    closed.close()
    offline_status = common_pb2.DEVICE_STATUS_OFFLINE
    wait_until(lambda: get_device(fleet, offline_id).status == offline_status, f"{offline_id} to go offline")

    listed = run_cli("--orchestrator", fleet.address, "devices", "list")
    listed_json = run_cli("--orchestrator", fleet.address, "devices", "list", "-o", "json")
    show_offline = run_cli("--orchestrator", fleet.address, "devices", "show", offline_id)
    show_online = run_cli("--orchestrator", fleet.address, "devices", "show", online_id)

    for result in (listed, listed_json, show_offline, show_online):
        assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert re.search(r" linear:serving \(last seen \d+s ago\) ", rows[offline_id])
    assert re.search(r" linear:serving +\d+s ago ", rows[online_id])
    devices = {d["device_id"]: d for d in json.loads(listed_json.stdout)}
    assert devices[offline_id]["status"] == "offline"
    assert devices[offline_id]["models"][0]["state"] == "serving"
    assert devices[offline_id]["models"][0]["current"] is False
    assert devices[online_id]["models"][0]["state"] == "serving"
    assert devices[online_id]["models"][0]["current"] is True
    assert re.search(r"linear:1:source +serving \(last seen \d+s ago\) +onnxruntime", show_offline.stdout)
    assert re.search(r"linear:1:source +serving +onnxruntime", show_online.stdout)


def test_deploy_offline_state_marked(fleet: OrchestratorThread, open_stream: Callable[..., ControlStream]) -> None:
    """A deploy to an offline device shows the variant's state as the device's last report, with its age."""
    upload(fleet, linear_onnx(), "linear", "1")
    device_id, key = register(fleet.agent, "edge-01")
    deploy = operator_pb2.DeployRequest(model_name="linear", model_version="1", device_id=device_id)
    fleet.operator.Deploy(deploy, timeout=30)
    stream = open_stream(fleet.agent)
    report_serving(fleet, stream, device_id, key)
    stream.close()
    offline_status = common_pb2.DEVICE_STATUS_OFFLINE
    wait_until(lambda: get_device(fleet, device_id).status == offline_status, f"{device_id} to go offline")
    command = ("--orchestrator", fleet.address, "deploy", "--model", "linear:1", "--device", device_id)

    deployed = run_cli(*command, "--threads", "2")
    deployed_json = run_cli(*command, "--threads", "1", "-o", "json")
    waited = run_cli(*command, "--threads", "2", "--wait", "1")

    assert deployed.returncode == 0, deployed.stderr
    assert re.search(
        r": serving \(last seen \d+s ago\) \(reported for generation 0, before this deploy\) onnxruntime",
        deployed.stdout,
    ), deployed.stdout
    assert deployed_json.returncode == 0, deployed_json.stderr
    result = json.loads(deployed_json.stdout)
    assert result["device_status"] == "offline"
    assert result["last_seen"] is not None
    assert result["state"]["state"] == "serving"
    assert result["state"]["current"] is False
    assert waited.returncode == 75, waited.stderr
    assert re.search(r"\(state: serving \(last seen \d+s ago\); the device reports generation 0 of 4\)", waited.stderr)


def test_models_add_conflict(fleet: OrchestratorThread, tmp_path: Path) -> None:
    first = tmp_path / "first.onnx"
    first.write_bytes(linear_onnx(seed=0))
    second = tmp_path / "second.onnx"
    second.write_bytes(linear_onnx(seed=1))
    run_cli("--orchestrator", fleet.address, "models", "add", str(first), "--name", "linear", "--version", "1")

    result = run_cli(
        "--orchestrator", fleet.address, "models", "add", str(second), "--name", "linear", "--version", "1"
    )

    assert result.returncode == 4
    assert "already exists" in result.stderr


def test_models_add_missing_file(fleet: OrchestratorThread, tmp_path: Path) -> None:
    missing = tmp_path / "missing.onnx"

    result = run_cli("--orchestrator", fleet.address, "models", "add", str(missing), "--name", "x", "--version", "1")

    assert result.returncode == 2
    assert str(missing) in result.stderr


def test_metrics_query_empty(fleet: OrchestratorThread) -> None:
    result = run_cli("--orchestrator", fleet.address, "metrics", "query", "--since", "1h", "-o", "json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_metrics_query_bad_time(fleet: OrchestratorThread) -> None:
    result = run_cli("--orchestrator", fleet.address, "metrics", "query", "--since", "yesterday")

    assert result.returncode == 2
    assert "yesterday" in result.stderr
