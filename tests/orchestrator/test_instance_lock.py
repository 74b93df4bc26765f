"""One orchestrator per database: a second one is refused, and a lost PostgreSQL lock is taken again or ends it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from edgefleet.common.errors import EXIT_CONFIG, EXIT_UNAVAILABLE
from edgefleet.orchestrator.store.instance_lock import INSTANCE_LOCK_KEY, application_name, holder_text
from tests.servers import (
    STEP_TIMEOUT_S,
    OrchestratorThread,
    orchestrator_config,
    store_connected_device,
    stored_device_connected,
)

pytest_plugins = ["tests.servers"]


def orchestrator_command(data_dir: Path, db_url: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "edgefleet.orchestrator.main",
        "--insecure",
        "--listen",
        "127.0.0.1:0",
        "--log-level",
        "warning",
        "--data-dir",
        str(data_dir),
        "--db",
        db_url,
        *args,
    ]


def run_orchestrator(data_dir: Path, db_url: str) -> subprocess.CompletedProcess[str]:
    """Run an orchestrator on db_url until it exits, as a second one whose start fails does."""
    return subprocess.run(
        orchestrator_command(data_dir, db_url), capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=False
    )


class OrchestratorProcess:
    """A real edgefleet-orchestrator process, started and waited for until it serves."""

    def __init__(self, data_dir: Path, db_url: str) -> None:
        port_file = data_dir.parent / f"{data_dir.name}.port"
        self.process = subprocess.Popen(
            orchestrator_command(data_dir, db_url, "--port-file", str(port_file)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.process.poll() is not None:
                _, stderr = self.process.communicate()
                raise AssertionError(f"orchestrator exited {self.process.returncode}: {stderr}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise TimeoutError("orchestrator did not start")
            time.sleep(0.05)
        self.port = int(port_file.read_text())

    def wait(self, timeout_s: float = STEP_TIMEOUT_S) -> tuple[int, str]:
        """Wait for the process to exit on its own; return its exit code and stderr."""
        _, stderr = self.process.communicate(timeout=timeout_s)
        return self.process.returncode, stderr

    def stop(self) -> None:
        if self.process.poll() is not None:
            if self.process.stderr is not None and not self.process.stderr.closed:
                self.process.stderr.close()
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.communicate(timeout=STEP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()


@pytest.fixture
def first(tmp_path: Path, db_url: str) -> Iterator[OrchestratorProcess]:
    process = OrchestratorProcess(tmp_path / "first", db_url)
    yield process
    process.stop()


def test_second_orchestrator_on_one_database_is_refused(
    tmp_path: Path, db_url: str, first: OrchestratorProcess
) -> None:
    store_connected_device(db_url)
    second_dir = tmp_path / "second"

    result = run_orchestrator(second_dir, db_url)

    assert result.returncode == EXIT_CONFIG, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert "another orchestrator already serves the database" in error
    assert f"edgefleet-orchestrator at 127.0.0.1:{first.port}, pid {first.process.pid}," in error
    assert ",," not in error
    assert "run one orchestrator per database" in error
    # The first orchestrator's device keeps its stream, and the refused start wrote no admin token.
    assert stored_device_connected(db_url)
    assert not (second_dir / "admin.token").exists()


def test_lock_is_released_at_stop(tmp_path: Path, db_url: str, first: OrchestratorProcess) -> None:
    first.stop()
    assert first.process.returncode == 0

    second = OrchestratorThread(orchestrator_config(tmp_path / "second", db_url))
    second.stop()


def test_killed_orchestrator_leaves_no_lock(tmp_path: Path, db_url: str, first: OrchestratorProcess) -> None:
    store_connected_device(db_url)
    first.process.kill()
    first.wait()

    second = OrchestratorThread(orchestrator_config(tmp_path / "second", db_url))
    try:
        # The device's stream ended with the killed process, and the new holder of the lock records that.
        assert not stored_device_connected(db_url)
    finally:
        second.stop()


def admin_connection(db_url: str) -> psycopg.Connection[tuple[object, ...]]:
    url = make_url(db_url)
    return psycopg.connect(host=url.host, port=url.port, user=url.username, dbname=url.database, autocommit=True)


def terminate_lock_session(connection: psycopg.Connection[tuple[object, ...]]) -> None:
    """End the PostgreSQL session that holds the orchestrator's lock, as a server restart would.

    Returns once the session is gone: pg_terminate_backend only signals the backend.
    """
    row = connection.execute(
        "SELECT l.pid, pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted "
        "AND l.classid = %s AND l.objid = %s AND l.objsubid = 1",
        (INSTANCE_LOCK_KEY >> 32, INSTANCE_LOCK_KEY & 0xFFFFFFFF),
    ).fetchone()
    assert row is not None and row[1], "no session held the orchestrator lock"
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while connection.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (row[0],)).fetchone() is not None:
        assert time.monotonic() < deadline, f"backend {row[0]} did not end"
        time.sleep(0.01)


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_lost_postgres_lock_is_taken_again(tmp_path: Path, db_url: str, first: OrchestratorProcess) -> None:
    with admin_connection(db_url) as admin:
        terminate_lock_session(admin)
        # The orchestrator checks its lock every 5 s and takes it again on a new session.
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            held = admin.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s AND objid = %s",
                (INSTANCE_LOCK_KEY >> 32, INSTANCE_LOCK_KEY & 0xFFFFFFFF),
            ).fetchone()
            if held is not None and held[0] == 1:
                break
            assert time.monotonic() < deadline, "the orchestrator did not take its lock again"
            time.sleep(0.2)
    assert first.process.poll() is None

    result = run_orchestrator(tmp_path / "second", db_url)
    assert result.returncode == EXIT_CONFIG, result.stderr


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_lost_lock_taken_by_another_stops(db_url: str, first: OrchestratorProcess) -> None:
    with admin_connection(db_url) as admin:
        # Another session takes the lock before the orchestrator's next check, as a second orchestrator
        # that starts while the first one's session is gone would. The orchestrator checks every 5 s,
        # so it rarely takes the lock again first; then the test ends its session once more.
        for _ in range(5):
            terminate_lock_session(admin)
            if admin.execute("SELECT pg_try_advisory_lock(%s)", (INSTANCE_LOCK_KEY,)).fetchone() == (True,):
                break
        else:
            pytest.fail("the orchestrator took its lock again before the test could, five times")

        code, stderr = first.wait()

    assert code == EXIT_UNAVAILABLE, stderr
    assert "took over the database since; this orchestrator stops" in stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_symlinked_sqlite_path_is_refused(tmp_path: Path, db_url: str, first: OrchestratorProcess) -> None:
    database = Path(make_url(db_url).database or "")
    link_dir = tmp_path / "elsewhere"
    link_dir.mkdir()
    link = link_dir / "link.db"
    link.symlink_to(database)

    result = run_orchestrator(tmp_path / "second", f"sqlite:///{link}")

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"pid {first.process.pid}" in result.stderr
    assert not (link_dir / "link.db.orchestrator.lock").exists()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_lock_path_directory_is_named(tmp_path: Path, db_url: str) -> None:
    database = Path(make_url(db_url).database or "")
    lock_path = database.with_name(database.name + ".orchestrator.lock")
    lock_path.mkdir()

    result = run_orchestrator(tmp_path / "data", db_url)

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"the orchestrator lock {lock_path} is a directory" in result.stderr
    assert "remove it" in result.stderr


@pytest.mark.parametrize(
    ("listen", "host", "expected_parts"),
    [
        ("[::1]:1", "vm", 3),
        ("127.0.0.1:57111", "build-host-with-a-long-name", 2),
        ("[2001:db8:85a3::8a2e:370]:50051", "vm", 1),
    ],
)
def test_application_name_keeps_whole_parts(
    monkeypatch: pytest.MonkeyPatch, listen: str, host: str, expected_parts: int
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: host)
    monkeypatch.setattr(os, "getpid", lambda: 4194304)
    full = holder_text(listen)

    name = application_name(listen)

    assert len(name.encode()) <= 63
    assert name == ", ".join(full.split(", ")[:expected_parts])


def test_application_name_cuts_long_listen(monkeypatch: pytest.MonkeyPatch) -> None:
    listen = "[2001:db8:85a3:1234:5678:8a2e:370:7334]:50051"
    monkeypatch.setattr(os, "getpid", lambda: 4194304)

    name = application_name(listen)

    assert name == f"edgefleet-orchestrator at {listen}".encode()[:63].decode()
