"""200 simulated agents lose a real orchestrator at once; their reconnects spread across the backoff window.

Each simulated agent runs the agent's own reconnect loop (edgefleet.agent.agent.reconnect_forever)
with the real Backoff, around a session that registers and keeps a control stream open like the agent's.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import pytest

from edgefleet.agent.agent import reconnect_forever
from edgefleet.common.backoff import Backoff
from edgefleet.v1 import agent_pb2, agent_pb2_grpc
from tests.servers import OrchestratorThread, register_request

pytest_plugins = ["tests.servers"]

AGENTS = 200
BASE_S = 1.0
CAP_S = 4.0
# Retries measured per agent: delays are drawn from [0, 1], [0, 2], [0, 4] and [0, 4] seconds.
RETRIES = 4
# Kolmogorov-Smirnov critical value for n samples at significance 0.001 is about 1.95 / sqrt(n).
KS_COEFFICIENT = 1.95
# The largest share of one round's retries allowed in any quarter of its window (uniform: 25%).
MAX_QUARTER_SHARE = 0.40
# The largest share of the capped rounds' retries allowed in one wall-clock second.
MAX_SECOND_SHARE = 0.35
# How much earlier than its drawn delay a retry may start (timer resolution).
EARLY_S = 0.01
# The median time a retry may start after its drawn delay ends. A loaded CI machine has stalled the
# event loop of the 200 agents for about 0.5 s at once. A loop that slept twice the drawn delay
# would start a median of 2 s late in the capped rounds.
MEDIAN_LATE_S = 1.0


@dataclass
class SimulatedAgent:
    index: int
    request: agent_pb2.RegisterRequest
    attempts: list[float] = field(default_factory=list)  # Monotonic start time of every session.
    failures: list[float] = field(default_factory=list)  # Monotonic time of every failure, when the delay is drawn.
    delays: list[float] = field(default_factory=list)  # The delay drawn after every failure.
    connected: asyncio.Event = field(default_factory=asyncio.Event)


async def run_session(agent: SimulatedAgent, stub: agent_pb2_grpc.AgentServiceStub) -> None:
    """Register and hold a control stream, as Agent._session does; raise UNAVAILABLE when it ends."""
    agent.attempts.append(time.monotonic())
    response = await stub.Register(agent.request, timeout=10)
    agent.request.device_id = response.device_id
    call = stub.Control()
    hello = agent_pb2.Hello(device_id=response.device_id, instance_key=agent.request.instance_key)
    await call.write(agent_pb2.AgentMessage(hello=hello))
    agent.connected.set()
    async for _ in call:
        pass
    raise grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "control stream ended"
    )


async def run_fleet(address: str, stop_orchestrator: Callable[[], None]) -> list[SimulatedAgent]:
    agents = [SimulatedAgent(i, register_request(labels={"sim": str(i)})) for i in range(AGENTS)]
    stop = asyncio.Event()
    channels = [grpc.aio.insecure_channel(address) for _ in agents]
    tasks = []
    for agent, channel in zip(agents, channels, strict=True):
        stub = agent_pb2_grpc.AgentServiceStub(channel)

        def on_retry(error: grpc.aio.AioRpcError, delay: float, agent: SimulatedAgent = agent) -> None:
            agent.failures.append(time.monotonic())
            agent.delays.append(delay)

        backoff = Backoff(base_s=BASE_S, cap_s=CAP_S, rng=random.Random(agent.index))
        session = functools.partial(run_session, agent, stub)
        tasks.append(asyncio.create_task(reconnect_forever(session, backoff, stop, on_retry=on_retry)))
    try:
        await asyncio.wait_for(asyncio.gather(*(a.connected.wait() for a in agents)), timeout=120)
        await asyncio.to_thread(stop_orchestrator)
        deadline = time.monotonic() + 60
        while any(len(a.attempts) < RETRIES + 1 for a in agents) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
    return agents


def ks_statistic(samples: list[float]) -> float:
    """Return the Kolmogorov-Smirnov distance between the samples' distribution and U(0, 1)."""
    ordered = sorted(samples)
    n = len(ordered)
    return max(max((i + 1) / n - x, x - i / n) for i, x in enumerate(ordered))


@pytest.mark.slow
def test_backoff_fleet_spreads_reconnects(start_orchestrator: Callable[..., OrchestratorThread]) -> None:
    orchestrator = start_orchestrator()
    stopped_at: list[float] = []

    def stop() -> None:
        stopped_at.append(time.monotonic())
        orchestrator.stop(grace_s=0.5)

    agents = asyncio.run(run_fleet(orchestrator.address, stop))

    assert all(len(a.attempts) >= RETRIES + 1 for a in agents), "every agent retried RETRIES times"
    for retry in range(RETRIES):
        ceiling = min(CAP_S, BASE_S * 2**retry)
        # The spread is checked on the drawn delays, because on a loaded machine the event loop of
        # 200 agents wakes all of them late by a similar amount, which is unrelated to jitter.
        normalized = [a.delays[retry] / ceiling for a in agents]
        statistic = ks_statistic(normalized)
        quarters = [sum(1 for x in normalized if q / 4 <= x < (q + 1) / 4) for q in range(4)]
        late = sorted(a.attempts[retry + 1] - a.failures[retry] - a.delays[retry] for a in agents)
        print(
            f"retry {retry}: window {ceiling:g} s, KS {statistic:.3f}, quarters {quarters}, "
            f"late by median {late[len(late) // 2] * 1000:.0f} ms, max {late[-1] * 1000:.0f} ms"
        )

        assert max(normalized) <= 1.0, f"retry {retry} drew a delay past its window"
        assert statistic < KS_COEFFICIENT / math.sqrt(len(agents)), f"retry {retry} delays are not uniform"
        assert max(quarters) <= MAX_QUARTER_SHARE * len(agents), f"retry {retry} bunches in one quarter"
        assert late[0] > -EARLY_S, f"retry {retry} started {-late[0]:.3f} s before its delay ended"
        assert late[len(late) // 2] < MEDIAN_LATE_S, f"retry {retry} did not wait for its drawn delays"

    # Without jitter every agent would retry a capped round in the same second: half of these retries.
    capped = [a.attempts[r + 1] - stopped_at[0] for a in agents for r in range(RETRIES) if BASE_S * 2**r >= CAP_S]
    per_second = [sum(1 for t in capped if s <= t < s + 1) for s in range(math.ceil(max(capped)) + 1)]
    print(f"capped retries per second after the stop: {per_second}")
    assert max(per_second) <= MAX_SECOND_SHARE * len(capped)
