"""A real orchestrator and agent process over mutual TLS: tampered artifacts and signatures are refused."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from edgefleet.agent.local_api import array_to_tensor, tensor_to_array
from edgefleet.demo.processes import LocalFleet
from edgefleet.v1 import agent_pb2, common_pb2, inference_pb2, inference_pb2_grpc, operator_pb2, operator_pb2_grpc
from tests.servers import STEP_TIMEOUT_S, linear_onnx, linear_weights, upload_requests, wait_until

INPUT = np.arange(4, dtype=np.float32).reshape(1, 4)


@pytest.fixture
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    # A short directory: the test names would make the agent's socket paths longer than the 107 bytes
    # a Unix socket path may have, under pytest-xdist's per-worker directory.
    fleet = LocalFleet(tmp_path_factory.mktemp("tls") / "fleet", heartbeat_interval_s=1.0)
    fleet.start_orchestrator()
    fleet.start_agent("ecu-1", "car-ecu", "--max-backoff-s", "0.5")
    try:
        fleet.wait_for_devices(1)
        yield fleet
    finally:
        fleet.stop()


def operator(fleet: LocalFleet) -> operator_pb2_grpc.OperatorServiceStub:
    return operator_pb2_grpc.OperatorServiceStub(fleet.operator_channel())


def wait_status(fleet: LocalFleet, version: str, state: int) -> agent_pb2.ModelStatus:
    """Wait until ecu-1 reports linear:version in state; return the status."""
    stub = operator(fleet)
    deadline = time.monotonic() + 60
    while True:
        device = stub.GetDevice(operator_pb2.GetDeviceRequest(device_id="ecu-1"), timeout=STEP_TIMEOUT_S)
        status = next((m for m in device.models if m.model_name == "linear"), None)
        if status is not None and status.model_version == version and status.state == state:
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"ecu-1 did not reach state {state} on linear:{version}; last status: {status}")
        time.sleep(0.2)


def deploy(fleet: LocalFleet, version: str) -> None:
    request = operator_pb2.DeployRequest(model_name="linear", model_version=version, device_id="ecu-1")
    operator(fleet).Deploy(request, timeout=STEP_TIMEOUT_S)


def infer(fleet: LocalFleet) -> tuple[str, np.ndarray]:
    """Run linear on ecu-1 through its local API; return the served version and the output."""
    with grpc.insecure_channel(f"unix://{fleet.socket_of('ecu-1')}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        model = next(
            m
            for m in stub.ListLocalModels(inference_pb2.ListLocalModelsRequest(), timeout=30).models
            if m.model_name == "linear"
        )
        request = inference_pb2.InferRequest(model_name="linear", inputs=[array_to_tensor(model.inputs[0].name, INPUT)])
        response = stub.Infer(request, timeout=30)
    return model.model_version, tensor_to_array(response.outputs[0])


def expected(seed: int) -> np.ndarray:
    weight, bias = linear_weights(seed)
    return INPUT @ weight + bias


@pytest.mark.slow
def test_fleet_refuses_tampered_artifact_and_signature(fleet: LocalFleet) -> None:
    stub = operator(fleet)
    models = {
        version: stub.UploadModel(upload_requests(linear_onnx(seed), "linear", version), timeout=120)
        for version, seed in (("1", 0), ("2", 1), ("3", 2))
    }
    deploy(fleet, "1")
    wait_status(fleet, "1", common_pb2.MODEL_STATE_SERVING)

    # Flip one byte of version 2 in the orchestrator's artifact store.
    hex_digest = models["2"].digest.removeprefix("sha256:")
    stored = next(p for p in (fleet.work_dir / "orchestrator" / "artifacts").rglob("*") if hex_digest in p.name)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    deploy(fleet, "2")
    tampered = wait_status(fleet, "2", common_pb2.MODEL_STATE_FAILED)
    after_tamper = infer(fleet)

    # Restart the orchestrator with its signing key's private half replaced: signatures no longer verify.
    assert fleet.orchestrator is not None
    fleet.orchestrator.stop()
    with sqlite3.connect(fleet.work_dir / "orchestrator" / "edgefleet.db") as database:
        database.execute("UPDATE signing_keys SET private_key = ?", (bytes(range(32)),))
    fleet.start_orchestrator(extra_args=("--listen", f"127.0.0.1:{fleet.port}"))
    fleet.wait_for_devices(1)
    deploy(fleet, "3")
    forged = wait_status(fleet, "3", common_pb2.MODEL_STATE_FAILED)
    after_forgery = infer(fleet)

    assert "SHA-256" in tampered.error
    assert after_tamper[0] == "1"
    np.testing.assert_allclose(after_tamper[1], expected(0), rtol=1e-5)
    assert "signature" in forged.error
    assert after_forgery[0] == "1"
    np.testing.assert_allclose(after_forgery[1], expected(0), rtol=1e-5)


@pytest.mark.slow
def test_reenrolled_device_takes_deploys(fleet: LocalFleet) -> None:
    """A removed device enrolled again with its old state directory accepts the next signed deploy."""
    stub = operator(fleet)
    stub.UploadModel(upload_requests(linear_onnx(0), "linear", "1"), timeout=120)
    # Two deploys raise the agent's anti-rollback counter of the model to 2.
    for _ in range(2):
        wait_for_generation(fleet, deploy_generation(fleet))

    stub.RemoveDevice(operator_pb2.RemoveDeviceRequest(device_id="ecu-1"), timeout=STEP_TIMEOUT_S)
    exit_code = fleet.agents["ecu-1"].popen.wait(STEP_TIMEOUT_S)
    fleet.start_agent("ecu-1", "car-ecu", "--max-backoff-s", "0.5")
    fleet.wait_for_devices(1)
    # The agent serves linear:1 from its state directory until the readmitted device's empty desired state
    # arrives. Deploying after that makes the agent load and verify the assignment again.
    readmitted = stub.GetDevice(operator_pb2.GetDeviceRequest(device_id="ecu-1"), timeout=STEP_TIMEOUT_S)
    wait_for_generation(fleet, readmitted.desired_generation)
    wait_for_generation(fleet, deploy_generation(fleet))
    status = wait_until(lambda: finished_status(fleet), "ecu-1 to finish loading linear:1", timeout_s=60)

    assert exit_code == 2
    assert status.state == common_pb2.MODEL_STATE_SERVING, status.error
    assert infer(fleet)[0] == "1"


def deploy_generation(fleet: LocalFleet) -> int:
    """Deploy linear:1 to ecu-1; return the desired generation that carries it."""
    request = operator_pb2.DeployRequest(model_name="linear", model_version="1", device_id="ecu-1")
    return operator(fleet).Deploy(request, timeout=STEP_TIMEOUT_S).device.desired_generation


def finished_status(fleet: LocalFleet) -> agent_pb2.ModelStatus | None:
    """Return ecu-1's status of linear once it is serving or failed, else None."""
    device = operator(fleet).GetDevice(operator_pb2.GetDeviceRequest(device_id="ecu-1"), timeout=STEP_TIMEOUT_S)
    done = (common_pb2.MODEL_STATE_SERVING, common_pb2.MODEL_STATE_FAILED)
    return next((m for m in device.models if m.model_name == "linear" and m.state in done), None)


def wait_for_generation(fleet: LocalFleet, generation: int) -> None:
    """Wait until ecu-1 reports that it applied the given desired generation."""
    stub = operator(fleet)
    request = operator_pb2.GetDeviceRequest(device_id="ecu-1")
    wait_until(
        lambda: stub.GetDevice(request, timeout=STEP_TIMEOUT_S).reported_generation == generation,
        f"ecu-1 to apply generation {generation}",
        timeout_s=60,
    )
