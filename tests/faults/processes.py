"""Real orchestrator and agent processes for fault tests, a local inference client, and an in-process agent."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.local_api import array_to_tensor
from edgefleet.agent.profiles import EnforcedLimits
from edgefleet.common.hardware import HardwareProfile
from edgefleet.v1 import inference_pb2, inference_pb2_grpc, operator_pb2_grpc

T = TypeVar("T")

# Generous bound for one step on a loaded 2-core machine: a process start, a deploy, a reconnect.
STEP_TIMEOUT_S = 60.0
ROOT = Path(__file__).resolve().parents[2]


def wait_for(condition: Callable[[], T], what: str, timeout_s: float = STEP_TIMEOUT_S, interval_s: float = 0.05) -> T:
    """Poll condition until it returns a true value and return it; raise AssertionError naming what on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


class Subprocess:
    """A Python module run as a child process in its own session, with its output in a log file."""

    def __init__(self, name: str, log_path: Path, module: str, args: list[str]) -> None:
        self.name = name
        self.log_path = log_path
        self.module = module
        self.args = args
        self.popen: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        with self.log_path.open("ab") as log_file:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """Send SIGKILL to this process and wait for it: a crash without any clean-up."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(STEP_TIMEOUT_S)

    def stop(self) -> int | None:
        """Send SIGTERM, wait, then SIGKILL; return the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class OrchestratorProcess(Subprocess):
    """edgefleet-orchestrator on 127.0.0.1 port 0 with its data under work_dir; restartable on the same data."""

    def __init__(self, work_dir: Path, *extra_args: str) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = work_dir / "orchestrator"
        self.port_file = work_dir / "orchestrator.port"
        super().__init__(
            "orchestrator",
            work_dir / "orchestrator.log",
            "edgefleet.orchestrator.main",
            [
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                str(self.data_dir),
                "--port-file",
                str(self.port_file),
                "--heartbeat-interval-s",
                "1",
                "--shutdown-grace-s",
                "1",
                "--insecure",
                *extra_args,
            ],
        )
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the process and wait until its health check reports SERVING."""
        self.port_file.unlink(missing_ok=True)
        self.spawn()
        wait_for(
            lambda: not self.running or (self.port_file.exists() and self.port_file.read_text().strip()),
            "the orchestrator's port file",
        )
        if not self.running:
            raise AssertionError(f"orchestrator exited at start:\n{self.log_tail()}")
        self.port = int(self.port_file.read_text())
        with grpc.insecure_channel(self.address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=STEP_TIMEOUT_S, wait_for_ready=True
            )
        assert response.status == health_pb2.HealthCheckResponse.SERVING

    def operator(self) -> tuple[grpc.Channel, operator_pb2_grpc.OperatorServiceStub]:
        channel = grpc.insecure_channel(self.address)
        return channel, operator_pb2_grpc.OperatorServiceStub(channel)


class AgentProcess(Subprocess):
    """edgefleet-agent with its state under work_dir/<name>, talking to address, with 1 s metric windows."""

    def __init__(self, work_dir: Path, name: str, address: str, *extra_args: str) -> None:
        self.state_dir = work_dir / name
        super().__init__(
            f"agent-{name}",
            work_dir / f"agent-{name}.log",
            "edgefleet.agent.main",
            [
                "--orchestrator",
                address,
                "--state-dir",
                str(self.state_dir),
                "--metrics-window-s",
                "1",
                "--max-backoff-s",
                "1",
                "--shutdown-grace-s",
                "3",
                "--labels",
                f"name={name}",
                "--insecure",
                *extra_args,
            ],
        )

    @property
    def socket_path(self) -> Path:
        return (self.state_dir / "agent.sock").absolute()

    def device_id(self) -> str:
        """Return the device id the agent stored, or '' before its first registration."""
        try:
            return str(json.loads((self.state_dir / "identity.json").read_text())["device_id"])
        except (OSError, ValueError, KeyError):
            return ""

    def start(self) -> None:
        self.spawn()


def installed_files_consistent(state_dir: Path, name: str) -> dict[str, Any]:
    """Return the agent's model files of name with their state; raise AssertionError for a partial file.

    Every file under models/<name>/ must hash to the digest in its name, and state.json must point at
    such a file.
    """
    model_dir = state_dir / "models" / "models" / name
    files = {}
    for path in sorted(model_dir.glob("*.*")):
        if path.name == "state.json":
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert path.stem == digest, f"{path} holds content with SHA-256 {digest}: a partial or corrupt file"
        files[path.name] = path.stat().st_size
    state = json.loads((model_dir / "state.json").read_text())
    assert state["current"] in files, f"state.json points at {state['current']}, which is not a complete file"
    return {"files": files, "current": state["current"]}


class InferenceClient:
    """Calls Infer on an agent's local socket, as an application on the device would, and counts successes."""

    def __init__(self, socket_path: Path, model_name: str, input_name: str = "x") -> None:
        self.socket_path = socket_path
        self.model_name = model_name
        self.input_name = input_name
        self.succeeded = 0
        self.failed = 0
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def infer_once(self, timeout_s: float = 10.0) -> inference_pb2.InferResponse:
        with grpc.insecure_channel(f"unix://{self.socket_path}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            tensor = array_to_tensor(self.input_name, np.ones((1, 4), dtype=np.float32))
            return stub.Infer(
                inference_pb2.InferRequest(model_name=self.model_name, inputs=[tensor]), timeout=timeout_s
            )

    def start(self, interval_s: float = 0.01) -> None:
        """Call Infer in a background thread until stop(); count the calls that returned a result."""

        def loop() -> None:
            with grpc.insecure_channel(f"unix://{self.socket_path}") as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                tensor = array_to_tensor(self.input_name, np.ones((1, 4), dtype=np.float32))
                request = inference_pb2.InferRequest(model_name=self.model_name, inputs=[tensor])
                while not self._stop.is_set():
                    try:
                        response = stub.Infer(request, timeout=10)
                    except grpc.RpcError:
                        self.failed += 1
                    else:
                        self.succeeded += 1
                        self.versions.add(response.model_version)
                    self._stop.wait(interval_s)

        self._thread = threading.Thread(target=loop, name="inference-client", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STEP_TIMEOUT_S)


class AgentRunner:
    """A real Agent on its own event loop in a thread, built with keyword arguments such as keepalive."""

    def __init__(self, config: AgentConfig, hardware: HardwareProfile, **agent_options: Any) -> None:
        limits = EnforcedLimits(cpus=(0,), threads=1, memory_budget_bytes=None)
        self.agent = Agent(config, hardware, limits, tuple(r.name for r in hardware.runtimes), **agent_options)
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

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(STEP_TIMEOUT_S)
