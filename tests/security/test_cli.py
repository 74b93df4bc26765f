"""The pki, tokens and enroll commands of the operator CLI."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgefleet.cli import tokens
from edgefleet.cli.main import main
from edgefleet.common.tls import device_id_from_file
from edgefleet.orchestrator.security import tokens as orchestrator_tokens
from tests.security.helpers import SecureOrchestrator
from tests.servers import STEP_TIMEOUT_S, OrchestratorThread, orchestrator_config

pytest_plugins = ["tests.servers", "tests.security.helpers"]

StartSecure = Callable[..., SecureOrchestrator]


def test_pki_init_and_issue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "pki"

    initialized = main(["pki", "init", "--dir", str(directory), "--host", "127.0.0.1"])
    issued = main(["pki", "issue", "--dir", str(directory), "--device-id", "cam-7"])
    again = main(["pki", "init", "--dir", str(directory)])

    assert initialized == 0
    assert issued == 0
    assert again == 4
    assert "already contains a CA" in capsys.readouterr().err
    assert stat.S_IMODE(os.stat(directory / "ca.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(directory / "devices" / "cam-7.key").st_mode) == 0o600
    assert device_id_from_file(directory / "devices" / "cam-7.pem") == "cam-7"


@pytest.mark.parametrize("placement", ["before", "after"])
def test_pki_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str], placement: str) -> None:
    directory = tmp_path / "pki"

    def run(*args: str) -> dict[str, object]:
        argv = ["-o", "json", "pki", *args] if placement == "before" else ["pki", *args, "-o", "json"]
        assert main(argv) == 0
        parsed: dict[str, object] = json.loads(capsys.readouterr().out)
        return parsed

    created = run("init", "--dir", str(directory), "--host", "fleet.example")
    issued = run("issue", "--dir", str(directory), "--device-id", "cam-7")

    assert created["ca_cert"] == str(directory / "ca.pem")
    assert created["server_key"] == str(directory / "server.key")
    assert created["hosts"] == ["fleet.example"]
    assert issued["device_id"] == "cam-7"
    assert issued["cert"] == str(directory / "devices" / "cam-7.pem")
    assert issued["key"] == str(directory / "devices" / "cam-7.key")
    assert device_id_from_file(Path(str(issued["cert"]))) == "cam-7"
    assert str(issued["not_after"]) < str(created["ca_not_after"])


def test_pki_issue_bad_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["pki", "init", "--dir", str(tmp_path)])

    code = main(["pki", "issue", "--dir", str(tmp_path), "--device-id", "../etc"])

    assert code == 2
    assert "--device-id" in capsys.readouterr().err


def test_pki_issue_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["pki", "init", "--dir", str(tmp_path)])
    main(["pki", "issue", "--dir", str(tmp_path), "--device-id", "cam-7"])
    key = (tmp_path / "devices" / "cam-7.key").read_bytes()
    capsys.readouterr()

    code = main(["pki", "issue", "--dir", str(tmp_path), "--device-id", "cam-7"])

    assert code == 4
    assert "cam-7.pem already exists" in capsys.readouterr().err
    assert (tmp_path / "devices" / "cam-7.key").read_bytes() == key


@pytest.mark.parametrize("verb", ["init", "issue"])
def test_pki_dir_is_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], verb: str) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("kept\n")
    argv = ["pki", verb, "--dir", str(blocker)] + (["--device-id", "cam-7"] if verb == "issue" else [])

    code = main(argv)

    error = capsys.readouterr().err
    assert code == 2
    assert f"cannot use {blocker}" in error
    assert "a file is in the way" in error
    assert "Traceback" not in error
    assert blocker.read_text() == "kept\n"


@pytest.mark.parametrize(
    "host", ["bad_host!", "[::1]", "a..b", "lead-.example", "fleet.example.com.", "*.internal", "orch.*.internal"]
)
def test_pki_init_bad_host(tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str) -> None:
    directory = tmp_path / "pki"

    code = main(["pki", "init", "--dir", str(directory), "--host", "127.0.0.1", "--host", host])

    assert code == 2
    assert f"invalid --host {host!r}: give an IP address" in capsys.readouterr().err
    assert not directory.exists()


def test_pki_init_host_forms(tmp_path: Path) -> None:
    hosts = ["orchestrator.plant-1.internal", "10.0.0.5", "::1", "localhost"]
    argv = ["pki", "init", "--dir", str(tmp_path / "pki")]
    for host in hosts:
        argv += ["--host", host]

    assert main(argv) == 0


def test_pki_init_wildcard_host_serves(tmp_path: Path) -> None:
    """A server certificate for *.fleet.internal lets an operator dial any name under it over TLS."""
    directory = tmp_path / "pki"
    assert main(["pki", "init", "--dir", str(directory), "--host", "*.fleet.internal"]) == 0
    config = orchestrator_config(
        tmp_path,
        insecure=False,
        ca_cert=directory / "ca.pem",
        cert=directory / "server.pem",
        key=directory / "server.key",
        operator_listen="127.0.0.1:0",
    )
    orchestrator = OrchestratorThread(config)
    try:
        assert orchestrator._running is not None
        credentials = grpc.ssl_channel_credentials((directory / "ca.pem").read_bytes())
        # The name the client checks the certificate against; the connection goes to 127.0.0.1.
        options = [("grpc.ssl_target_name_override", "orch-2.fleet.internal")]
        address = f"127.0.0.1:{orchestrator._running.operator_port}"
        with grpc.secure_channel(address, credentials, options=options) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            response = health.Check(health_pb2.HealthCheckRequest(), timeout=STEP_TIMEOUT_S)
    finally:
        orchestrator.stop()

    assert response.status == health_pb2.HealthCheckResponse.SERVING


def cli(orchestrator: SecureOrchestrator, *args: str, token: str | None = None) -> int:
    return main(
        [
            "--orchestrator",
            orchestrator.operator_address,
            "--ca-cert",
            str(orchestrator.pki.ca),
            "--token",
            orchestrator.admin_token if token is None else token,
            *args,
        ]
    )


def test_cli_tokens_and_enroll(start_secure: StartSecure, capsys: pytest.CaptureFixture[str]) -> None:
    orchestrator = start_secure()

    created = cli(orchestrator, "tokens", "create", "--role", "viewer", "--name", "dash")
    secret = capsys.readouterr().out.splitlines()[0]
    viewer_enroll = cli(orchestrator, "enroll", "create", "--device-id", "cam-1", token=secret)
    viewer_error = capsys.readouterr().err
    enrolled = cli(orchestrator, "enroll", "create", "--device-id", "cam-1", "--ttl", "30m")
    token = capsys.readouterr().out.splitlines()[0]

    assert created == 0
    assert secret.startswith("efa_")
    assert viewer_enroll == 2
    assert "needs the admin role" in viewer_error
    assert enrolled == 0
    assert token.startswith("efe_")


def test_cli_enroll_list_and_revoke(start_secure: StartSecure, capsys: pytest.CaptureFixture[str]) -> None:
    orchestrator = start_secure()
    cli(orchestrator, "enroll", "create", "--device-id", "cam-1")
    created = capsys.readouterr().out.splitlines()
    token_id = created[1].split()[1].rstrip(",")

    listed = cli(orchestrator, "enroll", "list", "--device-id", "cam-1")
    listing = capsys.readouterr().out
    revoked = cli(orchestrator, "enroll", "revoke", token_id)
    revoke_output = capsys.readouterr().out
    again = cli(orchestrator, "enroll", "revoke", token_id)
    again_error = capsys.readouterr().err
    malformed = cli(orchestrator, "enroll", "revoke", "not-an-id")
    malformed_error = capsys.readouterr().err

    assert created[1].startswith(f"(token {token_id}, single use, for device cam-1")
    assert listed == 0
    assert f"{token_id}  cam-1   unused" in listing
    assert revoked == 0
    assert revoke_output.strip() == f"revoked enrollment token {token_id} of device cam-1"
    assert again == 3
    assert f"enrollment token {token_id!r} not found" in again_error
    assert malformed == 2
    assert "'not-an-id' is not an enrollment token id (12 hex digits)" in malformed_error


def test_cli_enroll_create_json_matches_list(start_secure: StartSecure, capsys: pytest.CaptureFixture[str]) -> None:
    orchestrator = start_secure()

    cli(orchestrator, "enroll", "create", "--device-id", "cam-1", "-o", "json")
    created = json.loads(capsys.readouterr().out)
    cli(orchestrator, "enroll", "list", "-o", "json")
    listed = json.loads(capsys.readouterr().out)

    assert created["token"].startswith("efe_")
    assert {key: value for key, value in created.items() if key != "token"} == listed[0]
    assert created["state"] == "unused"
    assert created["created_at"] < created["expires_at"]


def test_cli_needs_token(start_secure: StartSecure, capsys: pytest.CaptureFixture[str]) -> None:
    orchestrator = start_secure()

    code = cli(orchestrator, "devices", "list", token="")

    assert code == 2
    assert "missing API token" in capsys.readouterr().err


def test_cli_needs_ca(start_secure: StartSecure, capsys: pytest.CaptureFixture[str]) -> None:
    orchestrator = start_secure()

    code = main(["--orchestrator", orchestrator.operator_address, "devices", "list"])

    assert code == 2
    assert "--ca-cert" in capsys.readouterr().err


@pytest.mark.parametrize("ttl", ["31d", "99999999d", "745h"])
def test_cli_enroll_ttl_too_long(start_secure: StartSecure, capsys: pytest.CaptureFixture[str], ttl: str) -> None:
    orchestrator = start_secure()

    with pytest.raises(SystemExit) as caught:
        cli(orchestrator, "enroll", "create", "--device-id", "cam-1", "--ttl", ttl)
    error = capsys.readouterr().err
    listed = cli(orchestrator, "enroll", "list", "-o", "json")

    assert caught.value.code == 2
    assert f"argument --ttl: invalid duration {ttl!r}: an enrollment token is valid for at most 30 days" in error
    assert "Traceback" not in error
    assert listed == 0
    assert capsys.readouterr().out.strip() == "[]"


def test_cli_enroll_ttl_longest(start_secure: StartSecure, capsys: pytest.CaptureFixture[str]) -> None:
    orchestrator = start_secure()

    enrolled = cli(orchestrator, "enroll", "create", "--device-id", "cam-1", "--ttl", "30d")

    assert enrolled == 0
    assert capsys.readouterr().out.startswith("efe_")


def test_enroll_ttl_limit_match() -> None:
    assert timedelta(days=tokens.MAX_ENROLLMENT_TTL_DAYS) == orchestrator_tokens.MAX_ENROLLMENT_TTL
