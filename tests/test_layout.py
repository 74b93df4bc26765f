"""Package layout rules: the agent's import closure, generated code, health and reflection of the orchestrator."""

from __future__ import annotations

import json
import pkgutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import edgefleet.agent
from tests.servers import OrchestratorThread

pytest_plugins = ["tests.servers"]

REPO_ROOT = Path(__file__).resolve().parents[1]
# Modules named by the rule that the agent never imports torch, SQLAlchemy or the orchestrator.
AGENT_ENTRY_MODULES = (
    "edgefleet.agent.main",
    "edgefleet.agent.agent",
    "edgefleet.agent.probe",
    "edgefleet.agent.runtime.onnx",
    "edgefleet.agent.runtime.litert",
    "edgefleet.agent.runtime.host",
    "edgefleet.agent.delivery",
)
FORBIDDEN_PREFIXES = ("torch", "sqlalchemy", "edgefleet.orchestrator")
EDGEFLEET_SERVICES = {"edgefleet.v1.AgentService", "edgefleet.v1.OperatorService"}


def imported_modules(modules: list[str]) -> list[str]:
    """Import modules in a fresh interpreter and return every module name it then has loaded."""
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded: list[str] = json.loads(result.stdout)
    return loaded


def forbidden(loaded: list[str]) -> list[str]:
    return [m for m in loaded if any(m == p or m.startswith(p + ".") for p in FORBIDDEN_PREFIXES)]


def test_agent_entry_imports() -> None:
    loaded = imported_modules(list(AGENT_ENTRY_MODULES))

    assert forbidden(loaded) == []
    assert "onnxruntime" in loaded


def test_agent_package_imports() -> None:
    every_module = [m.name for m in pkgutil.walk_packages(edgefleet.agent.__path__, "edgefleet.agent.")]

    loaded = imported_modules(every_module)

    assert len(every_module) >= len(AGENT_ENTRY_MODULES)
    assert forbidden(loaded) == []


def test_generated_code_current() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_health_serving(start_orchestrator: Callable[..., OrchestratorThread]) -> None:
    orchestrator = start_orchestrator()
    stub = health_pb2_grpc.HealthStub(orchestrator.channel)

    statuses = {
        service: stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status
        for service in ("", *sorted(EDGEFLEET_SERVICES))
    }

    assert statuses == dict.fromkeys(statuses, health_pb2.HealthCheckResponse.SERVING)


def test_health_unknown_service(start_orchestrator: Callable[..., OrchestratorThread]) -> None:
    orchestrator = start_orchestrator()
    stub = health_pb2_grpc.HealthStub(orchestrator.channel)

    try:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
    except grpc.RpcError as error:
        code = error.code()
    else:
        code = grpc.StatusCode.OK

    assert code == grpc.StatusCode.NOT_FOUND


def test_health_cli_unknown_service(
    start_orchestrator: Callable[..., OrchestratorThread], capsys: pytest.CaptureFixture[str]
) -> None:
    from edgefleet.cli.main import main as edgefleet_cli

    orchestrator = start_orchestrator()

    exit_code = edgefleet_cli(["--insecure", "--orchestrator", orchestrator.address, "health", "--service", "nope"])

    assert exit_code == 3
    assert "has no service 'nope'; use edgefleet.v1.OperatorService" in capsys.readouterr().err


def test_reflection_services(start_orchestrator: Callable[..., OrchestratorThread]) -> None:
    orchestrator = start_orchestrator()
    stub = reflection_pb2_grpc.ServerReflectionStub(orchestrator.channel)

    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = list(stub.ServerReflectionInfo(iter([request]), timeout=30))
    services = {s.name for s in responses[0].list_services_response.service}
    file_request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="edgefleet.v1.OperatorService")
    files = list(stub.ServerReflectionInfo(iter([file_request]), timeout=30))

    assert services >= EDGEFLEET_SERVICES
    assert "grpc.health.v1.Health" in services
    assert len(files[0].file_descriptor_response.file_descriptor_proto) >= 1


def test_listen_port_in_use(start_orchestrator: Callable[..., OrchestratorThread]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"

        with pytest.raises(OSError, match="the address is already in use") as caught:
            start_orchestrator(listen=address)

    assert address in str(caught.value)
