"""Start-up checks of edgefleet-agent: state directory and TLS files, run as the real process."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.agent.config import AgentConfig, check_agent_config
from edgefleet.agent.main import check_tls_files
from edgefleet.cli.main import main as edgefleet_cli
from edgefleet.common.errors import EXIT_CONFIG
from edgefleet.common.tls import CredentialsError
from tests.readonly import on_read_only_mount, read_only_mounts_work

# Nothing listens on port 1 of loopback, and every check here runs before the first connection.
UNUSED_ADDRESS = "127.0.0.1:1"


def run_agent(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m edgefleet.agent.main ARGS` to completion and return it with text output."""
    return subprocess.run(
        [sys.executable, "-m", "edgefleet.agent.main", "--orchestrator", UNUSED_ADDRESS, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_state_dir_is_file(tmp_path: Path) -> None:
    state_file = tmp_path / "state"
    state_file.write_text("")

    result = run_agent("--insecure", "--profile", "camera", "--state-dir", str(state_file))

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"the state directory {state_file} exists but is not a directory" in result.stderr
    assert "--state-dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_state_dir_below_file(tmp_path: Path) -> None:
    """A state directory below a regular file cannot be created, even by root."""
    (tmp_path / "file").write_text("")
    state_dir = tmp_path / "file" / "state"

    result = run_agent("--insecure", "--state-dir", str(state_dir))

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"the state directory {state_dir} cannot be created: one of its parents is a file" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(bool(read_only_mounts_work()), reason=read_only_mounts_work() or "runs")
def test_state_dir_read_only(tmp_path: Path) -> None:
    """A state directory on a read-only file system, which root cannot write either."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    command = [sys.executable, "-m", "edgefleet.agent.main", "--orchestrator", UNUSED_ADDRESS]
    command += ["--insecure", "--state-dir", str(state_dir)]

    result = subprocess.run(
        on_read_only_mount(state_dir, command), capture_output=True, text=True, timeout=120, check=False
    )

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"the state directory {state_dir} is not writable by uid" in result.stderr
    assert "Read-only file system" in result.stderr
    assert "Traceback" not in result.stderr


def test_lock_file_unusable(tmp_path: Path) -> None:
    """A lock path that cannot be opened for writing (here a directory) stops the agent with its path."""
    (tmp_path / "agent.lock").mkdir()

    result = run_agent("--insecure", "--state-dir", str(tmp_path))

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"cannot open the lock file {tmp_path / 'agent.lock'}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Create a fleet CA and the device certificates cam-1 and cam-2 with `edgefleet pki`."""
    folder = tmp_path_factory.mktemp("pki")
    assert edgefleet_cli(["pki", "init", "--dir", str(folder), "--host", "127.0.0.1"]) == 0
    for device_id in ("cam-1", "cam-2"):
        assert edgefleet_cli(["pki", "issue", "--dir", str(folder), "--device-id", device_id]) == 0
    return folder


def tls_flags(pki: Path, cert: Path, key: Path) -> list[str]:
    return ["--ca-cert", str(pki / "ca.pem"), "--cert", str(cert), "--key", str(key)]


def test_key_of_other_certificate(pki: Path, tmp_path: Path) -> None:
    cert = pki / "devices" / "cam-1.pem"
    key = pki / "devices" / "cam-2.key"

    result = run_agent("--state-dir", str(tmp_path), *tls_flags(pki, cert, key))

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"private key {key} (--key) does not match certificate {cert} (--cert)" in result.stderr
    assert "Traceback" not in result.stderr


def test_key_mismatch_leaves_state_dir(pki: Path, tmp_path: Path) -> None:
    """The TLS check runs before the state directory is created, so a failed start leaves nothing behind."""
    state_dir = tmp_path / "state"

    run_agent("--state-dir", str(state_dir), *tls_flags(pki, pki / "devices" / "cam-1.pem", pki / "server.key"))

    assert not state_dir.exists()


def test_key_invalid(pki: Path, tmp_path: Path) -> None:
    key = tmp_path / "broken.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")

    result = run_agent("--state-dir", str(tmp_path), *tls_flags(pki, pki / "devices" / "cam-1.pem", key))

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"private key {key} (--key) is not a valid PEM private key" in result.stderr


def test_cert_invalid(pki: Path, tmp_path: Path) -> None:
    cert = tmp_path / "broken.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")

    result = run_agent("--state-dir", str(tmp_path), *tls_flags(pki, cert, pki / "devices" / "cam-1.key"))

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"certificate {cert} (--cert) is not a valid PEM certificate" in result.stderr


def test_ca_cert_invalid(pki: Path, tmp_path: Path) -> None:
    ca_cert = tmp_path / "ca.pem"
    ca_cert.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    flags = ["--ca-cert", str(ca_cert), "--cert", str(pki / "devices" / "cam-1.pem")]

    result = run_agent("--state-dir", str(tmp_path), *flags, "--key", str(pki / "devices" / "cam-1.key"))

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"CA certificate {ca_cert} (--ca-cert) is not a valid PEM certificate" in result.stderr


def test_key_encrypted(pki: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    plain = serialization.load_pem_private_key((pki / "devices" / "cam-1.key").read_bytes(), password=None)
    key = tmp_path / "encrypted.key"
    key.write_bytes(
        plain.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    config = AgentConfig(ca_cert=pki / "ca.pem", cert=pki / "devices" / "cam-1.pem", key=key)

    with pytest.raises(CredentialsError, match="is encrypted"):
        check_tls_files(config)


def test_matching_pair_passes(pki: Path) -> None:
    config = AgentConfig(ca_cert=pki / "ca.pem", cert=pki / "devices" / "cam-1.pem", key=pki / "devices" / "cam-1.key")

    check_tls_files(config)


@pytest.mark.parametrize(
    ("flags", "missing"),
    [((), "--cert and --key"), (("--cert",), "--key"), (("--key",), "--cert")],
)
def test_device_certificate_missing(pki: Path, tmp_path: Path, flags: tuple[str, ...], missing: str) -> None:
    """An agent with only the CA would fail every mutual-TLS handshake and retry for ever."""
    files = {"--cert": pki / "devices" / "cam-1.pem", "--key": pki / "devices" / "cam-1.key"}
    args = ["--ca-cert", str(pki / "ca.pem")]
    for flag in flags:
        args += [flag, str(files[flag])]

    result = run_agent("--state-dir", str(tmp_path / "state"), *args)

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"missing device certificate: set {missing}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("mode", "warned"), [(0o600, False), (0o640, False), (0o644, True), (0o602, True)])
def test_key_readable_by_others_warns(
    pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, warned: bool
) -> None:
    key = tmp_path / "cam-1.key"
    shutil.copyfile(pki / "devices" / "cam-1.key", key)
    key.chmod(mode)
    config = AgentConfig(ca_cert=pki / "ca.pem", cert=pki / "devices" / "cam-1.pem", key=key)

    with caplog.at_level(logging.WARNING):
        check_tls_files(config)

    assert (f"private key {key} (--key) has mode {mode:04o}" in caplog.text) is warned
    assert (f"chmod o-rwx {key}" in caplog.text) is warned


def test_insecure_skips_tls_check(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    config = AgentConfig(insecure=True, cert=missing, key=missing)

    check_tls_files(config)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:99999", "port 99999 is out of range; give the orchestrator's agent port"),
        ("127.0.0.1:0", "port 0 is out of range"),
        ("127.0.0.1", "expected HOST:PORT"),
        (":50051", "expected HOST:PORT"),
        ("127.0.0.1:5005x", "expected HOST:PORT"),
        ("::1:50051", "put an IPv6 address in brackets"),
    ],
)
def test_orchestrator_address_invalid(tmp_path: Path, address: str, expected: str) -> None:
    result = run_agent("--insecure", "--state-dir", str(tmp_path / "state"), "--orchestrator", address)

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"edgefleet-agent: invalid --orchestrator {address!r}: {expected}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("flag", "value", "allowed"),
    [
        ("--max-backoff-s", "nan", "greater than 0 seconds"),
        ("--max-backoff-s", "-3", "greater than 0 seconds"),
        ("--shutdown-grace-s", "nan", "at least 0 seconds"),
        ("--shutdown-grace-s", "inf", "at least 0 seconds"),
        ("--keepalive-time-s", "nan", "from 0.001 to 2147483 seconds"),
        ("--keepalive-timeout-s", "0", "from 0.001 to 2147483 seconds"),
        ("--metrics-buffer-max-bytes", "0", "at least 1 bytes"),
        ("--metrics-buffer-max-batches", "-1", "at least 1 batches"),
        ("--metrics-window-s", "-5", "from 1 to 3600 seconds"),
        ("--metrics-window-s", "0", "from 1 to 3600 seconds"),
        ("--metrics-window-s", "86400", "from 1 to 3600 seconds"),
    ],
)
def test_numeric_setting_invalid(tmp_path: Path, flag: str, value: str, allowed: str) -> None:
    result = run_agent("--insecure", "--state-dir", str(tmp_path / "state"), flag, value)

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"edgefleet-agent: invalid {flag} {value}: must be {allowed}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists()


def test_orchestrator_host_name_accepted() -> None:
    check_agent_config(AgentConfig(orchestrator="orchestrator.example.internal:50051"))
    check_agent_config(AgentConfig(orchestrator="[::1]:50051"))


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ("ké=v", "label key 'ké': keys must be 1-63 characters of a-z"),
        ("bad key=v", "label key 'bad key'"),
        ("site=" + "x" * 129, "label 'site': the value is 129 characters long; at most 128 are allowed"),
    ],
)
def test_labels_invalid(tmp_path: Path, labels: str, expected: str) -> None:
    result = run_agent("--insecure", "--state-dir", str(tmp_path / "state"), "--labels", labels)

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"edgefleet-agent: invalid --labels: {expected}" in result.stderr
    assert "the orchestrator would reject the device" in result.stderr
    assert not (tmp_path / "state").exists()


def test_profile_labels_invalid(tmp_path: Path) -> None:
    profile = tmp_path / "gateway.toml"
    profile.write_text('name = "gateway"\n[labels]\n"Zone A" = "north"\n')

    result = run_agent("--insecure", "--state-dir", str(tmp_path / "state"), "--profile", str(profile))

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"{profile}: invalid [labels]: label key 'Zone A'" in result.stderr
    assert "Traceback" not in result.stderr


def test_profile_and_flag_labels_too_many(tmp_path: Path) -> None:
    """Labels that pass alone but exceed the orchestrator's limit together stop the start."""
    profile = tmp_path / "gateway.toml"
    profile_labels = "".join(f'"p{index}" = "v"\n' for index in range(20))
    profile.write_text(f'name = "gateway"\n[labels]\n{profile_labels}')
    flag_labels = ",".join(f"f{index}=v" for index in range(12))

    result = run_agent(
        "--insecure", "--state-dir", str(tmp_path / "state"), "--profile", str(profile), "--labels", flag_labels
    )

    # 20 from the profile, 12 from --labels and profile=gateway.
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "33 labels; at most 32 are allowed" in result.stderr
    assert "the label profile=gateway that the agent adds" in result.stderr
    assert "the orchestrator would reject the device" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists()


def test_command_line_typo(tmp_path: Path) -> None:
    result = run_agent("--insecure", "--state-dir", str(tmp_path / "state"), "--orchestator", "127.0.0.1:50051")

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert result.stderr.strip().splitlines() == [
        "edgefleet-agent: invalid command line: unrecognized arguments: --orchestator 127.0.0.1:50051 "
        "(--orchestator: did you mean --orchestrator?); `edgefleet-agent --help` lists the flags"
    ]
    assert not (tmp_path / "state").exists()
