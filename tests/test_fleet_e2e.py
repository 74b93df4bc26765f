"""The whole system as subprocesses: an orchestrator and three agents with the shipped device profiles."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from skimage import data as skimage_data

from edgefleet.agent.local_api import array_to_tensor, tensor_to_array
from edgefleet.common.serde import tensor_from_proto
from edgefleet.demo.assets import ensure_efficientnet_lite0_onnx, ensure_efficientnet_lite0_tflite
from edgefleet.demo.images import preprocess
from edgefleet.demo.processes import LocalFleet
from edgefleet.v1 import common_pb2, inference_pb2, inference_pb2_grpc, operator_pb2, operator_pb2_grpc
from tests.servers import cli_command, upload_requests, wait_until

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
MODEL = "efficientnet-lite0"
CAT_CLASSES = range(281, 286)
# Agent name, shipped profile, usable cores, memory and runtimes the profile sets.
PROFILES = (
    ("camera", "camera", 1.0, 512 * MIB, ["litert"]),
    ("car-ecu", "car-ecu", 2.0, 2048 * MIB, ["onnxruntime", "litert"]),
    ("plc", "plc", 1.0, 256 * MIB, ["onnxruntime"]),
)
RUNTIME_OF = {"camera": "litert", "car-ecu": "onnxruntime", "plc": "onnxruntime"}
# The agents' and the orchestrator's default shutdown_grace_s, plus time for the interpreter to exit.
EXIT_WITHIN_S = 5.0 + 3.0
# Agents retry at most every second, so they reconnect soon after the orchestrator returns.
AGENT_ARGS = ("--max-backoff-s", "1")


def plaintext_fleet(work_dir: Path) -> LocalFleet:
    """Return a LocalFleet whose processes talk plaintext gRPC on loopback.

    This module tests what the fleet does, not its transport security (tests/security does), and
    plaintext lets the CLI and the test's stubs call the orchestrator without credentials.
    """
    return LocalFleet(work_dir, secure=False)


def logs(fleet: LocalFleet) -> str:
    """Return the last lines of every process log, for failure messages."""
    processes = [p for p in (fleet.orchestrator, *fleet.agents.values()) if p is not None]
    return "\n".join(f"--- {p.name} ---\n{p.log_tail(30)}" for p in processes)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    """Start the orchestrator and the three agents once for the module; stop whatever still runs at the end."""
    fleet = plaintext_fleet(tmp_path_factory.mktemp("fleet"))
    try:
        fleet.start_orchestrator()
        for name, profile, *_ in PROFILES:
            fleet.start_agent(name, profile, *AGENT_ARGS)
        fleet.wait_for_devices(len(PROFILES), timeout_s=90)
        yield fleet
    finally:
        fleet.stop()


def device_ids(fleet: LocalFleet) -> dict[str, str]:
    """Return the device id of each agent name, from the name label."""
    with grpc.insecure_channel(fleet.address) as channel:
        devices = operator_pb2_grpc.OperatorServiceStub(channel).ListDevices(
            operator_pb2.ListDevicesRequest(), timeout=30
        )
    return {d.labels["name"]: d.device_id for d in devices.devices}


def upload_file(stub: operator_pb2_grpc.OperatorServiceStub, path: Path, variant_kind: str = "") -> operator_pb2.Model:
    requests = upload_requests(path.read_bytes(), MODEL, "1", variant_kind=variant_kind, filename=path.name)
    return stub.UploadModel(requests, timeout=300)


@pytest.fixture(scope="module")
def deployed(fleet: LocalFleet) -> dict[str, str]:
    """Upload EfficientNet-Lite0 (ONNX and a TFLite variant), deploy it to every device and wait until all serve it.

    Returns the device id of each agent name.
    """
    ids = device_ids(fleet)
    with grpc.insecure_channel(fleet.address) as channel:
        stub = operator_pb2_grpc.OperatorServiceStub(channel)
        upload_file(stub, ensure_efficientnet_lite0_onnx())
        upload_file(stub, ensure_efficientnet_lite0_tflite(), variant_kind="tflite-fp32")
        for device_id in ids.values():
            stub.Deploy(operator_pb2.DeployRequest(model_name=MODEL, device_id=device_id), timeout=30)
        for name, device_id in ids.items():

            def serving(device_id: str = device_id) -> bool:
                device = stub.GetDevice(operator_pb2.GetDeviceRequest(device_id=device_id), timeout=30)
                states = [m.state for m in device.models if m.model_name == MODEL]
                assert common_pb2.MODEL_STATE_FAILED not in states, f"{device.models}\n{logs(fleet)}"
                return states == [common_pb2.MODEL_STATE_SERVING]

            wait_until(serving, f"{name} to serve {MODEL}", timeout_s=120)
    return ids


def classify_chelsea(socket: Path) -> tuple[int, inference_pb2.LocalModel]:
    """Classify skimage's chelsea photo through an agent's local API; return the top class and the model."""
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        models = stub.ListLocalModels(inference_pb2.ListLocalModelsRequest(), timeout=30).models
        model = next(m for m in models if m.model_name == MODEL)
        spec = tensor_from_proto(model.inputs[0])
        tensor = array_to_tensor(spec.name, preprocess(skimage_data.chelsea(), spec))
        response = stub.Infer(inference_pb2.InferRequest(model_name=MODEL, inputs=[tensor]), timeout=60)
    scores = tensor_to_array(response.outputs[0]).reshape(-1)
    return int(np.argmax(scores)), model


def serves_model(socket: Path) -> bool:
    if not socket.is_socket():
        return False
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        try:
            models = stub.ListLocalModels(inference_pb2.ListLocalModelsRequest(), timeout=5).models
        except grpc.RpcError:
            return False
    return any(m.model_name == MODEL for m in models)


def test_devices_match_profiles(fleet: LocalFleet) -> None:
    result = subprocess.run(
        cli_command("--orchestrator", fleet.address, "devices", "list", "-o", "json"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    devices = {d["labels"]["name"]: d for d in json.loads(result.stdout)}
    assert sorted(devices) == sorted(name for name, *_ in PROFILES)
    for name, profile, cores, memory, runtimes in PROFILES:
        device = devices[name]
        assert device["status"] == "online", name
        assert device["profile"] == profile, name
        assert device["usable_cores"] == cores, name
        assert device["memory_bytes"] == memory, name
        assert [r["name"] for r in device["runtimes"]] == runtimes, name


def test_classify_chelsea(fleet: LocalFleet, deployed: dict[str, str]) -> None:
    for name in deployed:
        top, model = classify_chelsea(fleet.socket_of(name))

        assert top in CAT_CLASSES, f"{name} classified chelsea as {top}"
        assert model.runtime == RUNTIME_OF[name], name


def test_restart_while_offline(fleet: LocalFleet, deployed: dict[str, str]) -> None:
    assert fleet.orchestrator is not None
    port = fleet.port
    orchestrator_code = fleet.orchestrator.stop(timeout_s=EXIT_WITHIN_S)
    plc_code = fleet.agents["plc"].stop(timeout_s=EXIT_WITHIN_S)

    fleet.start_agent("plc", "plc", *AGENT_ARGS)
    wait_until(lambda: serves_model(fleet.socket_of("plc")), "plc to serve its model from local state", 60)
    offline_top, _ = classify_chelsea(fleet.socket_of("plc"))
    fleet.start_orchestrator(extra_args=("--listen", f"127.0.0.1:{port}"))
    devices = fleet.wait_for_devices(len(PROFILES), timeout_s=90)

    assert orchestrator_code == 0, logs(fleet)
    assert plc_code == 0, logs(fleet)
    assert offline_top in CAT_CLASSES
    assert fleet.port == port
    assert {d.labels["name"]: d.device_id for d in devices} == deployed
    assert len(devices) == len(PROFILES)


def test_sigterm_exits_zero(fleet: LocalFleet) -> None:
    processes = [*fleet.agents.values(), fleet.orchestrator]
    codes = {}
    durations = {}
    for process in processes:
        assert process is not None
        started = time.monotonic()
        codes[process.name] = process.stop(timeout_s=EXIT_WITHIN_S)
        durations[process.name] = time.monotonic() - started

    assert codes == dict.fromkeys(codes, 0), logs(fleet)
    assert max(durations.values()) < EXIT_WITHIN_S, durations
