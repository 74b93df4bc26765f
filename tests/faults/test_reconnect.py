"""An agent reconnects within --max-backoff-s once an orchestrator that was unreachable for a while is back."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.processes import AgentProcess, OrchestratorProcess, wait_for
from tests.faults.proxy import TcpProxy

# Long enough for gRPC's own connection backoff, without a cap, to grow past 10 s: from 1 s, times 1.6
# per failed attempt, it makes about 7 attempts in 30 s. AgentProcess passes --max-backoff-s 1.
OUTAGE_S = 30.0


@pytest.mark.slow
def test_reconnect_after_outage_within_max_backoff(tmp_path: Path) -> None:
    orchestrator = OrchestratorProcess(tmp_path)
    orchestrator.start()
    proxy = TcpProxy(orchestrator.port)
    agent = AgentProcess(tmp_path, "camera", proxy.address)
    agent.start()
    try:
        wait_for(agent.device_id, "the agent to register")
        wait_for(lambda: "registered as device_id=" in agent.log_path.read_text(), "the registration log line")

        proxy.drop()
        accepted_before = proxy.accepted
        time.sleep(OUTAGE_S)
        attempts = proxy.accepted - accepted_before
        proxy.pass_traffic()
        restored_at = time.monotonic()
        wait_for(lambda: " again after " in agent.log_path.read_text(), "the agent to reconnect")
        reconnect_s = time.monotonic() - restored_at
    finally:
        agent.stop()
        proxy.close()
        orchestrator.stop()

    # About one connection attempt per second with the cap; gRPC's uncapped backoff makes about 7.
    assert attempts >= 15
    assert reconnect_s < 10.0
