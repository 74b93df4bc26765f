"""TLS setting errors of the operator CLI against a real TLS orchestrator whose certificate names 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from edgefleet.cli.main import EXIT_USAGE, main, split_host_port
from tests.security.helpers import SecureOrchestrator, make_pki

pytest_plugins = ["tests.servers", "tests.security.helpers"]

StartSecure = Callable[..., SecureOrchestrator]
Capture = pytest.CaptureFixture[str]


def devices_list(address: str, ca_cert: Path, token: str) -> int:
    return main(["--orchestrator", address, "--ca-cert", str(ca_cert), "--token", token, "devices", "list"])


def test_tls_host_mismatch(start_secure: StartSecure, capsys: Capture) -> None:
    orchestrator = start_secure()
    _, port = split_host_port(orchestrator.operator_address)

    code = devices_list(f"localhost:{port}", orchestrator.pki.ca, orchestrator.admin_token)

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "certificate does not name localhost" in error
    assert "it names 127.0.0.1" in error
    assert f"such as 127.0.0.1:{port}" in error
    assert "edgefleet pki init --dir NEW_DIR --host localhost" in error
    assert "is it running" not in error


def test_tls_unknown_ca(start_secure: StartSecure, tmp_path: Path, capsys: Capture) -> None:
    orchestrator = start_secure()
    other = make_pki(tmp_path / "other-ca")

    code = devices_list(orchestrator.operator_address, other.ca, orchestrator.admin_token)

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "did not verify" in error
    assert "--ca-cert" in error
    assert "is it running" not in error


def test_tls_agents_port(start_secure: StartSecure, capsys: Capture) -> None:
    """The agents' port closes the handshake of a client without a certificate; the error names the fix."""
    orchestrator = start_secure()

    code = main(
        [
            "--orchestrator",
            orchestrator.agent_address,
            "--ca-cert",
            str(orchestrator.pki.ca),
            "--token",
            orchestrator.admin_token,
            "--timeout",
            "5",
            "devices",
            "list",
        ]
    )

    error = capsys.readouterr().err
    assert code == 69
    assert "use the operator port (--operator-listen, 50052 by default)" in error


def test_tls_matching_host(start_secure: StartSecure, capsys: Capture) -> None:
    orchestrator = start_secure()

    code = devices_list(orchestrator.operator_address, orchestrator.pki.ca, orchestrator.admin_token)

    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("localhost:50052", ("localhost", 50052)),
        ("[::1]:50052", ("::1", 50052)),
        ("[::1]", ("::1", None)),
        ("orchestrator", ("orchestrator", None)),
        ("host:port", ("host", None)),
    ],
)
def test_split_host_port(address: str, expected: tuple[str, int | None]) -> None:
    assert split_host_port(address) == expected
