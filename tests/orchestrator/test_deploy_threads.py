"""Deploy over gRPC: requested thread counts above a device's usable cores are lowered to them."""

from __future__ import annotations

import grpc
import pytest

from edgefleet.v1 import operator_pb2
from tests.servers import OrchestratorThread, hardware_message, linear_onnx, register, upload

pytest_plugins = ["tests.servers"]


@pytest.fixture
def fleet(orchestrator: OrchestratorThread) -> OrchestratorThread:
    """Return an orchestrator with linear:1 and device edge-01 of 2.5 usable cores (a budget of 2 threads)."""
    upload(orchestrator, linear_onnx(), "linear", "1")
    register(orchestrator.agent, "edge-01", hardware=hardware_message(usable_cores=2.5))
    return orchestrator


def deploy(orchestrator: OrchestratorThread, threads: int, variant_id: str = "") -> operator_pb2.DeployResponse:
    request = operator_pb2.DeployRequest(
        model_name="linear", device_id="edge-01", threads=threads, variant_id=variant_id
    )
    return orchestrator.operator.Deploy(request, timeout=30)


def test_deploy_threads_lowered(fleet: OrchestratorThread) -> None:
    response = deploy(fleet, threads=64)

    assert response.assignment.threads == 2
    assert response.device.hardware.usable_cores == 2.5
    assert response.device.desired[0].threads == 2


def test_deploy_threads_lowered_variant(fleet: OrchestratorThread) -> None:
    response = deploy(fleet, threads=3, variant_id="linear:1:source")

    assert response.assignment.threads == 2


def test_deploy_threads_kept(fleet: OrchestratorThread) -> None:
    response = deploy(fleet, threads=1)

    assert response.assignment.threads == 1


def test_deploy_threads_automatic(fleet: OrchestratorThread) -> None:
    response = deploy(fleet, threads=0)

    assert 1 <= response.assignment.threads <= 2


def test_deploy_threads_over_limit(fleet: OrchestratorThread) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        deploy(fleet, threads=257)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "257" in (caught.value.details() or "")
