"""Not-found errors of the operator API: a close name is suggested, otherwise the listing command."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from edgefleet.v1 import operator_pb2
from tests.servers import OrchestratorThread, register

pytest_plugins = ["tests.servers"]


def not_found_details(call: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    return caught.value.details() or ""


def test_unknown_ids_name_listing(orchestrator: OrchestratorThread) -> None:
    operator = orchestrator.operator
    register(orchestrator.agent, "edge-01")

    device = not_found_details(lambda: operator.GetDevice(operator_pb2.GetDeviceRequest(device_id="zzz"), timeout=30))
    model = not_found_details(lambda: operator.GetModel(operator_pb2.GetModelRequest(name="zzz"), timeout=30))
    rollout = not_found_details(
        lambda: operator.GetRollout(operator_pb2.GetRolloutRequest(rollout_id="ro-zzz"), timeout=30)
    )
    metrics_device = not_found_details(
        lambda: operator.QueryMetrics(operator_pb2.QueryMetricsRequest(device_id="zzz"), timeout=30)
    )
    metrics_model = not_found_details(
        lambda: operator.QueryMetrics(operator_pb2.QueryMetricsRequest(model_name="zzz"), timeout=30)
    )

    assert device == "device 'zzz' not found; list them with `edgefleet devices list`"
    assert model == "model 'zzz' not found; list them with `edgefleet models list`"
    assert rollout == "rollout 'ro-zzz' not found; list them with `edgefleet rollout list`"
    assert metrics_device == "device 'zzz' not found; list them with `edgefleet devices list`"
    assert metrics_model == "model 'zzz' not found; list them with `edgefleet models list`"


def test_close_id_suggested(orchestrator: OrchestratorThread) -> None:
    register(orchestrator.agent, "edge-01")

    details = not_found_details(
        lambda: orchestrator.operator.GetDevice(operator_pb2.GetDeviceRequest(device_id="edge-1"), timeout=30)
    )

    assert details == "device 'edge-1' not found; did you mean edge-01?"
