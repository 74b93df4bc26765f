"""The demo's inference burst on a device whose model is swapped underneath it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefleet.demo.processes import LocalFleet
from edgefleet.demo.rollouts import MODEL_NAME, _burst, _serving
from edgefleet.v1 import operator_pb2, operator_pb2_grpc
from tests.agent.models import tflite_linear
from tests.servers import linear_onnx, upload_requests, wait_until


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[LocalFleet]:
    fleet = LocalFleet(tmp_path, secure=False)
    yield fleet
    fleet.stop()


def test_burst_stops_after_swap(fleet: LocalFleet) -> None:
    fleet.start_orchestrator()
    fleet.start_agent("car", "car-ecu")
    (device,) = fleet.wait_for_devices(1)
    socket = fleet.socket_of("car")
    with fleet.operator_channel() as channel:
        operator = operator_pb2_grpc.OperatorServiceStub(channel)
        operator.UploadModel(upload_requests(linear_onnx(), MODEL_NAME, "1"), timeout=120)
        operator.UploadModel(
            upload_requests(
                tflite_linear().read_bytes(), MODEL_NAME, "1", variant_kind="tflite-fp32", filename="l.tflite"
            ),
            timeout=120,
        )

        def deploy(variant_id: str) -> operator_pb2.DeployRequest:
            return operator_pb2.DeployRequest(
                model_name=MODEL_NAME, model_version="1", device_id=device.device_id, variant_id=variant_id
            )

        source = f"{MODEL_NAME}:1:source"
        operator.Deploy(deploy(source), timeout=30)
        onnx_model = wait_until(lambda: _serving(socket, source), "the ONNX variant to serve")
        operator.Deploy(deploy(f"{MODEL_NAME}:1:tflite-fp32"), timeout=30)
        wait_until(lambda: _serving(socket, f"{MODEL_NAME}:1:tflite-fp32"), "the TFLite variant to serve")

    # The burst sends the ONNX model's input name, which the TFLite model rejects.
    _burst(socket, onnx_model, [np.ones((1, 4), np.float32)])

    assert _serving(socket, source) is None
