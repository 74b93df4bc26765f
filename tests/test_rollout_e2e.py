"""A rollout survives its orchestrator being killed with SIGKILL in the middle of a wave and restarted."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from edgefleet.common.serde import timestamp
from edgefleet.common.sketch import LatencySketch
from edgefleet.demo.processes import LocalFleet
from edgefleet.v1 import agent_pb2, agent_pb2_grpc, common_pb2, operator_pb2, operator_pb2_grpc
from tests.servers import linear_onnx, register, upload_requests, wait_until

MODEL = "classifier"
# The killed process holds the engine lease for up to rollouts.engine.LEASE_TTL_S (10 s) after its death.
RESTART_TIMEOUT_S = 60.0
_batches = itertools.count()


@pytest.fixture
def local_fleet(tmp_path: Path) -> Iterator[LocalFleet]:
    # Plaintext: the test registers devices and uploads metrics itself, without agent certificates.
    fleet = LocalFleet(tmp_path, secure=False)
    yield fleet
    fleet.stop()


def get_rollout(address: str, rollout_id: str) -> operator_pb2.Rollout:
    with grpc.insecure_channel(address) as channel:
        stub = operator_pb2_grpc.OperatorServiceStub(channel)
        return stub.GetRollout(operator_pb2.GetRolloutRequest(rollout_id=rollout_id), timeout=10)


def wait_rollout(
    address: str, rollout_id: str, done: Callable[[operator_pb2.Rollout], bool], what: str, timeout_s: float
) -> operator_pb2.Rollout:
    """Poll the rollout until done(rollout) is true and return it; fail naming what after timeout_s."""
    latest: list[operator_pb2.Rollout] = []

    def check() -> bool:
        latest[:] = [get_rollout(address, rollout_id)]
        return done(latest[0])

    wait_until(check, what, timeout_s)
    return latest[0]


def serve_wave(address: str, wave: operator_pb2.Wave, latency_ms: float) -> None:
    """Upload 30 samples of latency_ms for every device of the wave, as its agent would."""
    sketch = LatencySketch()
    for _ in range(30):
        sketch.add(latency_ms)
    with grpc.insecure_channel(address) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        for device in wave.devices:
            window = common_pb2.MetricWindow(
                model_name=MODEL,
                model_version="2",
                variant_id=device.variant_id,
                window_start=timestamp(datetime.now(UTC)),
                window_seconds=1,
                inference_count=30,
                latency=sketch.to_proto(),
            )
            request = agent_pb2.UploadMetricsRequest(
                device_id=device.device_id, batch_id=f"batch-{next(_batches)}", windows=[window]
            )
            stub.UploadMetrics(request, timeout=10)


@pytest.mark.slow
def test_rollout_survives_sigkill(local_fleet: LocalFleet) -> None:
    local_fleet.start_orchestrator()
    with grpc.insecure_channel(local_fleet.address) as channel:
        agents = agent_pb2_grpc.AgentServiceStub(channel)
        operator = operator_pb2_grpc.OperatorServiceStub(channel)
        devices = [register(agents, labels={"kind": "camera"})[0] for _ in range(2)]
        operator.UploadModel(upload_requests(linear_onnx(1), MODEL, "1"), timeout=60)
        operator.UploadModel(upload_requests(linear_onnx(2), MODEL, "2"), timeout=60)
        rollout = operator.CreateRollout(
            operator_pb2.CreateRolloutRequest(
                model_name=MODEL,
                model_version="2",
                target_labels={"kind": "camera"},
                wave_percents=[50, 100],
                budget_ms=50.0,
                max_p95_regression_pct=50.0,
                max_error_rate_pct=1.0,
                min_samples=20,
            ),
            timeout=10,
        )
    first = wait_rollout(
        local_fleet.address,
        rollout.rollout_id,
        lambda r: r.state == operator_pb2.ROLLOUT_STATE_RUNNING,
        "wave 1 to start",
        RESTART_TIMEOUT_S,
    )
    assert local_fleet.orchestrator is not None
    local_fleet.orchestrator.popen.kill()
    local_fleet.orchestrator.popen.wait(10)

    local_fleet.start_orchestrator()
    restarted = get_rollout(local_fleet.address, rollout.rollout_id)
    serve_wave(local_fleet.address, restarted.waves[0], 5.0)
    second = wait_rollout(
        local_fleet.address,
        rollout.rollout_id,
        lambda r: r.current_wave == 1,
        "wave 2 to start after the restart",
        RESTART_TIMEOUT_S,
    )
    serve_wave(local_fleet.address, second.waves[-1], 5.0)
    done = wait_rollout(
        local_fleet.address,
        rollout.rollout_id,
        lambda r: r.state == operator_pb2.ROLLOUT_STATE_SUCCEEDED,
        "the rollout to succeed",
        RESTART_TIMEOUT_S,
    )

    assert restarted.state == operator_pb2.ROLLOUT_STATE_RUNNING
    assert [d.device_id for d in restarted.waves[0].devices] == [d.device_id for d in first.waves[0].devices]
    assert sorted(d.device_id for w in done.waves for d in w.devices) == sorted(devices)
    assert [w.decision for w in done.waves] == [operator_pb2.WAVE_DECISION_PROCEED] * 2
