"""A device that registers again with other hardware gets assignments it can run."""

from __future__ import annotations

import logging

import pytest

from edgefleet.v1 import common_pb2, operator_pb2
from tests.agent.models import tflite_linear
from tests.servers import OrchestratorThread, get_device, hardware_message, linear_onnx, register, upload

pytest_plugins = ["tests.servers"]

LITERT_ONLY = [common_pb2.Runtime(name="litert", version="2.3.0", providers=["xnnpack"])]


@pytest.fixture
def fleet(orchestrator: OrchestratorThread) -> tuple[OrchestratorThread, str]:
    """Return an orchestrator with linear:1 (ONNX and TFLite) deployed as ONNX with 2 threads to edge-01."""
    upload(orchestrator, linear_onnx(), "linear", "1")
    upload(orchestrator, tflite_linear().read_bytes(), "linear", "1", variant_kind="tflite-fp32", filename="l.tflite")
    _, key = register(orchestrator.agent, "edge-01")
    request = operator_pb2.DeployRequest(
        model_name="linear", model_version="1", device_id="edge-01", variant_id="linear:1:source", threads=2
    )
    orchestrator.operator.Deploy(request, timeout=30)
    return orchestrator, key


def test_replan_other_format(fleet: tuple[OrchestratorThread, str]) -> None:
    orchestrator, key = fleet
    before = get_device(orchestrator, "edge-01").desired_generation

    register(orchestrator.agent, "edge-01", key, hardware_message(runtimes=LITERT_ONLY, usable_cores=1.0))

    device = get_device(orchestrator, "edge-01")
    assert device.desired_generation == before + 1
    assert [(a.variant_id, a.threads) for a in device.desired] == [("linear:1:tflite-fp32", 1)]


def test_replan_fewer_cores(fleet: tuple[OrchestratorThread, str]) -> None:
    orchestrator, key = fleet

    register(orchestrator.agent, "edge-01", key, hardware_message(usable_cores=1.0))

    device = get_device(orchestrator, "edge-01")
    assert [(a.variant_id, a.threads) for a in device.desired] == [("linear:1:source", 1)]


def test_replan_same_hardware_unchanged(fleet: tuple[OrchestratorThread, str]) -> None:
    orchestrator, key = fleet
    before = get_device(orchestrator, "edge-01")

    register(orchestrator.agent, "edge-01", key)

    after = get_device(orchestrator, "edge-01")
    assert after.desired_generation == before.desired_generation
    assert [(a.variant_id, a.threads) for a in after.desired] == [("linear:1:source", 2)]


def test_replan_no_variant_keeps_assignment(
    fleet: tuple[OrchestratorThread, str], caplog: pytest.LogCaptureFixture
) -> None:
    orchestrator, key = fleet
    before = get_device(orchestrator, "edge-01").desired_generation
    onnx_only_old = [common_pb2.Runtime(name="onnxruntime", version="1.5.0", providers=["CPUExecutionProvider"])]

    with caplog.at_level(logging.WARNING, logger="edgefleet.orchestrator.handlers.deploy"):
        register(orchestrator.agent, "edge-01", key, hardware_message(runtimes=onnx_only_old))

    device = get_device(orchestrator, "edge-01")
    assert device.desired_generation == before
    assert [a.variant_id for a in device.desired] == ["linear:1:source"]
    assert "device_id=edge-01 keeps variant=linear:1:source although" in caplog.text
