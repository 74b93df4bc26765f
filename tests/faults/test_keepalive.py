"""gRPC keepalive on both sides: a blackholed link is noticed and dropped, and short pings are never rejected."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from edgefleet.agent.agent import Keepalive
from edgefleet.agent.config import AgentConfig
from edgefleet.orchestrator.fleet import StreamSession
from edgefleet.orchestrator.store.tables import devices
from tests.faults.processes import AgentProcess, AgentRunner, OrchestratorProcess, wait_for
from tests.faults.proxy import TcpProxy
from tests.servers import OrchestratorThread, agent_hardware

pytest_plugins = ["tests.servers"]

KEEPALIVE_S = 1.0
KEEPALIVE_TIMEOUT_S = 1.0
# Slack on top of keepalive time + timeout for a loaded 2-core machine to act on the dead link.
DETECTION_SLACK_S = 3.0
# OrchestratorProcess passes --heartbeat-interval-s 1.
HEARTBEAT_INTERVAL_S = 1.0


@pytest.fixture
def proxy_factory() -> Iterator[Callable[[int], TcpProxy]]:
    proxies: list[TcpProxy] = []

    def start(port: int) -> TcpProxy:
        proxy = TcpProxy(port)
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.close()


def start_agent(tmp_path: Path, address: str, keepalive: Keepalive) -> AgentRunner:
    config = AgentConfig(
        orchestrator=address,
        state_dir=tmp_path / "agent",
        metrics_window_s=1.0,
        max_backoff_s=0.5,
        shutdown_grace_s=1.0,
        insecure=True,
    )
    return AgentRunner(config, agent_hardware(), keepalive=keepalive)


def short_keepalive_orchestrator(start: Callable[..., OrchestratorThread], **overrides: float) -> OrchestratorThread:
    settings = {
        "keepalive_time_s": KEEPALIVE_S,
        "keepalive_timeout_s": KEEPALIVE_TIMEOUT_S,
        "keepalive_min_ping_interval_s": 0.5,
        **overrides,
    }
    return start(**settings)


def test_keepalive_blackhole_detected(
    tmp_path: Path, start_orchestrator: Callable[..., OrchestratorThread], proxy_factory: Callable[[int], TcpProxy]
) -> None:
    orchestrator = short_keepalive_orchestrator(start_orchestrator)
    proxy = proxy_factory(orchestrator.port)
    runner = start_agent(tmp_path, proxy.address, Keepalive(KEEPALIVE_S, KEEPALIVE_TIMEOUT_S))
    try:
        agent = runner.agent
        wait_for(lambda: agent.connected and agent.device_id in orchestrator.state.hub.sessions, "the first stream")
        session = orchestrator.state.hub.sessions[agent.device_id]

        proxy.blackhole()
        cut_at = time.monotonic()
        wait_for(lambda: not agent.connected, "the agent to notice the dead link", timeout_s=30, interval_s=0.01)
        agent_noticed_s = time.monotonic() - cut_at
        wait_for(
            lambda: orchestrator.state.hub.sessions.get(agent.device_id) is not session,
            "the orchestrator to drop the dead stream",
            timeout_s=30,
            interval_s=0.01,
        )
        server_dropped_s = time.monotonic() - cut_at
        proxy.pass_traffic()
        wait_for(lambda: agent.connected and agent.sessions_opened == 2, "the agent to reconnect")
    finally:
        runner.stop()

    bound = KEEPALIVE_S + KEEPALIVE_TIMEOUT_S + DETECTION_SLACK_S
    print(f"agent noticed after {agent_noticed_s:.2f} s, server dropped the stream after {server_dropped_s:.2f} s")
    assert agent_noticed_s < bound
    assert server_dropped_s < bound
    assert runner.error is None


def watch_sessions(runner: AgentRunner, orchestrator: OrchestratorThread, duration_s: float) -> tuple[int, int]:
    """Return how many streams the agent opened and how often the server's session changed in duration_s."""
    agent = runner.agent
    wait_for(lambda: agent.connected and agent.device_id in orchestrator.state.hub.sessions, "the first stream")
    session: StreamSession | None = orchestrator.state.hub.sessions[agent.device_id]
    changes = 0
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        current = orchestrator.state.hub.sessions.get(agent.device_id)
        if current is not session:
            changes += 1
            session = current
        time.sleep(0.1)
    return agent.sessions_opened, changes


@pytest.mark.slow
def test_keepalive_pings_accepted_without_data(
    tmp_path: Path, start_orchestrator: Callable[..., OrchestratorThread]
) -> None:
    # Heartbeats every 30 s leave the link without data for the 20 s watched, so each of the 20 or so
    # pings counts against the server's minimum interval. Two early pings (gRPC's default
    # max_ping_strikes) would end the connection with too_many_pings, as the control below shows.
    orchestrator = short_keepalive_orchestrator(start_orchestrator, heartbeat_interval_s=30.0)
    runner = start_agent(tmp_path, orchestrator.address, Keepalive(KEEPALIVE_S, KEEPALIVE_TIMEOUT_S))
    try:
        opened, changes = watch_sessions(runner, orchestrator, duration_s=20.0)
    finally:
        runner.stop()

    assert opened == 1
    assert changes == 0


def test_keepalive_too_many_pings_control(
    tmp_path: Path, start_orchestrator: Callable[..., OrchestratorThread]
) -> None:
    # The check above can fail: pings faster than the server accepts end the connection.
    orchestrator = short_keepalive_orchestrator(
        start_orchestrator, heartbeat_interval_s=30.0, keepalive_min_ping_interval_s=5.0
    )
    runner = start_agent(tmp_path, orchestrator.address, Keepalive(0.2, KEEPALIVE_TIMEOUT_S))
    try:
        opened, _ = watch_sessions(runner, orchestrator, duration_s=8.0)
    finally:
        runner.stop()

    assert opened > 1


def stored_device(orchestrator: OrchestratorProcess, device_id: str) -> sa.Row[tuple[bool, datetime | None]]:
    """Read the device's connected flag and last_seen from the orchestrator's SQLite file."""
    engine = sa.create_engine(f"sqlite:///{orchestrator.data_dir / 'edgefleet.db'}")
    try:
        with engine.connect() as connection:
            query = sa.select(devices.c.connected, devices.c.last_seen).where(devices.c.device_id == device_id)
            return connection.execute(query).one()
    finally:
        engine.dispose()


@pytest.mark.slow
def test_frozen_agent_keeps_last_seen(tmp_path: Path) -> None:
    # SIGSTOP leaves the agent's socket open, so only the orchestrator's keepalive notices the device
    # is gone. last_seen must stay at the agent's last message, not move to that close.
    orchestrator = OrchestratorProcess(
        tmp_path,
        "--keepalive-time-s",
        str(KEEPALIVE_S),
        "--keepalive-timeout-s",
        str(KEEPALIVE_TIMEOUT_S),
        "--keepalive-min-ping-interval-s",
        "0.5",
    )
    orchestrator.start()
    agent = AgentProcess(tmp_path, "camera", orchestrator.address)
    agent.start()
    try:
        device_id = wait_for(agent.device_id, "the agent to register")
        wait_for(lambda: stored_device(orchestrator, device_id).connected, "the agent's control stream")
        time.sleep(3 * HEARTBEAT_INTERVAL_S)  # Heartbeats move last_seen past the stream's open.
        assert agent.popen is not None

        os.kill(agent.popen.pid, signal.SIGSTOP)
        stopped_at = datetime.now(UTC)
        wait_for(lambda: not stored_device(orchestrator, device_id).connected, "the orchestrator to store the close")
        closed_at = datetime.now(UTC)
        # The last-seen writer runs every 2 s: wait for one more write after the close.
        time.sleep(3.0)
        last_seen = stored_device(orchestrator, device_id).last_seen
        log_text = orchestrator.log_path.read_text()
        os.kill(agent.popen.pid, signal.SIGCONT)
    finally:
        agent.stop()
        orchestrator.stop()

    assert last_seen is not None
    print(f"stopped at {stopped_at}, last seen {last_seen}, disconnect seen at {closed_at}")
    # A message in flight when the signal arrived may still be read just after it.
    assert last_seen <= stopped_at + timedelta(seconds=0.5)
    assert last_seen >= stopped_at - timedelta(seconds=2 * HEARTBEAT_INTERVAL_S)
    assert f"control stream closed for device_id={device_id}: the agent's side of the stream ended" in log_text
