"""Writes to a control stream that the orchestrator has already ended, over a real gRPC server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from edgefleet.agent.agent import write_control
from edgefleet.v1 import agent_pb2, agent_pb2_grpc


class EndingAgentService(agent_pb2_grpc.AgentServiceServicer):
    """Ends every control stream at once with the given status, as an orchestrator that goes away does."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code

    async def Control(
        self, request_iterator: AsyncIterator[agent_pb2.AgentMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.OrchestratorMessage]:
        if self.code != grpc.StatusCode.OK:
            await context.abort(self.code, "orchestrator stopping")
        return
        yield


async def write_after_end(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(EndingAgentService(code), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Control()
            await call.code()  # The stream has ended once its status is known.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await write_control(call, agent_pb2.AgentMessage())
            return caught.value
    finally:
        await server.stop(0)


def test_write_after_ok_end_unavailable() -> None:
    error = asyncio.run(write_after_end(grpc.StatusCode.OK))

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "control stream ended"


def test_write_after_abort_keeps_status() -> None:
    error = asyncio.run(write_after_end(grpc.StatusCode.UNAVAILABLE))

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "orchestrator stopping"
