"""The agent against a real orchestrator: registration, identity, model delivery, local inference, metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgefleet.agent.agent import FatalAgentError
from edgefleet.agent.local_api import array_to_tensor, tensor_to_array
from edgefleet.agent.tensor_socket_client import TensorSocketClient
from edgefleet.common.errors import EXIT_CONFIG, EXIT_USAGE
from edgefleet.v1 import agent_pb2, common_pb2, inference_pb2, inference_pb2_grpc, operator_pb2
from tests.agent.models import linear_reference, tflite_linear
from tests.faults.processes import AgentProcess
from tests.servers import (
    AgentThread,
    OrchestratorThread,
    agent_hardware,
    get_device,
    linear_onnx,
    linear_weights,
    new_instance_key,
    register,
    upload,
    wait_until,
)

pytest_plugins = ["tests.servers"]

StartAgent = Callable[..., AgentThread]
StartOrchestrator = Callable[..., OrchestratorThread]
INPUT = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)


def model_status(
    orchestrator: OrchestratorThread, device_id: str, model: str = "linear"
) -> agent_pb2.ModelStatus | None:
    for status in get_device(orchestrator, device_id).models:
        if status.model_name == model:
            return status
    return None


def wait_state(
    orchestrator: OrchestratorThread, device_id: str, state: int, variant_id: str = ""
) -> agent_pb2.ModelStatus:
    """Wait until the device reports the model in state (on variant_id when given) and return its status."""

    def reached() -> agent_pb2.ModelStatus | None:
        status = model_status(orchestrator, device_id)
        if status is None or status.state != state or (variant_id and status.variant_id != variant_id):
            return None
        return status

    return wait_until(reached, f"device {device_id} to report state {state} {variant_id}")


def wait_online(orchestrator: OrchestratorThread, agent: AgentThread) -> str:
    """Wait until the agent has an open control stream; return its device id."""

    def online() -> str:
        assert agent.running, f"agent ended: {agent.error!r}"
        device_id = agent.agent.device_id
        if device_id and get_device(orchestrator, device_id).status == common_pb2.DEVICE_STATUS_ONLINE:
            return device_id
        return ""

    return wait_until(online, "the agent to come online")


def deploy(orchestrator: OrchestratorThread, device_id: str, **fields: object) -> operator_pb2.DeployResponse:
    request = operator_pb2.DeployRequest(model_name="linear", device_id=device_id, **fields)  # type: ignore[arg-type]
    return orchestrator.operator.Deploy(request, timeout=30)


def infer(socket: Path, model: str = "linear", data: np.ndarray = INPUT) -> inference_pb2.InferResponse:
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        spec = stub.ListLocalModels(inference_pb2.ListLocalModelsRequest(), timeout=30)
        name = next(m for m in spec.models if m.model_name == model).inputs[0].name
        request = inference_pb2.InferRequest(model_name=model, inputs=[array_to_tensor(name, data)])
        return stub.Infer(request, timeout=30)


def local_models(socket: Path) -> list[inference_pb2.LocalModel]:
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        return list(stub.ListLocalModels(inference_pb2.ListLocalModelsRequest(), timeout=30).models)


def served_models(socket: Path) -> list[inference_pb2.LocalModel] | None:
    """Return local_models(socket), or None while no server listens on the socket."""
    try:
        return local_models(socket)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return None


def expected_linear(seed: int) -> np.ndarray:
    weight, bias = linear_weights(seed)
    return INPUT @ weight + bias


def test_agent_registers(start_orchestrator: StartOrchestrator, start_agent: StartAgent, tmp_path: Path) -> None:
    orchestrator = start_orchestrator()
    agent = start_agent(orchestrator.address, "cam")

    device_id = wait_online(orchestrator, agent)

    identity = json.loads((tmp_path / "cam" / "identity.json").read_text())
    assert identity["device_id"] == device_id
    assert (tmp_path / "cam" / "identity.json").stat().st_mode & 0o077 == 0
    device = get_device(orchestrator, device_id)
    assert device.labels["name"] == "cam"
    assert device.hardware.usable_cores == 1.0
    assert [r.name for r in device.hardware.runtimes] == ["onnxruntime", "litert"]


def test_agent_serves_deployed(start_orchestrator: StartOrchestrator, start_agent: StartAgent, tmp_path: Path) -> None:
    orchestrator = start_orchestrator()
    agent = start_agent(orchestrator.address, "ecu")
    device_id = wait_online(orchestrator, agent)
    upload(orchestrator, linear_onnx(seed=0), "linear", "1")

    response = deploy(orchestrator, device_id)
    status = wait_state(orchestrator, device_id, common_pb2.MODEL_STATE_SERVING)
    result = infer(agent.agent.config.socket_path)

    assert response.assignment.variant_id == "linear:1:source"
    assert status.runtime == "onnxruntime"
    assert list(status.providers) == ["CPUExecutionProvider"]
    assert status.threads == 1
    assert get_device(orchestrator, device_id).reported_generation == response.device.desired_generation
    assert result.variant_id == "linear:1:source"
    assert result.model_version == "1"
    np.testing.assert_allclose(tensor_to_array(result.outputs[0]), expected_linear(0), rtol=1e-5)


def serving_linear(
    start_orchestrator: StartOrchestrator, start_agent: StartAgent
) -> tuple[OrchestratorThread, AgentThread, str]:
    """Start an orchestrator and an agent that serves linear:1 (seed 0); return them and the device id."""
    orchestrator = start_orchestrator()
    agent = start_agent(orchestrator.address, "ecu")
    device_id = wait_online(orchestrator, agent)
    upload(orchestrator, linear_onnx(seed=0), "linear", "1")
    deploy(orchestrator, device_id)
    wait_state(orchestrator, device_id, common_pb2.MODEL_STATE_SERVING)
    return orchestrator, agent, device_id


def test_agent_serves_tensor_socket(start_orchestrator: StartOrchestrator, start_agent: StartAgent) -> None:
    _, agent, _ = serving_linear(start_orchestrator, start_agent)

    with TensorSocketClient(agent.agent.config.tensor_socket_path, timeout_s=30) as client:
        reply = client.infer("linear", {"x": INPUT})

    assert reply.variant_id == "linear:1:source"
    np.testing.assert_allclose(reply.outputs["y"], expected_linear(0), rtol=1e-5)


def test_agent_uploads_metrics(start_orchestrator: StartOrchestrator, start_agent: StartAgent) -> None:
    orchestrator, agent, device_id = serving_linear(start_orchestrator, start_agent)

    for _ in range(25):
        infer(agent.agent.config.socket_path)
    agent.stop()
    rows = orchestrator.operator.QueryMetrics(
        operator_pb2.QueryMetricsRequest(device_id=device_id, group_by=["variant"]), timeout=30
    ).rows

    assert agent.error is None
    assert len(rows) == 1
    assert rows[0].group["variant"] == "linear:1:source"
    assert rows[0].inference_count == 25
    assert rows[0].error_count == 0
    assert rows[0].p50_ms > 0


def test_rejected_calls_count_without_latency(
    start_orchestrator: StartOrchestrator, start_agent: StartAgent
) -> None:
    orchestrator, agent, device_id = serving_linear(start_orchestrator, start_agent)

    latencies = [infer(agent.agent.config.socket_path).latency_ms for _ in range(20)]
    for _ in range(30):
        with pytest.raises(grpc.RpcError) as raised:
            infer(agent.agent.config.socket_path, data=np.zeros((1, 3), dtype=np.float32))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    agent.stop()
    rows = orchestrator.operator.QueryMetrics(
        operator_pb2.QueryMetricsRequest(device_id=device_id, group_by=["variant"]), timeout=30
    ).rows

    assert rows[0].inference_count == 50
    assert rows[0].error_count == 30
    # The 30 rejected calls took a few microseconds each; had they entered the sketch, p50 would be one of them.
    assert min(latencies) * 0.98 <= rows[0].p50_ms <= max(latencies) * 1.02


def test_agent_swaps_version(start_orchestrator: StartOrchestrator, start_agent: StartAgent) -> None:
    orchestrator = start_orchestrator()
    agent = start_agent(orchestrator.address, "ecu")
    device_id = wait_online(orchestrator, agent)
    upload(orchestrator, linear_onnx(seed=0), "linear", "1")
    deploy(orchestrator, device_id)
    wait_state(orchestrator, device_id, common_pb2.MODEL_STATE_SERVING, "linear:1:source")
    upload(orchestrator, linear_onnx(seed=1), "linear", "2")

    deploy(orchestrator, device_id, model_version="2")
    wait_state(orchestrator, device_id, common_pb2.MODEL_STATE_SERVING, "linear:2:source")
    result = infer(agent.agent.config.socket_path)

    assert result.model_version == "2"
    np.testing.assert_allclose(tensor_to_array(result.outputs[0]), expected_linear(1), rtol=1e-5)


def test_agent_litert_only(start_orchestrator: StartOrchestrator, start_agent: StartAgent) -> None:
    orchestrator = start_orchestrator()
    agent = start_agent(orchestrator.address, "camera", hardware=agent_hardware(runtimes=("litert",)))
    device_id = wait_online(orchestrator, agent)
    upload(orchestrator, linear_onnx(), "linear", "1")

    with pytest.raises(grpc.RpcError) as only_onnx:
        deploy(orchestrator, device_id)
    upload(orchestrator, tflite_linear().read_bytes(), "linear", "1", variant_kind="tflite-fp32", filename="m.tflite")
    response = deploy(orchestrator, device_id)
    status = wait_state(orchestrator, device_id, common_pb2.MODEL_STATE_SERVING)
    result = infer(agent.agent.config.socket_path)

    assert only_onnx.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Add a variant in a format it can run" in (only_onnx.value.details() or "")
    assert response.assignment.variant_id == "linear:1:tflite-fp32"
    assert status.runtime == "litert"
    np.testing.assert_allclose(tensor_to_array(result.outputs[0]), linear_reference(INPUT), rtol=1e-5, atol=1e-6)


def test_deploy_over_memory_hint(start_orchestrator: StartOrchestrator, start_agent: StartAgent) -> None:
    orchestrator = start_orchestrator()
    agent = start_agent(orchestrator.address, "plc", hardware=agent_hardware(memory_bytes=1024 * 1024))
    device_id = wait_online(orchestrator, agent)
    upload(orchestrator, linear_onnx(), "linear", "1")

    with pytest.raises(grpc.RpcError) as over_memory:
        deploy(orchestrator, device_id)

    details = over_memory.value.details() or ""
    assert over_memory.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "memory over the device's memory" in details
    assert "Add a smaller variant (edgefleet models compress --int8)" in details
    assert "--variant-kind" not in details


def test_agent_memory_budget(start_orchestrator: StartOrchestrator, start_agent: StartAgent) -> None:
    orchestrator = start_orchestrator()
    agent = start_agent(orchestrator.address, "plc", memory_budget_bytes=1024 * 1024)
    device_id = wait_online(orchestrator, agent)
    upload(orchestrator, linear_onnx(), "linear", "1")

    deploy(orchestrator, device_id)
    status = wait_state(orchestrator, device_id, common_pb2.MODEL_STATE_FAILED)

    assert "memory budget for models is 1 MiB" in status.error
    assert "deploy a smaller variant" in status.error
    assert local_models(agent.agent.config.socket_path) == []


def test_agent_restart_offline(start_orchestrator: StartOrchestrator, start_agent: StartAgent) -> None:
    orchestrator = start_orchestrator()
    agent = start_agent(orchestrator.address, "ecu")
    device_id = wait_online(orchestrator, agent)
    upload(orchestrator, linear_onnx(), "linear", "1")
    deploy(orchestrator, device_id)
    wait_state(orchestrator, device_id, common_pb2.MODEL_STATE_SERVING)
    agent.stop()
    port = orchestrator.port
    orchestrator.stop()

    restarted = start_agent(orchestrator.address, "ecu")
    wait_until(restarted.agent.config.socket_path.is_socket, "the local API socket")
    # The agent checks the socket path at start-up by binding it for a moment, so the first socket seen
    # may be that check's, which is gone before the local API binds the path.
    wait_until(
        lambda: served_models(restarted.agent.config.socket_path), "the model to be served from local state"
    )
    result = infer(restarted.agent.config.socket_path)
    returned = start_orchestrator(listen=f"127.0.0.1:{port}")
    back_online = wait_online(returned, restarted)

    assert restarted.agent.device_id == device_id
    np.testing.assert_allclose(tensor_to_array(result.outputs[0]), expected_linear(0), rtol=1e-5)
    assert back_online == device_id
    assert wait_state(returned, device_id, common_pb2.MODEL_STATE_SERVING).variant_id == "linear:1:source"


def test_agent_identity_conflict(
    start_orchestrator: StartOrchestrator, start_agent: StartAgent, tmp_path: Path
) -> None:
    orchestrator = start_orchestrator()
    register(orchestrator.agent, "taken")
    state_dir = tmp_path / "impostor"
    state_dir.mkdir()
    (state_dir / "identity.json").write_text(json.dumps({"device_id": "taken", "instance_key": new_instance_key()}))

    agent = start_agent(orchestrator.address, "impostor")
    error = agent.join()

    assert isinstance(error, FatalAgentError)
    assert "taken" in str(error)
    assert len(get_device(orchestrator, "taken").identity_conflicts) == 1


def run_agent_process(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m edgefleet.agent.main ARGS` to completion and return it with text output."""
    return subprocess.run(
        [sys.executable, "-m", "edgefleet.agent.main", "--insecure", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_process_identity_conflict(start_orchestrator: StartOrchestrator, tmp_path: Path) -> None:
    """An agent whose id belongs to another agent exits with EXIT_USAGE, so systemd does not restart it."""
    orchestrator = start_orchestrator()
    register(orchestrator.agent, "taken")
    (tmp_path / "identity.json").write_text(json.dumps({"device_id": "taken", "instance_key": new_instance_key()}))

    result = run_agent_process("--orchestrator", orchestrator.address, "--state-dir", str(tmp_path))

    assert result.returncode == EXIT_USAGE, result.stderr
    assert "taken" in result.stderr


def test_process_bad_identity(tmp_path: Path) -> None:
    (tmp_path / "identity.json").write_text("{not json")

    result = run_agent_process("--orchestrator", "127.0.0.1:1", "--state-dir", str(tmp_path))

    assert result.returncode == EXIT_CONFIG
    assert str(tmp_path / "identity.json") in result.stderr


def test_process_unknown_profile(tmp_path: Path) -> None:
    result = run_agent_process("--profile", "toaster", "--state-dir", str(tmp_path))

    assert result.returncode == EXIT_CONFIG
    assert "toaster" in result.stderr
    assert "camera" in result.stderr


def test_process_long_socket_path(tmp_path: Path) -> None:
    state_dir = tmp_path / ("s" * 110)

    result = run_agent_process("--orchestrator", "127.0.0.1:1", "--state-dir", str(state_dir))

    assert result.returncode == EXIT_CONFIG
    assert "at most 107" in result.stderr


def test_process_state_dir_in_use(
    start_orchestrator: StartOrchestrator, start_agent: StartAgent, tmp_path: Path
) -> None:
    """A second agent on a running agent's state directory exits instead of taking its identity and socket."""
    orchestrator = start_orchestrator()
    running = start_agent(orchestrator.address, "ecu")
    wait_online(orchestrator, running)

    result = run_agent_process("--orchestrator", orchestrator.address, "--state-dir", str(tmp_path / "ecu"))

    assert result.returncode == EXIT_CONFIG
    assert "another agent is running" in result.stderr
    assert running.running
    assert running.agent.config.socket_path.is_socket()


def test_agent_lock_released(start_orchestrator: StartOrchestrator, start_agent: StartAgent) -> None:
    orchestrator = start_orchestrator()
    first = start_agent(orchestrator.address, "ecu")
    device_id = wait_online(orchestrator, first)
    first.stop()

    second = start_agent(orchestrator.address, "ecu")

    assert wait_online(orchestrator, second) == device_id


def test_process_disk_free_of_model_store(start_orchestrator: StartOrchestrator, tmp_path: Path) -> None:
    """The agent reports the free space of its model store, which may be a file system of its own."""
    shared_memory = Path("/dev/shm")
    if not shared_memory.is_dir():
        pytest.skip("needs /dev/shm as a second file system")
    store_target = Path(tempfile.mkdtemp(prefix="edgefleet-store-", dir=shared_memory))
    state_free = shutil.disk_usage(tmp_path).free
    store_free = shutil.disk_usage(store_target).free
    if abs(state_free - store_free) < max(state_free, store_free) // 10:
        shutil.rmtree(store_target)
        pytest.skip("/dev/shm and the test directory have about the same free space")
    state_dir = tmp_path / "ecu"
    state_dir.mkdir()
    (state_dir / "models").symlink_to(store_target)
    orchestrator = start_orchestrator()
    agent = AgentProcess(tmp_path, "ecu", orchestrator.address)
    agent.start()
    try:
        device_id = wait_until(agent.device_id, "the agent to register")
        reported = get_device(orchestrator, device_id).hardware.disk_free_bytes
    finally:
        agent.stop()
        shutil.rmtree(store_target)

    assert abs(reported - store_free) < abs(reported - state_free), (reported, store_free, state_free)
