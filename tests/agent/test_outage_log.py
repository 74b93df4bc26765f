"""How an agent logs a long outage of its orchestrator."""

from __future__ import annotations

import logging

import pytest

from edgefleet.agent.agent import OutageLog


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def levels(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(record.levelname, record.getMessage()) for record in caplog.records]


def test_one_warning_per_interval_for_the_same_error(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    outage = OutageLog("orch:50051", interval_s=300.0, clock=clock)
    caplog.set_level(logging.DEBUG, logger="edgefleet.agent.agent")

    for _ in range(20):  # 20 attempts 30 s apart: 570 s in all.
        outage.failed("UNAVAILABLE", "connection refused", 30.0)
        clock.now += 30.0

    warnings = [message for level, message in levels(caplog) if level == "WARNING"]
    assert warnings == [
        "connection to orchestrator orch:50051 failed (UNAVAILABLE: connection refused); retrying in 30.0 s",
        "orchestrator orch:50051 still unreachable after 11 attempts over 300 s "
        "(UNAVAILABLE: connection refused); retrying in 30.0 s",
    ]
    assert sum(level == "DEBUG" for level, _ in levels(caplog)) == 18


def test_new_error_warns_at_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    outage = OutageLog("orch:50051", interval_s=300.0, clock=clock)
    caplog.set_level(logging.DEBUG, logger="edgefleet.agent.agent")

    outage.failed("UNAVAILABLE", "connection refused", 1.0)
    clock.now += 1.0
    outage.failed("UNAVAILABLE", "connection refused", 2.0)
    clock.now += 2.0
    outage.failed("DEADLINE_EXCEEDED", "Deadline Exceeded", 4.0)

    assert [level for level, _ in levels(caplog)] == ["WARNING", "DEBUG", "WARNING"]
    assert "DEADLINE_EXCEEDED" in caplog.records[-1].getMessage()


# Details that grpcio 1.85 reported for one outage, in turn, while a proxy reset each connection.
SOCKET_CLOSED = (
    "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:52151: Handshake read failed "
    "(Socket closed)"
)
CONNECTION_RESET = (
    "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:52151: Handshake read failed "
    "(recvmsg:Connection reset by peer (104))"
)


def test_new_details_same_code_not_warned(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    outage = OutageLog("127.0.0.1:52151", interval_s=300.0, clock=clock)
    caplog.set_level(logging.DEBUG, logger="edgefleet.agent.agent")

    for attempt in range(12):  # 12 attempts 30 s apart: 330 s in all.
        outage.failed("UNAVAILABLE", CONNECTION_RESET if attempt % 3 else SOCKET_CLOSED, 30.0)
        clock.now += 30.0

    warnings = [message for level, message in levels(caplog) if level == "WARNING"]
    assert len(warnings) == 2
    assert warnings[0].startswith("connection to orchestrator 127.0.0.1:52151 failed (UNAVAILABLE: ")
    assert "(Socket closed)" in warnings[0]
    # The periodic warning carries the details of the attempt that logs it, the 11th, which was reset.
    assert warnings[1].startswith("orchestrator 127.0.0.1:52151 still unreachable after 11 attempts over 300 s")
    assert "Connection reset by peer" in warnings[1]
    assert sum(level == "DEBUG" for level, _ in levels(caplog)) == 10


def test_outage_end_logs_its_length(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    outage = OutageLog("orch:50051", clock=clock)
    caplog.set_level(logging.INFO, logger="edgefleet.agent.agent")
    outage.ended()  # A first connection without an outage logs nothing.
    for _ in range(4):
        outage.failed("UNAVAILABLE", "connection refused", 10.0)
        clock.now += 10.0

    outage.ended()
    outage.failed("UNAVAILABLE", "connection refused", 1.0)

    assert levels(caplog)[-2:] == [
        ("INFO", "connected to orchestrator orch:50051 again after 4 failed attempts over 40 s"),
        (
            "WARNING",
            "connection to orchestrator orch:50051 failed (UNAVAILABLE: connection refused); retrying in 1.0 s",
        ),
    ]


def test_first_connection_after_failures_omits_again(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    outage = OutageLog("orch:50051", clock=clock)
    caplog.set_level(logging.INFO, logger="edgefleet.agent.agent")
    for _ in range(4):  # The orchestrator is not up yet when the agent starts.
        outage.failed("UNAVAILABLE", "connection refused", 1.0)
        clock.now += 1.0

    outage.ended()

    assert levels(caplog)[-1] == ("INFO", "connected to orchestrator orch:50051 after 4 failed attempts over 4 s")
