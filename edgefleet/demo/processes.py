"""Start an orchestrator and agents as local subprocesses, for the demo and the end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgefleet.common.tls import operator_channel
from edgefleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc


class FleetStartError(RuntimeError):
    """A process of the local fleet did not start; the message names its log file."""


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout_s: float = 10.0) -> int:
        """Send SIGTERM, wait up to timeout_s, then SIGKILL; return the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class LocalFleet:
    """An orchestrator on an embedded SQLite file and any number of agents, all on loopback.

    With secure (the default) it creates a fleet CA in WORK_DIR/pki, serves agents over mutual TLS,
    gives each agent a certificate and an enrollment token, and makes operator calls over TLS with
    the orchestrator's bootstrap admin token. Without it every process runs with --insecure.
    """

    work_dir: Path
    heartbeat_interval_s: float = 2.0
    metrics_window_s: float = 2.0
    secure: bool = True
    orchestrator: Process | None = None
    port: int = 0
    operator_port: int = 0
    admin_token: str = ""
    agents: dict[str, Process] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """The agents' address (mutual TLS when secure)."""
        return f"127.0.0.1:{self.port}"

    @property
    def operator_address(self) -> str:
        """The operators' address: server-only TLS when secure, else the one plaintext port."""
        return f"127.0.0.1:{self.operator_port or self.port}"

    @property
    def pki_dir(self) -> Path:
        return self.work_dir / "pki"

    def operator_channel(self) -> grpc.Channel:
        """Open a channel for OperatorService calls with the admin token; close it after use."""
        return operator_channel(
            self.operator_address,
            token=self.admin_token,
            ca_cert=self.pki_dir / "ca.pem",
            insecure=not self.secure,
        )

    def _security_args(self) -> list[str]:
        if not self.secure:
            return ["--insecure"]
        from edgefleet.orchestrator.security.pki import init_ca

        if not (self.pki_dir / "ca.pem").exists():
            init_ca(self.pki_dir, hosts=("127.0.0.1",))
        return [
            "--ca-cert",
            str(self.pki_dir / "ca.pem"),
            "--cert",
            str(self.pki_dir / "server.pem"),
            "--key",
            str(self.pki_dir / "server.key"),
            "--operator-listen",
            "127.0.0.1:0",
            "--operator-port-file",
            str(self.work_dir / "operator.port"),
        ]

    def _spawn(self, name: str, args: list[str]) -> Process:
        log_path = self.work_dir / f"{name}.log"
        log_file = log_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        popen = subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log_file.close()
        return Process(name=name, popen=popen, log_path=log_path)

    def start_orchestrator(self, timeout_s: float = 30.0, extra_args: tuple[str, ...] = ()) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        port_file = self.work_dir / "orchestrator.port"
        port_file.unlink(missing_ok=True)
        (self.work_dir / "operator.port").unlink(missing_ok=True)
        security_args = self._security_args()
        self.orchestrator = self._spawn(
            "orchestrator",
            [
                "edgefleet.orchestrator.main",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                str(self.work_dir / "orchestrator"),
                "--port-file",
                str(port_file),
                "--heartbeat-interval-s",
                str(self.heartbeat_interval_s),
                "--stale-after-s",
                str(self.heartbeat_interval_s * 3),
                # The orchestrator requires offline >= stale; 120 s is its default.
                "--offline-after-s",
                str(max(120.0, self.heartbeat_interval_s * 12)),
                *security_args,
                *extra_args,
            ],
        )
        deadline = time.monotonic() + timeout_s
        while not port_file.exists() or not port_file.read_text().strip():
            if self.orchestrator.popen.poll() is not None or time.monotonic() > deadline:
                raise FleetStartError(
                    f"orchestrator did not start; see {self.orchestrator.log_path}:\n{self.orchestrator.log_tail()}"
                )
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        if self.secure:
            self._read_operator_access(deadline)
        with self.operator_channel() as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            raise FleetStartError(f"orchestrator health is {response.status}, not SERVING")

    def _read_operator_access(self, deadline: float) -> None:
        """Read the operator port and the bootstrap admin token that a secure orchestrator wrote at start."""
        assert self.orchestrator is not None
        # The operator port is written after the agent port, in the same start-up step.
        operator_port_file = self.work_dir / "operator.port"
        while not operator_port_file.exists() or not operator_port_file.read_text().strip():
            if time.monotonic() > deadline:
                raise FleetStartError(f"orchestrator wrote no operator port; see {self.orchestrator.log_path}")
            time.sleep(0.05)
        self.operator_port = int(operator_port_file.read_text())
        token_file = self.work_dir / "orchestrator" / "admin.token"
        if token_file.exists():
            self.admin_token = token_file.read_text().strip()

    def enroll(self, device_id: str) -> list[str]:
        """Issue a device certificate for device_id (once) and a fresh enrollment token; return the agent flags."""
        if not self.secure:
            return ["--insecure"]
        from edgefleet.orchestrator.security.pki import issue_device_certificate

        devices = self.pki_dir / "devices"
        if not (devices / f"{device_id}.pem").exists():
            issue_device_certificate(self.pki_dir, device_id)
        with self.operator_channel() as channel:
            token = (
                operator_pb2_grpc.OperatorServiceStub(channel)
                .CreateEnrollmentToken(operator_pb2.CreateEnrollmentTokenRequest(device_id=device_id), timeout=10)
                .token
            )
        return [
            "--ca-cert",
            str(self.pki_dir / "ca.pem"),
            "--cert",
            str(devices / f"{device_id}.pem"),
            "--key",
            str(devices / f"{device_id}.key"),
            "--enrollment-token",
            token,
        ]

    def start_agent(self, name: str, profile: str, *extra_args: str) -> Process:
        """Start an agent; when secure its device id is name, bound in its certificate."""
        state_dir = self.work_dir / "agents" / name
        security_args = self.enroll(name)
        agent = self._spawn(
            f"agent-{name}",
            [
                "edgefleet.agent.main",
                "--orchestrator",
                self.address,
                "--profile",
                profile,
                "--state-dir",
                str(state_dir),
                "--metrics-window-s",
                str(self.metrics_window_s),
                "--labels",
                f"fleet=demo,name={name}",
                *security_args,
                *extra_args,
            ],
        )
        self.agents[name] = agent
        return agent

    def socket_of(self, name: str) -> Path:
        return (self.work_dir / "agents" / name / "agent.sock").absolute()

    def wait_for_devices(self, count: int, timeout_s: float = 60.0) -> list[operator_pb2.Device]:
        """Wait until count devices are online; return them sorted by id."""
        deadline = time.monotonic() + timeout_s
        with self.operator_channel() as channel:
            stub = operator_pb2_grpc.OperatorServiceStub(channel)
            while True:
                response = stub.ListDevices(
                    operator_pb2.ListDevicesRequest(status=common_pb2.DEVICE_STATUS_ONLINE), timeout=10
                )
                devices = list(response.devices)
                if len(devices) >= count:
                    return sorted(devices, key=lambda d: d.device_id)
                for agent in self.agents.values():
                    if agent.popen.poll() is not None:
                        raise FleetStartError(f"{agent.name} exited with {agent.popen.returncode}:\n{agent.log_tail()}")
                if time.monotonic() > deadline:
                    raise FleetStartError(f"only {len(devices)} of {count} devices came online in {timeout_s:g} s")
                time.sleep(0.2)

    def stop(self) -> dict[str, int]:
        """Stop the agents, then the orchestrator; return each process's exit code."""
        codes = {name: agent.stop() for name, agent in self.agents.items()}
        if self.orchestrator is not None:
            codes["orchestrator"] = self.orchestrator.stop()
        return codes
