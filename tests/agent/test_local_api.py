"""The gRPC local inference API on a real Unix socket, with real onnxruntime models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgefleet.agent.local_api import LocalApiServer, array_to_tensor, tensor_to_array
from edgefleet.agent.runtime.host import ModelHost
from edgefleet.v1 import inference_pb2, inference_pb2_grpc
from tests.agent.models import linear_reference, onnx_linear


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    with ModelHost(default_threads=1) as host:
        host.install("linear", "1", "linear:1:source", onnx_linear(tmp_path / "linear.onnx"), "onnx")
        server = LocalApiServer(host, tmp_path / "agent.sock")
        server.start()
        with grpc.insecure_channel(f"unix://{server.socket_path}") as channel:
            yield inference_pb2_grpc.InferenceServiceStub(channel)
        server.stop(grace_s=0)


def test_infer_matches_reference(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)

    response = stub.Infer(inference_pb2.InferRequest(model_name="linear", inputs=[array_to_tensor("x", x)]), timeout=10)

    np.testing.assert_allclose(tensor_to_array(response.outputs[0]), linear_reference(x), rtol=1e-5, atol=1e-6)


def test_duplicate_input_rejected(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    first = array_to_tensor("x", np.zeros((1, 4), np.float32))
    second = array_to_tensor("x", np.ones((1, 4), np.float32))

    with pytest.raises(grpc.RpcError) as rejected:
        stub.Infer(inference_pb2.InferRequest(model_name="linear", inputs=[first, second]), timeout=10)

    assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input names ['x'] appear more than once" in (rejected.value.details() or "")


def test_many_inputs_rejected_quickly(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    """The repeated-name check takes linear time: 60,000 inputs are rejected within the deadline."""
    inputs = [inference_pb2.Tensor(name=f"x{index}") for index in range(60_000)]
    inputs.append(inference_pb2.Tensor(name="x0"))

    with pytest.raises(grpc.RpcError) as rejected:
        stub.Infer(inference_pb2.InferRequest(model_name="linear", inputs=inputs), timeout=10)

    assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rejected.value.details()
    assert "input names ['x0'] appear more than once" in (rejected.value.details() or "")
