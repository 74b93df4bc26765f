"""How an agent logs metric uploads that fail round after round, against a real orchestrator."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.profiles import EnforcedLimits
from tests.servers import OrchestratorThread, agent_hardware, register

pytest_plugins = ["tests.servers"]


def closed_port() -> int:
    """Return a loopback port that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def upload_rounds(agent: Agent, address: str, rounds: int) -> None:
    async def run() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            for _ in range(rounds):
                agent.recorder.record("net", "1", "net:1:source", 5.0)
                await agent._upload(channel, include_open=True)

    asyncio.run(run())


def test_repeated_upload_failure_logged_once(
    start_orchestrator: Callable[..., OrchestratorThread], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    orchestrator = start_orchestrator()
    device_id, _ = register(orchestrator.agent)
    config = AgentConfig(orchestrator=orchestrator.address, state_dir=tmp_path / "agent", insecure=True)
    hardware = agent_hardware()
    limits = EnforcedLimits(cpus=(0,), threads=1, memory_budget_bytes=None)
    agent = Agent(config, hardware, limits, tuple(r.name for r in hardware.runtimes))
    agent.identity = dataclasses.replace(agent.identity, device_id=device_id)  # As a registration does.
    caplog.set_level(logging.DEBUG, logger="edgefleet.agent.agent")

    upload_rounds(agent, f"127.0.0.1:{closed_port()}", rounds=4)
    waiting = len(agent.metric_buffer)
    upload_rounds(agent, orchestrator.address, rounds=1)

    records = [(r.levelname, r.getMessage()) for r in caplog.records if "metric upload" in r.getMessage()]
    assert [level for level, _ in records] == ["WARNING", "DEBUG", "DEBUG", "DEBUG", "INFO"]
    assert "(UNAVAILABLE: " in records[0][1]
    assert records[-1][1].startswith("metric upload succeeded after 4 failed attempts")
    assert waiting == 4
    assert len(agent.metric_buffer) == 0


class ResettingPort:
    """A loopback port that refuses connections, or accepts each one and resets it at once.

    One orchestrator address that fails in these two ways gives gRPC errors of one status code,
    UNAVAILABLE, with different details.
    """

    def __init__(self) -> None:
        self.port = closed_port()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def reset_connections(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self._listener = listener
        self._thread = threading.Thread(target=self._reset_each, args=(listener,), daemon=True)
        self._thread.start()

    def refuse_connections(self) -> None:
        if self._listener is None or self._thread is None:
            return
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=5)
        self._listener = None

    @staticmethod
    def _reset_each(listener: socket.socket) -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # refuse_connections() closed the listener.
                return
            # A zero linger time makes close() send RST instead of FIN.
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()


def test_upload_changing_details_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = AgentConfig(orchestrator="127.0.0.1:1", state_dir=tmp_path / "agent", insecure=True)
    hardware = agent_hardware()
    limits = EnforcedLimits(cpus=(0,), threads=1, memory_budget_bytes=None)
    agent = Agent(config, hardware, limits, tuple(r.name for r in hardware.runtimes))
    agent.identity = dataclasses.replace(agent.identity, device_id="device-1")  # As a registration does.
    caplog.set_level(logging.DEBUG, logger="edgefleet.agent.agent")
    port = ResettingPort()

    try:
        for _ in range(2):
            upload_rounds(agent, f"127.0.0.1:{port.port}", rounds=1)
            port.reset_connections()
            upload_rounds(agent, f"127.0.0.1:{port.port}", rounds=1)
            port.refuse_connections()
    finally:
        port.refuse_connections()

    records = [(r.levelname, r.getMessage()) for r in caplog.records if "metric upload" in r.getMessage()]
    details = {message.split(" failed (", 1)[1].rsplit(";", 1)[0] for _, message in records}
    assert len(details) >= 2, f"the port gave one error text only: {details}"
    assert all("(UNAVAILABLE: " in message for _, message in records)
    assert [level for level, _ in records] == ["WARNING", "DEBUG", "DEBUG", "DEBUG"]
    assert len(agent.metric_buffer) == 4
