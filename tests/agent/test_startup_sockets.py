"""Start-up checks of the agent's local API socket and tensor socket, mostly run as the real edgefleet-agent process.

Each path that cannot be bound must stop the agent with exit code 78, which the systemd unit does not
restart, and one "cannot start" line naming the flag, the path and the fix.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.profiles import EnforcedLimits
from edgefleet.common.errors import EXIT_CONFIG
from edgefleet.common.files import SocketPathError
from tests.servers import STEP_TIMEOUT_S, agent_hardware

# Nothing listens on port 1 of loopback. The agent binds its sockets before it connects, and keeps
# serving them while it retries the connection.
UNUSED_ADDRESS = "127.0.0.1:1"

AGENT = [sys.executable, "-m", "edgefleet.agent.main", "--insecure", "--orchestrator", UNUSED_ADDRESS]


def run_agent(state_dir: Path, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run the agent with ARGS until it exits and return it with text output."""
    command = [*prefix, *AGENT, "--state-dir", str(state_dir), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def cannot_start_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "cannot start:" in line]
    assert len(lines) == 1, stderr
    return lines[0]


def without_file_capabilities() -> tuple[str, ...]:
    """Return a command prefix that runs a command without the capabilities that let root write anywhere."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("root writes to any directory, and setpriv is not installed to drop the capabilities")
    return ("setpriv", "--bounding-set=-all", "--inh-caps=-all")


def is_served(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


@pytest.fixture
def running_agent(tmp_path: Path) -> Iterator[Path]:
    """Start an agent process in tmp_path/first and yield its state directory once both sockets accept."""
    state_dir = tmp_path / "first"
    process = subprocess.Popen(
        [*AGENT, "--state-dir", str(state_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        sockets = (state_dir / "agent.sock", state_dir / "agent.tensor.sock")
        while not all(is_served(path) for path in sockets):
            if process.poll() is not None:
                pytest.fail(f"the first agent exited with {process.returncode}: {process.communicate()[1]}")
            if time.monotonic() > deadline:
                pytest.fail("the first agent's sockets did not accept within the step timeout")
            time.sleep(0.1)
        yield state_dir
    finally:
        process.terminate()
        process.communicate(timeout=30)


@pytest.mark.parametrize("flag", ["--socket", "--tensor-socket"])
def test_socket_path_is_file(tmp_path: Path, flag: str) -> None:
    path = tmp_path / "notes.sock"
    path.write_text("keep")

    result = run_agent(tmp_path / "state", flag, str(path))

    assert result.returncode == EXIT_CONFIG, result.stderr
    line = cannot_start_line(result.stderr)
    assert f"path {path} exists and is not a socket" in line
    assert f"remove the file or set {flag} to another path" in line
    assert "Traceback" not in result.stderr
    assert path.read_text() == "keep"


@pytest.mark.parametrize("flag", ["--socket", "--tensor-socket"])
def test_socket_path_is_directory(tmp_path: Path, flag: str) -> None:
    path = tmp_path / "sockets"
    path.mkdir()

    result = run_agent(tmp_path / "state", flag, str(path))

    assert result.returncode == EXIT_CONFIG, result.stderr
    line = cannot_start_line(result.stderr)
    assert f"path {path} exists and is not a socket but a directory" in line
    assert f"set {flag} to the path of the socket file" in line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("flag", "name"), [("--socket", "agent.sock"), ("--tensor-socket", "agent.tensor.sock")])
def test_socket_served_by_other_agent(running_agent: Path, tmp_path: Path, flag: str, name: str) -> None:
    served = running_agent / name

    result = run_agent(tmp_path / "second", flag, str(served))

    assert result.returncode == EXIT_CONFIG, result.stderr
    line = cannot_start_line(result.stderr)
    assert f"another process serves the socket {served}" in line
    assert f"stop it or set {flag} to another path" in line
    assert "Traceback" not in result.stderr
    assert is_served(served)
    # A bad --tensor-socket fails before the local API socket is bound, so none is left behind.
    assert not (tmp_path / "second" / "agent.sock").exists()


def test_stale_socket_replaced(tmp_path: Path) -> None:
    """A socket file that a killed agent left behind is removed, and the new agent serves on its path."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    for name in ("agent.sock", "agent.tensor.sock"):
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(state_dir / name))
        stale.close()
    process = subprocess.Popen(
        [*AGENT, "--state-dir", str(state_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while not (is_served(state_dir / "agent.sock") and is_served(state_dir / "agent.tensor.sock")):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the agent did not serve on the stale socket paths"
            time.sleep(0.1)
    finally:
        process.terminate()
        process.communicate(timeout=30)


@pytest.mark.parametrize(("flag", "name"), [("--socket", "agent.sock"), ("--tensor-socket", "agent.tensor.sock")])
def test_socket_directory_not_writable(tmp_path: Path, flag: str, name: str) -> None:
    prefix = without_file_capabilities()
    directory = tmp_path / "read-only"
    directory.mkdir(mode=0o555)
    path = directory / name

    result = run_agent(tmp_path / "state", flag, str(path), prefix=prefix)

    assert result.returncode == EXIT_CONFIG, result.stderr
    line = cannot_start_line(result.stderr)
    assert f"cannot create the {'local API' if flag == '--socket' else 'tensor'} socket {path}" in line
    assert f"the directory {directory} is not writable by uid {os.geteuid()} (Permission denied)" in line
    assert f"or set {flag} to a path in a writable directory" in line
    assert "Failed to bind" not in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state" / "agent.sock").exists()


def test_socket_directory_not_creatable(tmp_path: Path) -> None:
    prefix = without_file_capabilities()
    parent = tmp_path / "read-only"
    parent.mkdir(mode=0o555)
    path = parent / "run" / "agent.sock"

    result = run_agent(tmp_path / "state", "--socket", str(path), prefix=prefix)

    assert result.returncode == EXIT_CONFIG, result.stderr
    line = cannot_start_line(result.stderr)
    assert f"cannot create the directory {parent / 'run'} of the local API socket {path}: Permission denied" in line
    assert "or set --socket to a path in a writable directory" in line
    assert "Traceback" not in result.stderr


def test_socket_directory_below_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "run" / "agent.sock"

    result = run_agent(tmp_path / "state", "--socket", str(path))

    assert result.returncode == EXIT_CONFIG, result.stderr
    line = cannot_start_line(result.stderr)
    assert f"cannot create the directory {path.parent} of the local API socket {path}" in line
    assert "it or one of its parents is a file" in line
    assert "Traceback" not in result.stderr


def test_sockets_on_same_path(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"

    result = run_agent(tmp_path / "state", "--socket", str(path), "--tensor-socket", str(path))

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"--socket and --tensor-socket name the same path {path}" in result.stderr
    assert "Traceback" not in result.stderr


def test_tensor_bind_failure_removes_local_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor socket that fails after the checks, while the local API socket is bound, removes that socket."""
    from edgefleet.agent.agent import Agent

    config = AgentConfig(orchestrator=UNUSED_ADDRESS, state_dir=tmp_path / "state", insecure=True)
    hardware = agent_hardware()
    agent = Agent(
        config,
        hardware,
        EnforcedLimits(cpus=(0,), threads=1, memory_budget_bytes=None),
        tuple(r.name for r in hardware.runtimes),
    )

    def fail_to_bind() -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(agent.tensor_socket, "start", fail_to_bind)

    with pytest.raises(SocketPathError, match=f"cannot create the tensor socket {config.tensor_socket_path}"):
        asyncio.run(agent.run(asyncio.Event()))
    assert not os.path.lexists(config.socket_path)
