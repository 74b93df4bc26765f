"""Mutual TLS between agents and the orchestrator: which certificates and device ids get in."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from edgefleet.common.tls import channel_credentials
from tests.security.helpers import Pki, SecureOrchestrator, make_pki
from tests.servers import STEP_TIMEOUT_S, register_request

pytest_plugins = ["tests.servers", "tests.security.helpers"]

StartSecure = Callable[..., SecureOrchestrator]


def register_code(
    orchestrator: SecureOrchestrator, device_id: str, certificate_id: str = "", pki: Pki | None = None
) -> grpc.StatusCode:
    """Register device_id over a channel with certificate_id's certificate of pki; return the status code."""
    stub = orchestrator.agent(certificate_id, pki)
    request = register_request(device_id)
    request.enrollment_token = orchestrator.enrollment_token(device_id)
    try:
        stub.Register(request, timeout=STEP_TIMEOUT_S)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_mtls_enrolled_device_registers(start_secure: StartSecure) -> None:
    orchestrator = start_secure()

    assert register_code(orchestrator, "cam-1", "cam-1") == grpc.StatusCode.OK


def test_mtls_rejects_no_certificate(start_secure: StartSecure) -> None:
    orchestrator = start_secure()

    # The handshake fails, so the call never reaches the server.
    assert register_code(orchestrator, "cam-1") == grpc.StatusCode.UNAVAILABLE


def test_mtls_rejects_other_ca(start_secure: StartSecure, tmp_path: Path) -> None:
    orchestrator = start_secure()
    rogue = make_pki(tmp_path / "rogue")

    assert register_code(orchestrator, "cam-1", "cam-1", rogue) == grpc.StatusCode.UNAVAILABLE


def test_mtls_rejects_mismatched_id(start_secure: StartSecure) -> None:
    orchestrator = start_secure()
    stub = orchestrator.agent("cam-1")
    request = register_request("cam-2")
    request.enrollment_token = orchestrator.enrollment_token("cam-2")

    with pytest.raises(grpc.RpcError) as raised:
        stub.Register(request, timeout=STEP_TIMEOUT_S)

    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "issued to 'cam-1'" in (raised.value.details() or "")


def test_mtls_operator_port_refuses_agents(start_secure: StartSecure) -> None:
    orchestrator = start_secure()
    channel = grpc.secure_channel(
        orchestrator.operator_address, grpc.ssl_channel_credentials(orchestrator.pki.ca.read_bytes())
    )
    from edgefleet.v1 import agent_pb2_grpc

    with pytest.raises(grpc.RpcError) as raised:
        agent_pb2_grpc.AgentServiceStub(channel).Register(register_request("cam-1"), timeout=STEP_TIMEOUT_S)

    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_mtls_operator_port_names_agent_port(start_secure: StartSecure) -> None:
    """An agent with a device certificate that dials the operator port learns which port to dial.

    The operator port requests no client certificate, so the agent's certificate never arrives there.
    """
    orchestrator = start_secure()
    cert, key = orchestrator.pki.device("cam-1")
    credentials = channel_credentials(orchestrator.pki.ca, cert, key)
    request = register_request("cam-1")
    request.enrollment_token = orchestrator.enrollment_token("cam-1")
    from edgefleet.v1 import agent_pb2_grpc

    channel = grpc.secure_channel(orchestrator.operator_address, credentials)
    with channel, pytest.raises(grpc.RpcError) as raised:
        agent_pb2_grpc.AgentServiceStub(channel).Register(request, timeout=STEP_TIMEOUT_S)

    details = raised.value.details() or ""
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "operator port" in details
    assert "--listen" in details
    assert "EDGEFLEET_ORCHESTRATOR" in details


def test_mtls_missing_files_fail_start(tmp_path: Path) -> None:
    from edgefleet.common.tls import CredentialsError
    from tests.servers import OrchestratorThread, orchestrator_config

    config = orchestrator_config(tmp_path, insecure=False, operator_listen="")

    with pytest.raises(CredentialsError, match="--insecure"):
        OrchestratorThread(config)
