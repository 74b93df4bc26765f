"""Devices with wrong clocks: skew from heartbeats, a flag past the bound, and metrics placed by receive time."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from edgefleet.common.serde import timestamp
from edgefleet.common.sketch import LatencySketch
from edgefleet.v1 import agent_pb2, agent_pb2_grpc, common_pb2, operator_pb2
from tests.faults.processes import wait_for
from tests.servers import ControlStream, OrchestratorThread, get_device, register

pytest_plugins = ["tests.servers"]

HOUR = timedelta(hours=1)


def window(start: datetime, count: int) -> common_pb2.MetricWindow:
    sketch = LatencySketch()
    for i in range(count):
        sketch.add(2.0 + i)
    return common_pb2.MetricWindow(
        model_name="classifier",
        model_version="1",
        variant_id="classifier:1:source",
        window_start=timestamp(start),
        window_seconds=10,
        inference_count=count,
        latency=sketch.to_proto(),
    )


def heartbeat_with_clock(stream: ControlStream, device_clock: datetime) -> None:
    heartbeat = agent_pb2.Heartbeat(sequence=1, sent_at=timestamp(device_clock))
    stream.send(agent_pb2.AgentMessage(heartbeat=heartbeat))
    stream.receive_kind("heartbeat_ack")


def connect(
    orchestrator: OrchestratorThread, open_stream: Callable[[agent_pb2_grpc.AgentServiceStub], ControlStream]
) -> tuple[str, ControlStream]:
    device_id, key = register(orchestrator.agent)
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key)
    wait_for(lambda: device_id in orchestrator.state.hub.sessions, "the control stream")
    return device_id, stream


def recent_total(orchestrator: OrchestratorThread, device_id: str) -> int:
    request = operator_pb2.QueryMetricsRequest(
        device_id=device_id, start=timestamp(datetime.now(UTC) - timedelta(minutes=5)), group_by=["device"]
    )
    rows = orchestrator.operator.QueryMetrics(request, timeout=30).rows
    return sum(row.inference_count for row in rows)


def upload(orchestrator: OrchestratorThread, device_id: str, batch_id: str, start: datetime, count: int) -> None:
    request = agent_pb2.UploadMetricsRequest(device_id=device_id, batch_id=batch_id, windows=[window(start, count)])
    orchestrator.agent.UploadMetrics(request, timeout=30)


@pytest.fixture
def orchestrator(start_orchestrator: Callable[..., OrchestratorThread]) -> OrchestratorThread:
    return start_orchestrator(max_clock_skew_s=60.0)


def test_skew_shown_and_flagged(
    orchestrator: OrchestratorThread, open_stream: Callable[[agent_pb2_grpc.AgentServiceStub], ControlStream]
) -> None:
    device_id, stream = connect(orchestrator, open_stream)

    heartbeat_with_clock(stream, datetime.now(UTC) - HOUR)
    device = get_device(orchestrator, device_id)

    assert device.clock_skew_seconds == pytest.approx(-3600, abs=5)
    assert device.clock_skewed


def test_skew_within_bound_not_flagged(
    orchestrator: OrchestratorThread, open_stream: Callable[[agent_pb2_grpc.AgentServiceStub], ControlStream]
) -> None:
    device_id, stream = connect(orchestrator, open_stream)

    heartbeat_with_clock(stream, datetime.now(UTC) + timedelta(seconds=20))
    device = get_device(orchestrator, device_id)

    assert device.clock_skew_seconds == pytest.approx(20, abs=5)
    assert not device.clock_skewed


def test_skewed_device_in_recent_queries(
    orchestrator: OrchestratorThread, open_stream: Callable[[agent_pb2_grpc.AgentServiceStub], ControlStream]
) -> None:
    device_id, stream = connect(orchestrator, open_stream)
    heartbeat_with_clock(stream, datetime.now(UTC) - HOUR)

    upload(orchestrator, device_id, "b1", datetime.now(UTC) - HOUR - timedelta(seconds=10), 7)

    assert recent_total(orchestrator, device_id) == 7


def test_future_window_in_recent_queries(orchestrator: OrchestratorThread) -> None:
    device_id, _ = register(orchestrator.agent)

    upload(orchestrator, device_id, "b1", datetime.now(UTC) + HOUR, 5)

    assert recent_total(orchestrator, device_id) == 5


def test_late_delivery_keeps_its_start(
    orchestrator: OrchestratorThread, open_stream: Callable[[agent_pb2_grpc.AgentServiceStub], ControlStream]
) -> None:
    # A correct clock with windows from an agent's buffer: they stay where they happened.
    device_id, stream = connect(orchestrator, open_stream)
    heartbeat_with_clock(stream, datetime.now(UTC))

    upload(orchestrator, device_id, "b1", datetime.now(UTC) - HOUR, 4)

    assert recent_total(orchestrator, device_id) == 0


def test_late_delivery_no_clock_warning(orchestrator: OrchestratorThread, caplog: pytest.LogCaptureFixture) -> None:
    device_id, _ = register(orchestrator.agent)

    with caplog.at_level(logging.INFO, logger="edgefleet.orchestrator.handlers.metrics"):
        upload(orchestrator, device_id, "b1", datetime.now(UTC) - timedelta(days=2), 4)

    records = [record for record in caplog.records if record.name == "edgefleet.orchestrator.handlers.metrics"]
    messages = [record.getMessage() for record in records]
    assert [record.levelname for record in records] == ["INFO"]
    assert len(messages) == 1
    assert "delivered late" in messages[0]


def test_future_window_clock_warning(orchestrator: OrchestratorThread, caplog: pytest.LogCaptureFixture) -> None:
    device_id, _ = register(orchestrator.agent)

    with caplog.at_level(logging.INFO, logger="edgefleet.orchestrator.handlers.metrics"):
        upload(orchestrator, device_id, "b1", datetime.now(UTC) + HOUR, 4)

    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.name == "edgefleet.orchestrator.handlers.metrics" and record.levelno == logging.WARNING
    ]
    assert len(warnings) == 1
    ahead = re.search(rf"device_id={device_id} clock looks ahead by about (\d+) s", warnings[0])
    assert ahead is not None, warnings[0]
    assert int(ahead.group(1)) == pytest.approx(3600, abs=5)


def metrics_records(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [
        (record.levelname, record.getMessage())
        for record in caplog.records
        if record.name == "edgefleet.orchestrator.handlers.metrics"
    ]


def test_clock_ahead_warned_once(orchestrator: OrchestratorThread, caplog: pytest.LogCaptureFixture) -> None:
    device_id, _ = register(orchestrator.agent)

    with caplog.at_level(logging.DEBUG, logger="edgefleet.orchestrator.handlers.metrics"):
        for batch in range(5):
            upload(orchestrator, device_id, f"b{batch}", datetime.now(UTC) + HOUR, 4)
    records = metrics_records(caplog)

    levels = [level for level, _ in records]
    assert levels == ["WARNING", "DEBUG", "DEBUG", "DEBUG", "DEBUG"], records
    assert f"device_id={device_id} clock looks ahead by about 3600 s" in records[0][1]


def test_clock_ahead_change_warned_again(orchestrator: OrchestratorThread, caplog: pytest.LogCaptureFixture) -> None:
    device_id, _ = register(orchestrator.agent)

    with caplog.at_level(logging.DEBUG, logger="edgefleet.orchestrator.handlers.metrics"):
        upload(orchestrator, device_id, "b1", datetime.now(UTC) + HOUR, 4)
        upload(orchestrator, device_id, "b2", datetime.now(UTC) + HOUR + timedelta(seconds=30), 4)
        upload(orchestrator, device_id, "b3", datetime.now(UTC) + 2 * HOUR, 4)
    records = metrics_records(caplog)

    assert [level for level, _ in records] == ["WARNING", "DEBUG", "WARNING"], records
    assert "ahead by about 7200 s" in records[2][1]
    assert "batch b3" in records[2][1]
    assert "1 more at debug level" in records[2][1]


def test_clock_ahead_per_device(orchestrator: OrchestratorThread, caplog: pytest.LogCaptureFixture) -> None:
    first, _ = register(orchestrator.agent)
    second, _ = register(orchestrator.agent)

    with caplog.at_level(logging.DEBUG, logger="edgefleet.orchestrator.handlers.metrics"):
        upload(orchestrator, first, "b1", datetime.now(UTC) + HOUR, 4)
        upload(orchestrator, second, "b1", datetime.now(UTC) + HOUR, 4)
    warnings = [message for level, message in metrics_records(caplog) if level == "WARNING"]

    assert len(warnings) == 2
    assert f"device_id={first} " in warnings[0]
    assert f"device_id={second} " in warnings[1]


def test_late_delivery_logged_once(orchestrator: OrchestratorThread, caplog: pytest.LogCaptureFixture) -> None:
    # A clock an hour behind makes every batch look an hour late.
    device_id, _ = register(orchestrator.agent)

    with caplog.at_level(logging.DEBUG, logger="edgefleet.orchestrator.handlers.metrics"):
        for batch in range(4):
            upload(orchestrator, device_id, f"b{batch}", datetime.now(UTC) - HOUR, 4)
    records = metrics_records(caplog)

    assert [level for level, _ in records] == ["INFO", "DEBUG", "DEBUG", "DEBUG"], records
    assert f"device_id={device_id} batch b0 has a window that ended" in records[0][1]
