"""Hostile input against a real orchestrator: malformed bytes, hostile names, huge values and floods.

Every call must end with OK or a status that names the problem (INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
NOT_FOUND, FAILED_PRECONDITION, ALREADY_EXISTS), never UNKNOWN or INTERNAL, and afterwards the
server must still be SERVING with its stored model and device unchanged.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from edgefleet.v1 import agent_pb2, common_pb2, operator_pb2
from tests.faults.fleet import linear_model
from tests.servers import (
    OrchestratorThread,
    hardware_message,
    linear_onnx,
    orchestrator_config,
    register,
    upload_requests,
)

ALLOWED_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
}
# Unary methods that take no action beyond the request's own records (no key rotation, no tokens).
UNARY_METHODS = [
    "/edgefleet.v1.AgentService/Register",
    "/edgefleet.v1.AgentService/UploadMetrics",
    "/edgefleet.v1.OperatorService/ListDevices",
    "/edgefleet.v1.OperatorService/GetDevice",
    "/edgefleet.v1.OperatorService/ListModels",
    "/edgefleet.v1.OperatorService/GetModel",
    "/edgefleet.v1.OperatorService/ListVariants",
    "/edgefleet.v1.OperatorService/Deploy",
    "/edgefleet.v1.OperatorService/ExplainSelection",
    "/edgefleet.v1.OperatorService/QueryMetrics",
]
HOSTILE_NAMES = [
    "../../etc/passwd",
    "..",
    "/etc/passwd",
    "model/../../x",
    "a\x00b",
    "%2e%2e%2f",
    "con",
    "x" * 10_000,
    "名前",
    "",
    "-rf",
]
# An enum number that no edgefleet.v1 enum defines; Any because the stubs accept only known values.
UNKNOWN_ENUM: Any = 99
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MIB = 1024 * 1024


@dataclass(frozen=True)
class Baseline:
    """A device and a model stored before the fuzzing, with their messages as read back then."""

    device_id: str
    model: operator_pb2.Model
    device_hardware: common_pb2.HardwareProfile
    device_labels: dict[str, str]
    desired: tuple[agent_pb2.ModelAssignment, ...]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrchestratorThread]:
    orchestrator = OrchestratorThread(orchestrator_config(tmp_path_factory.mktemp("fuzz")))
    yield orchestrator
    orchestrator.stop()


@pytest.fixture(scope="module")
def baseline(server: OrchestratorThread) -> Baseline:
    device_id, _ = register(server.agent, labels={"site": "lab"})
    server.operator.UploadModel(upload_requests(linear_onnx(), "linear", "1"), timeout=60)
    server.operator.Deploy(operator_pb2.DeployRequest(model_name="linear", device_id=device_id), timeout=30)
    return snapshot(server, device_id)


def snapshot(server: OrchestratorThread, device_id: str) -> Baseline:
    device = server.operator.GetDevice(operator_pb2.GetDeviceRequest(device_id=device_id), timeout=30)
    model = server.operator.GetModel(operator_pb2.GetModelRequest(name="linear", version="1"), timeout=30)
    return Baseline(device_id, model, device.hardware, dict(device.labels), tuple(device.desired))


def assert_intact(server: OrchestratorThread, baseline: Baseline) -> None:
    health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert snapshot(server, baseline.device_id) == baseline


def outcome(call: object, *args: object, **kwargs: object) -> tuple[grpc.StatusCode, str]:
    """Run a gRPC call; return (OK, "") or the error's code and details."""
    try:
        result = call(*args, **kwargs)  # type: ignore[operator]
        if isinstance(result, Iterator):
            for _ in result:
                pass
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def assert_clear(code: grpc.StatusCode, details: str, allowed: set[grpc.StatusCode] = ALLOWED_ERRORS) -> None:
    assert code == grpc.StatusCode.OK or code in allowed, f"{code.name}: {details}"
    assert code == grpc.StatusCode.OK or details, f"{code.name} without a message"


@FUZZ
@given(method=st.sampled_from(UNARY_METHODS), data=st.binary(max_size=512))
def test_fuzz_raw_bytes(server: OrchestratorThread, baseline: Baseline, method: str, data: bytes) -> None:
    call = server.channel.unary_unary(method, request_serializer=None, response_deserializer=None)

    assert_clear(*outcome(call, data, timeout=30))


@FUZZ
@given(data=st.lists(st.binary(max_size=256), min_size=1, max_size=4))
def test_fuzz_raw_streams(server: OrchestratorThread, baseline: Baseline, data: list[bytes]) -> None:
    control = server.channel.stream_stream(
        "/edgefleet.v1.AgentService/Control", request_serializer=None, response_deserializer=None
    )
    upload = server.channel.stream_unary(
        "/edgefleet.v1.OperatorService/UploadModel", request_serializer=None, response_deserializer=None
    )
    download = server.channel.unary_stream(
        "/edgefleet.v1.AgentService/DownloadArtifact", request_serializer=None, response_deserializer=None
    )

    assert_clear(*outcome(control, iter(data), timeout=30))
    assert_clear(*outcome(upload, iter(data), timeout=30))
    assert_clear(*outcome(download, data[0], timeout=30))


def test_fuzz_raw_bytes_leave_server_intact(server: OrchestratorThread, baseline: Baseline) -> None:
    assert_intact(server, baseline)


@FUZZ
@given(name=st.sampled_from(HOSTILE_NAMES) | st.text(max_size=80))
def test_fuzz_hostile_names(server: OrchestratorThread, baseline: Baseline, name: str) -> None:
    operator = server.operator
    operator.UploadModel(upload_requests(linear_onnx(6), "scratch", "1"), timeout=30)
    results = [
        outcome(operator.UploadModel, upload_requests(linear_onnx(1), name, "1"), timeout=30),
        outcome(operator.UploadModel, upload_requests(linear_onnx(2), "linear", name), timeout=30),
        outcome(operator.UploadModel, upload_requests(linear_onnx(3), "scratch", "1", variant_kind=name), timeout=30),
        outcome(operator.GetModel, operator_pb2.GetModelRequest(name=name), timeout=30),
        outcome(operator.GetDevice, operator_pb2.GetDeviceRequest(device_id=name), timeout=30),
        outcome(operator.Deploy, operator_pb2.DeployRequest(model_name="linear", device_id=name), timeout=30),
        outcome(
            server.agent.DownloadArtifact,
            agent_pb2.DownloadArtifactRequest(device_id=baseline.device_id, digest=f"sha256:{name}"),
            timeout=30,
        ),
    ]

    for code, details in results:
        assert_clear(code, details)


def test_hostile_names_write_nothing_outside(server: OrchestratorThread, baseline: Baseline) -> None:
    data_dir = server.config.data_dir
    artifacts = data_dir / "artifacts"
    stored = [p.relative_to(artifacts) for p in artifacts.rglob("*") if p.is_file()]

    assert [p.name for p in data_dir.parent.iterdir()] == [data_dir.name]
    assert all(p.parts[0] == "sha256" and len(p.name) == 64 for p in stored), stored
    assert_intact(server, baseline)


def test_download_huge_offset(server: OrchestratorThread, baseline: Baseline) -> None:
    request = agent_pb2.DownloadArtifactRequest(
        device_id=baseline.device_id, digest=baseline.model.digest, offset=2**63 - 1
    )

    code, details = outcome(server.agent.DownloadArtifact, request, timeout=30)

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "offset" in details


def with_format(
    requests: Iterator[operator_pb2.UploadModelRequest], model_format: int
) -> Iterator[operator_pb2.UploadModelRequest]:
    header = next(requests)
    header.header.format = model_format  # type: ignore[assignment]
    yield header
    yield from requests


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(
            lambda s: s.operator.ListDevices(operator_pb2.ListDevicesRequest(status=UNKNOWN_ENUM)), id="device-status"
        ),
        pytest.param(
            lambda s: s.agent.Register(
                agent_pb2.RegisterRequest(
                    instance_key="k" * 32,
                    hardware=hardware_message(accelerators=[common_pb2.Accelerator(kind=UNKNOWN_ENUM, name="npu")]),
                )
            ),
            id="accelerator-kind",
        ),
        pytest.param(
            lambda s: s.operator.UploadModel(with_format(upload_requests(linear_onnx(4), "enum", "1"), 77)),
            id="model-format",
        ),
    ],
)
def test_unknown_enum_values(server: OrchestratorThread, baseline: Baseline, call: object) -> None:
    code, details = outcome(call, server)

    assert code == grpc.StatusCode.INVALID_ARGUMENT, details


def test_unknown_model_state(server: OrchestratorThread, baseline: Baseline) -> None:
    device_id, key = register(server.agent)
    messages = [
        agent_pb2.AgentMessage(hello=agent_pb2.Hello(device_id=device_id, instance_key=key)),
        agent_pb2.AgentMessage(
            reported_state=agent_pb2.ReportedState(
                models=[agent_pb2.ModelStatus(model_name="linear", state=UNKNOWN_ENUM)]
            )
        ),
    ]

    code, details = outcome(server.agent.Control, iter(messages), timeout=30)

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "state" in details


def test_metric_batch_too_many_windows(server: OrchestratorThread, baseline: Baseline) -> None:
    window = common_pb2.MetricWindow(model_name="linear", model_version="1", variant_id="v", window_seconds=1)
    window.window_start.GetCurrentTime()
    request = agent_pb2.UploadMetricsRequest(device_id=baseline.device_id, batch_id="huge", windows=[window] * 1001)

    code, details = outcome(server.agent.UploadMetrics, request, timeout=30)

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1001 windows" in details


def test_message_over_size_limit(server: OrchestratorThread, baseline: Baseline) -> None:
    call = server.channel.unary_unary(
        "/edgefleet.v1.AgentService/UploadMetrics", request_serializer=None, response_deserializer=None
    )

    code, _ = outcome(call, b"\x12" + b"\xff\xff\xff\x04" + b"x" * (9 * MIB), timeout=60)

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_intact(server, baseline)


@FUZZ
@given(data=st.binary(min_size=1, max_size=4096))
def test_fuzz_files_not_models(server: OrchestratorThread, baseline: Baseline, data: bytes) -> None:
    code, details = outcome(server.operator.UploadModel, upload_requests(data, "notamodel", "1"), timeout=60)

    assert code == grpc.StatusCode.INVALID_ARGUMENT, details


def enormous_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "enormous",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1_000_000, 1_000_000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1_000_000, 1_000_000])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_enormous_shape_rejected(server: OrchestratorThread, baseline: Baseline) -> None:
    code, details = outcome(server.operator.UploadModel, upload_requests(enormous_model(), "huge", "1"), timeout=60)

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'x'" in details
    assert "1e+12 elements" in details
    assert_intact(server, baseline)


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[OrchestratorThread]:
    config = orchestrator_config(tmp_path, metric_uploads_per_s=0.5, metric_upload_burst=3, max_concurrent_downloads=1)
    orchestrator = OrchestratorThread(config)
    yield orchestrator
    orchestrator.stop()


def test_metric_upload_rate_limit(limited: OrchestratorThread) -> None:
    device_id, _ = register(limited.agent)
    codes = []
    for i in range(5):
        request = agent_pb2.UploadMetricsRequest(device_id=device_id, batch_id=f"b{i}")
        codes.append(outcome(limited.agent.UploadMetrics, request, timeout=30))

    assert [code for code, _ in codes[:3]] == [grpc.StatusCode.OK] * 3
    assert codes[3][0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry in" in codes[3][1]


def test_concurrent_download_limit(limited: OrchestratorThread) -> None:
    device_id, _ = register(limited.agent)
    # 16 MiB: more than HTTP/2 flow control lets the server send ahead, so a reader that stops
    # reading keeps the download, and its slot, open.
    data = linear_model(5, padding_floats=4 * MIB)
    model = limited.operator.UploadModel(upload_requests(data, "linear", "1"), timeout=60)
    limited.operator.Deploy(operator_pb2.DeployRequest(model_name="linear", device_id=device_id), timeout=30)
    request = agent_pb2.DownloadArtifactRequest(device_id=device_id, digest=model.digest, chunk_size=4096)
    first = limited.agent.DownloadArtifact(request, timeout=30)
    next(first)  # The first download is open and takes the only slot.

    code, details = outcome(limited.agent.DownloadArtifact, request, timeout=30)
    first.cancel()
    retry = b"".join(chunk.data for chunk in _retry_download(limited, request))

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry" in details
    assert hashlib.sha256(retry).hexdigest() == model.digest.removeprefix("sha256:")


def _retry_download(
    server: OrchestratorThread, request: agent_pb2.DownloadArtifactRequest
) -> list[agent_pb2.ArtifactChunk]:
    """Download again once the first stream's slot is released."""
    for _ in range(100):
        try:
            return list(server.agent.DownloadArtifact(request, timeout=30))
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            threading.Event().wait(0.05)
    pytest.fail("the download slot was not released after the first stream was cancelled")
