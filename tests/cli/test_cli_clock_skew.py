"""Clock skew in `edgefleet devices show` and `devices list`, run in-process against a real orchestrator."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from edgefleet.cli.main import main
from edgefleet.common.serde import timestamp
from edgefleet.v1 import agent_pb2, agent_pb2_grpc
from tests.faults.processes import wait_for
from tests.servers import ControlStream, OrchestratorThread, register

pytest_plugins = ["tests.servers"]

Capture = pytest.CaptureFixture[str]
OpenStream = Callable[[agent_pb2_grpc.AgentServiceStub], ControlStream]


def cli(orchestrator: OrchestratorThread, capsys: Capture, *args: str) -> tuple[int, str]:
    """Run the CLI against orchestrator and return its exit status and stdout."""
    code = main(["--insecure", "--orchestrator", orchestrator.address, *args])
    return code, capsys.readouterr().out


def device_with_clock(orchestrator: OrchestratorThread, open_stream: OpenStream, offset: timedelta) -> str:
    """Connect a new device whose heartbeat carries a clock offset from the real time; return its id."""
    device_id, key = register(orchestrator.agent)
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key)
    wait_for(lambda: device_id in orchestrator.state.hub.sessions, "the control stream")
    heartbeat = agent_pb2.Heartbeat(sequence=1, sent_at=timestamp(datetime.now(UTC) + offset))
    stream.send(agent_pb2.AgentMessage(heartbeat=heartbeat))
    stream.receive_kind("heartbeat_ack")
    return device_id


@pytest.fixture
def orchestrator(start_orchestrator: Callable[..., OrchestratorThread]) -> OrchestratorThread:
    return start_orchestrator(max_clock_skew_s=60.0)


def test_show_json_skewed(orchestrator: OrchestratorThread, open_stream: OpenStream, capsys: Capture) -> None:
    device_id = device_with_clock(orchestrator, open_stream, -timedelta(hours=1))

    code, out = cli(orchestrator, capsys, "devices", "show", device_id, "-o", "json")

    device = json.loads(out)
    assert code == 0
    assert device["clock_skew_seconds"] == pytest.approx(-3600, abs=5)
    assert device["clock_skewed"] is True


def test_show_json_within_bound(orchestrator: OrchestratorThread, open_stream: OpenStream, capsys: Capture) -> None:
    device_id = device_with_clock(orchestrator, open_stream, timedelta(seconds=20))

    code, out = cli(orchestrator, capsys, "devices", "show", device_id, "-o", "json")

    device = json.loads(out)
    assert code == 0
    assert device["clock_skew_seconds"] == pytest.approx(20, abs=5)
    assert device["clock_skewed"] is False


def test_show_table_skewed(orchestrator: OrchestratorThread, open_stream: OpenStream, capsys: Capture) -> None:
    behind = device_with_clock(orchestrator, open_stream, -timedelta(hours=1))
    ahead = device_with_clock(orchestrator, open_stream, timedelta(minutes=5))

    behind_code, behind_out = cli(orchestrator, capsys, "devices", "show", behind)
    ahead_code, ahead_out = cli(orchestrator, capsys, "devices", "show", ahead)

    assert behind_code == 0
    assert "WARNING: the device clock is 3600 s behind the orchestrator" in behind_out
    assert "placed at their receive time" in behind_out
    assert ahead_code == 0
    assert "WARNING: the device clock is 300 s ahead of the orchestrator" in ahead_out


def test_show_table_within_bound(orchestrator: OrchestratorThread, open_stream: OpenStream, capsys: Capture) -> None:
    device_id = device_with_clock(orchestrator, open_stream, timedelta(seconds=20))

    code, out = cli(orchestrator, capsys, "devices", "show", device_id)

    assert code == 0
    assert "clock" not in out


def test_list_marks_skewed(orchestrator: OrchestratorThread, open_stream: OpenStream, capsys: Capture) -> None:
    skewed = device_with_clock(orchestrator, open_stream, -timedelta(hours=1))
    in_bound = device_with_clock(orchestrator, open_stream, timedelta(seconds=20))

    code, out = cli(orchestrator, capsys, "devices", "list")

    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert code == 0
    assert "online, clock skewed" in rows[skewed]
    assert "clock skewed" not in rows[in_bound]
