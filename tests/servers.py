"""Real orchestrators and agents for the service tests, run in background threads of the test process.

Test modules load the fixtures with `pytest_plugins = ["tests.servers"]` after importing helpers from
here. Pytest cannot rewrite the asserts of a module imported that early, and the PYTEST_DONT_REWRITE
marker in this docstring stops it from warning about that.
"""

from __future__ import annotations

import asyncio
import hashlib
import queue
import secrets
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.profiles import EnforcedLimits
from edgefleet.common.hardware import HardwareProfile, RuntimeInfo
from edgefleet.orchestrator.config import OrchestratorConfig
from edgefleet.orchestrator.server import RunningServer, start_server
from edgefleet.orchestrator.state import OrchestratorState
from edgefleet.v1 import agent_pb2, agent_pb2_grpc, common_pb2, operator_pb2, operator_pb2_grpc

T = TypeVar("T")

GIB = 1024**3
MIB = 1024**2
# Generous bound for one step (a server start, a stream message, a state change) on a loaded 2-core machine.
STEP_TIMEOUT_S = 30.0


class OrchestratorThread:
    """A real orchestrator (start_server) on its own event loop in a background thread.

    The server binds 127.0.0.1 on a free port. Tests talk to it through real gRPC stubs and may read its
    state (store, fleet hub) directly; stop() shuts it down as SIGTERM would.
    """

    def __init__(self, config: OrchestratorConfig) -> None:
        self.config = config
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._running: RunningServer | None = None
        self._error: BaseException | None = None
        self._grace_s = 1.0
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="orchestrator", daemon=True)
        self._thread.start()
        if not self._started.wait(STEP_TIMEOUT_S):
            raise TimeoutError(f"orchestrator did not start within {STEP_TIMEOUT_S:g} s")
        if self._error is not None:
            raise self._error
        self.channel = grpc.insecure_channel(self.address)
        self.operator = operator_pb2_grpc.OperatorServiceStub(self.channel)
        self.agent = agent_pb2_grpc.AgentServiceStub(self.channel)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self._running = await start_server(self.config)
        except BaseException as error:
            self._error = error
            self._started.set()
            return
        self._started.set()
        await self._stop.wait()
        await self._running.stop(self._grace_s)

    @property
    def port(self) -> int:
        assert self._running is not None
        return self._running.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def state(self) -> OrchestratorState:
        assert self._running is not None
        return self._running.state

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the server's event loop and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(STEP_TIMEOUT_S)

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving as on SIGTERM: close streams, let calls finish for grace_s, close the store."""
        if not self._thread.is_alive():
            return
        self.channel.close()
        self._grace_s = grace_s
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(STEP_TIMEOUT_S + grace_s)
        if self._thread.is_alive():
            raise TimeoutError(f"orchestrator did not stop within {STEP_TIMEOUT_S + grace_s:g} s")


def orchestrator_config(tmp_path: Path, db_url: str = "", **overrides: Any) -> OrchestratorConfig:
    """Return a configuration for a test orchestrator on 127.0.0.1 port 0 with its data under tmp_path.

    It serves plaintext (insecure) on one port unless overrides set TLS up; tests/security covers TLS.
    """
    config = OrchestratorConfig(
        listen="127.0.0.1:0", db=db_url, data_dir=tmp_path / "orchestrator", insecure=True, operator_listen=""
    )
    return replace(config, **overrides)


def store_connected_device(db_url: str, device_id: str = "edge-01") -> None:
    """Store device_id as registered and connected, as an orchestrator does while the device's stream is open."""
    from edgefleet.common.hardware import HardwareProfile
    from edgefleet.orchestrator.store import open_store

    store = open_store(db_url)
    try:
        hardware = HardwareProfile(
            cpu_model="Cortex-A76",
            architecture="aarch64",
            logical_cores=4,
            usable_cores=4.0,
            cpu_features=(),
            memory_total_bytes=4 << 30,
            memory_available_bytes=2 << 30,
            disk_free_bytes=8 << 30,
        )
        now = datetime.now(UTC)
        store.register_device(
            device_id=device_id,
            instance_key_hash="k" * 64,
            hardware=hardware,
            labels={},
            agent_version="0.1.0",
            peer="ipv4:127.0.0.1:40000",
            now=now,
        )
        store.set_connected(device_id, True, now)
    finally:
        store.close()


def stored_device_connected(db_url: str, device_id: str = "edge-01") -> bool:
    """Return whether the database stores device_id as connected."""
    from edgefleet.orchestrator.store import open_store

    store = open_store(db_url)
    try:
        device = store.get_device(device_id)
    finally:
        store.close()
    assert device is not None
    return device.connected


@pytest.fixture
def start_orchestrator(tmp_path: Path) -> Iterator[Callable[..., OrchestratorThread]]:
    """Yield a factory of orchestrators (db_url and config fields as keywords); stop them all afterwards."""
    started: list[OrchestratorThread] = []

    def start(db_url: str = "", **overrides: Any) -> OrchestratorThread:
        server = OrchestratorThread(orchestrator_config(tmp_path, db_url, **overrides))
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def orchestrator(db_url: str, start_orchestrator: Callable[..., OrchestratorThread]) -> OrchestratorThread:
    """Return a running orchestrator on db_url: on SQLite and on PostgreSQL."""
    return start_orchestrator(db_url)


# Requests


def new_instance_key() -> str:
    return secrets.token_urlsafe(24)


def hardware_message(**fields: Any) -> common_pb2.HardwareProfile:
    """Return a valid hardware profile of a 4-core x86 machine with both runtimes; fields replace values."""
    values: dict[str, Any] = {
        "cpu_model": "Test CPU @ 2.0GHz",
        "architecture": "x86_64",
        "logical_cores": 4,
        "usable_cores": 2.0,
        "cpu_features": ["avx2", "fma"],
        "memory_total_bytes": 2 * GIB,
        "memory_available_bytes": GIB,
        "disk_free_bytes": 10 * GIB,
        "runtimes": [
            common_pb2.Runtime(name="onnxruntime", version="1.32.0", providers=["CPUExecutionProvider"]),
            common_pb2.Runtime(name="litert", version="2.3.0", providers=["xnnpack"]),
        ],
        "os": "Linux",
        "kernel": "6.1.0",
        "profile_name": "test",
    }
    values.update(fields)
    return common_pb2.HardwareProfile(**values)


def register_request(
    device_id: str = "",
    instance_key: str = "",
    hardware: common_pb2.HardwareProfile | None = None,
    labels: dict[str, str] | None = None,
) -> agent_pb2.RegisterRequest:
    return agent_pb2.RegisterRequest(
        device_id=device_id,
        instance_key=instance_key or new_instance_key(),
        hardware=hardware if hardware is not None else hardware_message(),
        labels=labels or {},
        agent_version="0.0.0-test",
    )


def register(
    stub: agent_pb2_grpc.AgentServiceStub,
    device_id: str = "",
    instance_key: str = "",
    hardware: common_pb2.HardwareProfile | None = None,
    labels: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Register a device through the real Register call; return its device id and instance key."""
    request = register_request(device_id, instance_key, hardware, labels)
    response = stub.Register(request, timeout=STEP_TIMEOUT_S)
    return response.device_id, request.instance_key


def get_device(orchestrator: OrchestratorThread, device_id: str) -> operator_pb2.Device:
    return orchestrator.operator.GetDevice(operator_pb2.GetDeviceRequest(device_id=device_id), timeout=STEP_TIMEOUT_S)


def wait_until(condition: Callable[[], T | None], what: str, timeout_s: float = STEP_TIMEOUT_S) -> T:
    """Poll condition until it returns a true value and return that value; fail naming what after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


# Control streams


@dataclass(frozen=True)
class StreamEnd:
    """How a control stream ended: its status code and details."""

    code: grpc.StatusCode
    details: str


class ControlStream:
    """A Control call driven from the test: send() queues agent messages, receive() returns the next reply."""

    def __init__(self, stub: agent_pb2_grpc.AgentServiceStub) -> None:
        self._requests: queue.Queue[agent_pb2.AgentMessage | None] = queue.Queue()
        self._responses: queue.Queue[agent_pb2.OrchestratorMessage | StreamEnd] = queue.Queue()
        self.call = stub.Control(iter(self._requests.get, None))
        self._reader = threading.Thread(target=self._read, name="control-reader", daemon=True)
        self._reader.start()
        self.end: StreamEnd | None = None

    def _read(self) -> None:
        try:
            for message in self.call:
                self._responses.put(message)
        except grpc.RpcError as error:
            self._responses.put(StreamEnd(error.code(), error.details() or ""))
            return
        self._responses.put(StreamEnd(grpc.StatusCode.OK, ""))

    def send(self, message: agent_pb2.AgentMessage) -> None:
        self._requests.put(message)

    def hello(self, device_id: str, instance_key: str, generation: int = 0) -> None:
        self.send(
            agent_pb2.AgentMessage(
                hello=agent_pb2.Hello(device_id=device_id, instance_key=instance_key, desired_generation=generation)
            )
        )

    def heartbeat(self, sequence: int) -> None:
        heartbeat = agent_pb2.Heartbeat(sequence=sequence)
        heartbeat.sent_at.GetCurrentTime()
        self.send(agent_pb2.AgentMessage(heartbeat=heartbeat))

    def receive(self, timeout_s: float = STEP_TIMEOUT_S) -> agent_pb2.OrchestratorMessage:
        """Return the next message from the orchestrator; fail if the stream ended or nothing came."""
        item = self._next(timeout_s)
        if isinstance(item, StreamEnd):
            pytest.fail(f"control stream ended with {item.code.name}: {item.details}")
        return item

    def receive_kind(self, kind: str, timeout_s: float = STEP_TIMEOUT_S) -> agent_pb2.OrchestratorMessage:
        """Return the next message whose body is kind, skipping others."""
        deadline = time.monotonic() + timeout_s
        while True:
            message = self.receive(max(deadline - time.monotonic(), 0.01))
            if message.WhichOneof("body") == kind:
                return message

    def wait_end(self, timeout_s: float = STEP_TIMEOUT_S) -> StreamEnd:
        """Wait until the orchestrator ends the stream, skipping messages; return how it ended."""
        deadline = time.monotonic() + timeout_s
        while True:
            item = self._next(max(deadline - time.monotonic(), 0.01))
            if isinstance(item, StreamEnd):
                return item

    def _next(self, timeout_s: float) -> agent_pb2.OrchestratorMessage | StreamEnd:
        if self.end is not None:
            return self.end
        try:
            item = self._responses.get(timeout=timeout_s)
        except queue.Empty:
            pytest.fail(f"no message on the control stream within {timeout_s:g} s")
        if isinstance(item, StreamEnd):
            self.end = item
        return item

    def half_close(self) -> None:
        """End the request side, as an agent that stops sending does; replies may still come."""
        self._requests.put(None)

    def close(self) -> None:
        """Half-close the request side and cancel the call."""
        self.half_close()
        self.call.cancel()
        self._reader.join(STEP_TIMEOUT_S)


@pytest.fixture
def open_stream() -> Iterator[Callable[[agent_pb2_grpc.AgentServiceStub], ControlStream]]:
    """Yield a factory of control streams; close them all afterwards."""
    streams: list[ControlStream] = []

    def start(stub: agent_pb2_grpc.AgentServiceStub) -> ControlStream:
        stream = ControlStream(stub)
        streams.append(stream)
        return stream

    yield start
    for stream in streams:
        stream.close()


# Models


def linear_onnx(seed: int = 0, opset: int = 17) -> bytes:
    """Return an ONNX model of y = x @ W + b with x float32 (1, 4) and y (1, 3); the seed picks W and b.

    opset is the default-domain opset that the model is stamped with.
    """
    weight, bias = linear_weights(seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "weight"], ["product"]),
            helper.make_node("Add", ["product", "bias"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [
            helper.make_tensor("weight", TensorProto.FLOAT, weight.shape, weight.ravel().tolist()),
            helper.make_tensor("bias", TensorProto.FLOAT, bias.shape, bias.ravel().tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def linear_weights(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)


def upload_requests(
    data: bytes,
    name: str,
    version: str,
    *,
    variant_kind: str = "",
    chunk_bytes: int = MIB,
    size_bytes: int | None = None,
    sha256: str | None = None,
    filename: str = "model.onnx",
) -> Iterator[operator_pb2.UploadModelRequest]:
    """Yield an UploadModel stream: the header (size and SHA-256 of data unless given), then chunks."""
    header = operator_pb2.UploadModelHeader(
        name=name,
        version=version,
        size_bytes=len(data) if size_bytes is None else size_bytes,
        sha256=hashlib.sha256(data).hexdigest() if sha256 is None else sha256,
        filename=filename,
        variant_kind=variant_kind,
    )
    yield operator_pb2.UploadModelRequest(header=header)
    for start in range(0, len(data), chunk_bytes):
        yield operator_pb2.UploadModelRequest(chunk=data[start : start + chunk_bytes])


def upload(
    orchestrator: OrchestratorThread, data: bytes, name: str, version: str, **options: Any
) -> operator_pb2.Model:
    """Upload a model file through the real UploadModel call; options go to upload_requests."""
    return orchestrator.operator.UploadModel(upload_requests(data, name, version, **options), timeout=120)


def stored_artifacts(orchestrator: OrchestratorThread) -> list[Path]:
    """Return every file in the artifact store, temporary files included."""
    root = orchestrator.config.data_dir / "artifacts"
    return sorted(path for path in root.rglob("*") if path.is_file())


# Agents


def agent_hardware(
    runtimes: tuple[str, ...] = ("onnxruntime", "litert"), memory_bytes: int = 2 * GIB
) -> HardwareProfile:
    """Return a hardware profile for an in-process agent: one usable core and the given runtimes."""
    versions = {"onnxruntime": "1.32.0", "litert": "2.3.0"}
    return HardwareProfile(
        cpu_model="Test CPU",
        architecture="x86_64",
        logical_cores=2,
        usable_cores=1.0,
        cpu_features=("avx2",),
        memory_total_bytes=memory_bytes,
        memory_available_bytes=memory_bytes // 2,
        disk_free_bytes=10 * GIB,
        runtimes=tuple(RuntimeInfo(name, versions[name]) for name in runtimes),
        os="Linux",
        kernel="6.1.0",
        profile_name="test",
    )


class AgentThread:
    """A real Agent (edgefleet.agent.agent) on its own event loop in a background thread.

    It uses the given hardware profile instead of the probe and pins nothing, so it can share the
    test process. stop() ends it as SIGTERM would, with a final metrics upload.
    """

    def __init__(
        self,
        config: AgentConfig,
        hardware: HardwareProfile,
        memory_budget_bytes: int | None = None,
        agent_options: dict[str, Any] | None = None,
    ) -> None:
        from edgefleet.agent.agent import Agent

        limits = EnforcedLimits(cpus=(0,), threads=1, memory_budget_bytes=memory_budget_bytes)
        self.agent = Agent(config, hardware, limits, tuple(r.name for r in hardware.runtimes), **(agent_options or {}))
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="agent", daemon=True)
        self._thread.start()
        self._started.wait(STEP_TIMEOUT_S)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._started.set()
        try:
            await self.agent.run(self._stop)
        except BaseException as error:
            self.error = error

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout_s: float = STEP_TIMEOUT_S) -> BaseException | None:
        """Wait for the agent to end by itself; return the error that ended it, if any."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            pytest.fail(f"agent still running after {timeout_s:g} s")
        return self.error

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self.join(STEP_TIMEOUT_S)


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentThread]]:
    """Yield a factory of in-process agents: start(address, name, hardware=..., **AgentConfig fields).

    agent_options are keyword arguments of Agent, such as read_disk_usage.
    """
    started: list[AgentThread] = []

    def start(
        address: str,
        name: str = "agent",
        hardware: HardwareProfile | None = None,
        memory_budget_bytes: int | None = None,
        agent_options: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> AgentThread:
        config = AgentConfig(
            orchestrator=address,
            state_dir=tmp_path / name,
            metrics_window_s=1.0,
            max_backoff_s=0.5,
            shutdown_grace_s=2.0,
            labels={"name": name},
            insecure=True,
        )
        agent = AgentThread(
            replace(config, **overrides), hardware or agent_hardware(), memory_budget_bytes, agent_options
        )
        started.append(agent)
        return agent

    yield start
    for agent in reversed(started):
        agent.stop()


def cli_command(*args: str) -> list[str]:
    """Return the command line that runs the operator CLI in a fresh interpreter with plaintext gRPC."""
    return [sys.executable, "-m", "edgefleet.cli.main", "--insecure", *args]
