"""systemd integration: the shipped units pass systemd-analyze, and both daemons speak sd_notify."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.common.systemd import Notifier

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_passes_systemd_analyze(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # verify checks that ExecStart exists, so point it at this checkout's installed commands.
    bin_dir = Path(sys.executable).parent
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/edgefleet/bin", str(bin_dir)))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "edgefleet" not in result.stderr, result.stderr


def test_units_name_existing_commands() -> None:
    for unit in UNITS:
        exec_start = next(line for line in unit.read_text().splitlines() if line.startswith("ExecStart="))
        command = Path(exec_start.split("=", 1)[1].split()[0]).name
        assert (Path(sys.executable).parent / command).exists(), f"{unit.name} runs {command}, which is not installed"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(0.2)
    yield server, path
    server.close()


def receive_until(server: socket.socket, wanted: str, timeout_s: float) -> list[str]:
    """Collect notify datagrams until one contains the wanted line; fail after timeout_s."""
    messages: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            messages.append(server.recv(4096).decode())
        except TimeoutError:
            continue
        if any(wanted in line.split("\n") for line in messages):
            return messages
    raise AssertionError(f"no {wanted} within {timeout_s} s; got {messages}")


def test_notifier_without_socket_is_silent() -> None:
    notifier = Notifier(environ={})
    assert notifier.ready("x") is False
    assert notifier.watchdog_interval_s is None


def test_notifier_watchdog_interval_is_half_the_timeout() -> None:
    notifier = Notifier(environ={"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "4000000"})
    assert notifier.watchdog_interval_s == 2.0


def test_notifier_ignores_watchdog_of_another_pid() -> None:
    notifier = Notifier(environ={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"})
    assert notifier.watchdog_interval_s is None


def spawn(args: list[str], notify_path: str, tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "1000000", "PYTHONUNBUFFERED": "1"}
    with (tmp_path / f"{name}.log").open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=log, stderr=subprocess.STDOUT)


def test_daemons_send_ready_watchdog_and_stopping(notify_socket: tuple[socket.socket, str], tmp_path: Path) -> None:
    server, path = notify_socket
    port_file = tmp_path / "port"
    orchestrator = spawn(
        [
            "edgefleet.orchestrator.main",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path / "orch"),
            "--port-file",
            str(port_file),
            "--insecure",
        ],
        path,
        tmp_path,
        "orchestrator",
    )
    agent = None
    try:
        messages = receive_until(server, "READY=1", 30)
        assert any("STATUS=serving on port" in m for m in messages)
        receive_until(server, "WATCHDOG=1", 5)

        agent = spawn(
            [
                "edgefleet.agent.main",
                "--orchestrator",
                f"127.0.0.1:{port_file.read_text().strip()}",
                "--profile",
                "plc",
                "--state-dir",
                str(tmp_path / "agent"),
                "--insecure",
            ],
            path,
            tmp_path,
            "agent",
        )
        messages = receive_until(server, "READY=1", 60)
        ready = next(m for m in messages if "READY=1" in m.split("\n"))
        assert "STATUS=connected to 127.0.0.1:" in ready
        receive_until(server, "WATCHDOG=1", 5)

        agent.send_signal(signal.SIGTERM)
        receive_until(server, "STOPPING=1", 20)
        assert agent.wait(20) == 0
        orchestrator.send_signal(signal.SIGTERM)
        receive_until(server, "STOPPING=1", 20)
        assert orchestrator.wait(20) == 0
    finally:
        for process in (agent, orchestrator):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def test_daemons_stop_gracefully_on_sighup(notify_socket: tuple[socket.socket, str], tmp_path: Path) -> None:
    """SIGHUP, from a closed terminal or `systemctl kill -s HUP`, stops both daemons as SIGTERM does."""
    server, path = notify_socket
    port_file = tmp_path / "port"
    orchestrator_args = ["edgefleet.orchestrator.main", "--listen", "127.0.0.1:0", "--insecure"]
    orchestrator_args += ["--data-dir", str(tmp_path / "orch"), "--port-file", str(port_file)]
    orchestrator = spawn(orchestrator_args, path, tmp_path, "orchestrator")
    agent = None
    try:
        receive_until(server, "READY=1", 30)
        agent_args = ["edgefleet.agent.main", "--orchestrator", f"127.0.0.1:{port_file.read_text().strip()}"]
        agent_args += ["--profile", "plc", "--state-dir", str(tmp_path / "agent"), "--insecure"]
        agent = spawn(agent_args, path, tmp_path, "agent")
        receive_until(server, "READY=1", 60)

        agent.send_signal(signal.SIGHUP)
        receive_until(server, "STOPPING=1", 20)
        agent_status = agent.wait(20)
        orchestrator.send_signal(signal.SIGHUP)
        receive_until(server, "STOPPING=1", 20)
        orchestrator_status = orchestrator.wait(20)
    finally:
        for process in (agent, orchestrator):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()

    agent_log = (tmp_path / "agent.log").read_text()
    orchestrator_log = (tmp_path / "orchestrator.log").read_text()
    assert agent_status == 0, agent_log
    assert "received SIGHUP; agent stops" in agent_log
    assert "agent stopped" in agent_log
    assert orchestrator_status == 0, orchestrator_log
    assert "received SIGHUP; orchestrator stops" in orchestrator_log
