"""Steps shared by the fault tests: upload and deploy a model, wait for it, read metric totals."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgefleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc
from tests.faults.processes import STEP_TIMEOUT_S, AgentProcess, OrchestratorProcess, wait_for
from tests.faults.proxy import TcpProxy
from tests.servers import linear_weights, upload_requests

MODEL = "linear"


def linear_model(seed: int, padding_floats: int = 0) -> bytes:
    """Return y = x @ W + b for x (1, 4); padding_floats adds an unused initializer to make the file larger."""
    weight, bias = linear_weights(seed)
    initializers = [
        helper.make_tensor("weight", TensorProto.FLOAT, weight.shape, weight.ravel().tolist()),
        helper.make_tensor("bias", TensorProto.FLOAT, bias.shape, bias.ravel().tolist()),
    ]
    if padding_floats:
        padding = np.random.default_rng(seed).standard_normal(padding_floats).astype(np.float32)
        initializers.append(
            helper.make_tensor("padding", TensorProto.FLOAT, padding.shape, padding.tobytes(), raw=True)
        )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["product"]), helper.make_node("Add", ["product", "bias"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def upload(operator: operator_pb2_grpc.OperatorServiceStub, data: bytes, version: str) -> operator_pb2.Model:
    return operator.UploadModel(upload_requests(data, MODEL, version, chunk_bytes=256 * 1024), timeout=120)


def online_device(operator: operator_pb2_grpc.OperatorServiceStub, device_id: str) -> operator_pb2.Device | None:
    response = operator.ListDevices(
        operator_pb2.ListDevicesRequest(status=common_pb2.DEVICE_STATUS_ONLINE), timeout=STEP_TIMEOUT_S
    )
    return next((d for d in response.devices if d.device_id == device_id), None)


def deploy(operator: operator_pb2_grpc.OperatorServiceStub, device_id: str, version: str) -> None:
    operator.Deploy(
        operator_pb2.DeployRequest(model_name=MODEL, model_version=version, device_id=device_id),
        timeout=STEP_TIMEOUT_S,
    )


def wait_serving(operator: operator_pb2_grpc.OperatorServiceStub, device_id: str, version: str) -> None:
    """Wait until the device reports the model's version as serving."""

    def serving() -> bool:
        device = operator.GetDevice(operator_pb2.GetDeviceRequest(device_id=device_id), timeout=STEP_TIMEOUT_S)
        return any(
            m.model_name == MODEL and m.model_version == version and m.state == common_pb2.MODEL_STATE_SERVING
            for m in device.models
        )

    wait_for(serving, f"device {device_id} to serve {MODEL}:{version}", interval_s=0.2)


def inference_total(operator: operator_pb2_grpc.OperatorServiceStub, device_id: str) -> int:
    """Return the inferences the orchestrator stored for the device's model, over all time."""
    response = operator.QueryMetrics(
        operator_pb2.QueryMetricsRequest(device_id=device_id, model_name=MODEL, group_by=["device"]),
        timeout=STEP_TIMEOUT_S,
    )
    return sum(row.inference_count for row in response.rows)


@contextlib.contextmanager
def serving_fleet(work_dir: Path) -> Iterator[tuple[OrchestratorProcess, TcpProxy, AgentProcess]]:
    """Yield an orchestrator, a proxy in front of it and an agent behind the proxy that serves MODEL:1.

    The agent is named camera, so its state is under work_dir/camera. All three stop at the end.
    """
    orchestrator = OrchestratorProcess(work_dir)
    orchestrator.start()
    proxy = TcpProxy(orchestrator.port)
    agent = AgentProcess(work_dir, "camera", proxy.address)
    agent.start()
    channel, operator = orchestrator.operator()
    try:
        device_id = wait_for(agent.device_id, "the agent to register")
        wait_for(lambda: online_device(operator, device_id), "the device to come online")
        upload(operator, linear_model(0), "1")
        deploy(operator, device_id, "1")
        wait_serving(operator, device_id, "1")
        yield orchestrator, proxy, agent
    finally:
        channel.close()
        agent.stop()
        proxy.close()
        orchestrator.stop()
