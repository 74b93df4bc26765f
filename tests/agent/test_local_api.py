"""The gRPC local inference API on a real Unix socket, with real onnxruntime models."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.local_api import MAX_MESSAGE_BYTES, LocalApiServer, array_to_tensor, tensor_to_array
from edgefleet.agent.runtime.host import ModelHost
from edgefleet.agent.tensor_limits import MAX_DIMENSION, MAX_ELEMENTS
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


def onnx_widen(path: Path, width: int) -> Path:
    """Write y = x @ ones(4, width): float32 x of shape (batch, 4) becomes y of shape (batch, width)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "ones"], ["y"])],
        "widen",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(np.ones((4, width), np.float32), "ones")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_reply_over_limit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A reply over MAX_MESSAGE_BYTES gets an error naming the model and the fix, and a log line."""
    width = 1024
    rows = MAX_MESSAGE_BYTES // (width * 4) + 1  # Outputs one row over the limit, from 256 KiB of input.
    too_many = inference_pb2.InferRequest(
        model_name="widen", inputs=[array_to_tensor("x", np.ones((rows, 4), np.float32))]
    )
    fitting = inference_pb2.InferRequest(
        model_name="widen", inputs=[array_to_tensor("x", np.ones((rows // 2, 4), np.float32))]
    )
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    with ModelHost(default_threads=1) as host:
        host.install("widen", "1", "widen:1:source", onnx_widen(tmp_path / "widen.onnx", width), "onnx")
        server = LocalApiServer(host, tmp_path / "agent.sock")
        server.start()
        try:
            with grpc.insecure_channel(f"unix://{server.socket_path}", options=options) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                with (
                    caplog.at_level(logging.WARNING, logger="edgefleet.agent.local_api"),
                    pytest.raises(grpc.RpcError) as rejected,
                ):
                    stub.Infer(too_many, timeout=60)
                after = stub.Infer(fitting, timeout=60)
        finally:
            server.stop(grace_s=0)

    assert rejected.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = rejected.value.details() or ""
    assert "the reply of model 'widen' takes " in details
    assert f"over the reply limit of {MAX_MESSAGE_BYTES}; send fewer rows per call" in details
    assert any("local API: the reply of model 'widen'" in record.getMessage() for record in caplog.records)
    assert tensor_to_array(after.outputs[0]).shape == (rows // 2, width)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        # In int64 the byte count of this shape wraps to 0, the length of the empty data.
        ([2**40, 2**40], f"each dimension must be from 0 to {MAX_DIMENSION}"),
        ([MAX_DIMENSION + 1, 4], f"each dimension must be from 0 to {MAX_DIMENSION}"),
        ([2**13, 2**13, 2**2], f"of {2**28} elements, over the limit of {MAX_ELEMENTS}"),
    ],
)
def test_shape_over_limit_rejected(
    stub: inference_pb2_grpc.InferenceServiceStub, shape: list[int], expected: str
) -> None:
    tensor = inference_pb2.Tensor(name="x", dtype="float32", shape=shape, data=b"")

    with pytest.raises(grpc.RpcError) as rejected:
        stub.Infer(inference_pb2.InferRequest(model_name="linear", inputs=[tensor]), timeout=10)

    assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = rejected.value.details() or ""
    assert f"input 'x' has shape {shape}" in details
    assert expected in details
    assert "cannot reshape" not in details
