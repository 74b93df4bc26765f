"""A fleet CA, TLS orchestrators and TLS channels for the security tests.

Test modules load the fixtures with pytest_plugins after importing helpers from here, so pytest
cannot rewrite this module's asserts; PYTEST_DONT_REWRITE marks that and avoids its warning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from edgefleet.common.tls import channel_credentials, operator_channel
from edgefleet.orchestrator.security.pki import init_ca, issue_device_certificate
from edgefleet.v1 import agent_pb2_grpc, operator_pb2, operator_pb2_grpc
from tests.servers import STEP_TIMEOUT_S, OrchestratorThread, orchestrator_config


@dataclass(frozen=True)
class Pki:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    def device(self, device_id: str) -> tuple[Path, Path]:
        """Return the certificate and key of device_id, issuing them on first use."""
        cert = self.directory / "devices" / f"{device_id}.pem"
        if not cert.exists():
            issue_device_certificate(self.directory, device_id)
        return cert, cert.with_suffix(".key")


def make_pki(directory: Path) -> Pki:
    init_ca(directory, hosts=("127.0.0.1",))
    return Pki(directory)


@dataclass
class SecureOrchestrator:
    """A TLS orchestrator thread with its CA; agents call port (mutual TLS), operators operator_port."""

    server: OrchestratorThread
    pki: Pki

    @property
    def agent_address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def operator_address(self) -> str:
        assert self.server._running is not None
        return f"127.0.0.1:{self.server._running.operator_port}"

    @property
    def admin_token(self) -> str:
        return (self.server.config.data_dir / "admin.token").read_text().strip()

    def operator(self, token: str | None = None) -> operator_pb2_grpc.OperatorServiceStub:
        """Return an operator stub with token (the bootstrap admin token when None; "" for none)."""
        channel = operator_channel(
            self.operator_address, token=self.admin_token if token is None else token, ca_cert=self.pki.ca
        )
        return operator_pb2_grpc.OperatorServiceStub(channel)

    def agent_channel(self, device_id: str = "", pki: Pki | None = None) -> grpc.Channel:
        """Open a mutual TLS channel with device_id's certificate from pki (this CA by default); none without id."""
        if not device_id:
            return grpc.secure_channel(self.agent_address, channel_credentials(self.pki.ca))
        cert, key = (pki or self.pki).device(device_id)
        return grpc.secure_channel(self.agent_address, channel_credentials(self.pki.ca, cert, key))

    def agent(self, device_id: str = "", pki: Pki | None = None) -> agent_pb2_grpc.AgentServiceStub:
        return agent_pb2_grpc.AgentServiceStub(self.agent_channel(device_id, pki))

    def enrollment_token(self, device_id: str, ttl_seconds: int = 0) -> str:
        request = operator_pb2.CreateEnrollmentTokenRequest(device_id=device_id, ttl_seconds=ttl_seconds)
        return self.operator().CreateEnrollmentToken(request, timeout=STEP_TIMEOUT_S).token


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def start_secure(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., SecureOrchestrator]]:
    """Yield a factory of TLS orchestrators on the test's CA; stop them all afterwards."""
    started: list[OrchestratorThread] = []

    def start(db_url: str = "", **overrides: Any) -> SecureOrchestrator:
        config = orchestrator_config(
            tmp_path,
            db_url,
            insecure=False,
            ca_cert=pki.ca,
            cert=pki.directory / "server.pem",
            key=pki.directory / "server.key",
            operator_listen="127.0.0.1:0",
            **overrides,
        )
        server = OrchestratorThread(config)
        started.append(server)
        return SecureOrchestrator(server, pki)

    yield start
    for server in reversed(started):
        server.stop()
