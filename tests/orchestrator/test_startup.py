"""Start-up errors of edgefleet-orchestrator: exit code 78 for configuration errors, 69 for a port in use."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from edgefleet import __version__
from edgefleet.common.errors import EXIT_CONFIG, EXIT_UNAVAILABLE
from edgefleet.common.lifecycle import EXIT_INTERRUPTED
from edgefleet.orchestrator import server as server_module
from edgefleet.orchestrator.config import OrchestratorConfig
from edgefleet.orchestrator.server import server_options
from edgefleet.orchestrator.store import open_store
from edgefleet.orchestrator.store.engine import SQLITE_HEADER
from tests.pg import PostgresCluster
from tests.readonly import on_read_only_mount, read_only_mounts_work
from tests.security.helpers import make_pki
from tests.servers import (
    STEP_TIMEOUT_S,
    OrchestratorThread,
    orchestrator_config,
    store_connected_device,
    stored_device_connected,
)

pytest_plugins = ["tests.servers"]


def run_orchestrator(data_dir: Path, *args: str, read_only: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run edgefleet-orchestrator (plaintext, port 0, data_dir) with args until it exits; return the result.

    With read_only, that directory is an empty read-only file system for the process.
    """
    command = [sys.executable, "-m", "edgefleet.orchestrator.main", "--insecure", "--listen", "127.0.0.1:0"]
    command += ["--log-level", "warning", "--data-dir", str(data_dir), *args]
    return subprocess.run(
        command if read_only is None else on_read_only_mount(read_only, command),
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
        check=False,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Return the last stderr line, where start-up errors go."""
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.fixture
def running_port(tmp_path: Path) -> Iterator[int]:
    """Start a real orchestrator process on a free port; yield its port, then stop it with SIGTERM."""
    port_file = tmp_path / "first.port"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgefleet.orchestrator.main",
            "--insecure",
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "warning",
            "--data-dir",
            str(tmp_path / "first"),
            "--port-file",
            str(port_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while not port_file.exists() or not port_file.read_text().strip():
            if process.poll() is not None:
                pytest.fail(f"the first orchestrator exited with code {process.returncode}")
            if time.monotonic() > deadline:
                pytest.fail(f"the first orchestrator wrote no port file within {STEP_TIMEOUT_S:g} s")
            time.sleep(0.05)
        yield int(port_file.read_text())
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(STEP_TIMEOUT_S)


def test_startup_port_in_use(tmp_path: Path, running_port: int) -> None:
    result = run_orchestrator(tmp_path / "second", "--listen", f"127.0.0.1:{running_port}")

    assert result.returncode == EXIT_UNAVAILABLE
    assert f"cannot listen on 127.0.0.1:{running_port}" in error_line(result)
    assert "already in use by another process" in error_line(result)


@pytest.fixture
def held_port() -> Iterator[int]:
    """Yield a port on 127.0.0.1 that a listening socket of this test occupies until the test ends."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def tree_snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Return (size, mtime in ns, SHA-256) of every file under directory, keyed by relative path."""
    snapshot = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            snapshot[str(path.relative_to(directory))] = (stat.st_size, stat.st_mtime_ns, digest)
    return snapshot


def test_startup_port_in_use_creates_nothing(tmp_path: Path, held_port: int) -> None:
    data_dir = tmp_path / "fleet"

    result = run_orchestrator(data_dir, "--listen", f"127.0.0.1:{held_port}")

    assert result.returncode == EXIT_UNAVAILABLE
    assert "already in use by another process" in error_line(result)
    assert not data_dir.exists()


def test_startup_metrics_port_in_use_creates_nothing(tmp_path: Path, held_port: int) -> None:
    data_dir = tmp_path / "fleet"

    result = run_orchestrator(data_dir, "--metrics-listen", f"127.0.0.1:{held_port}")

    assert result.returncode == EXIT_UNAVAILABLE
    assert f"cannot listen on 127.0.0.1:{held_port}" in error_line(result)
    assert "--metrics-listen" in error_line(result)
    assert not data_dir.exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--metrics-listen", "a..b:0"), ("--metrics-listen", "a..b:9464"), ("--listen", "a..b:50051")],
)
def test_startup_host_invalid_writes_nothing(tmp_path: Path, flag: str, value: str) -> None:
    """A host name with an empty label fails in Python's IDNA codec, before any DNS lookup."""
    data_dir = tmp_path / "fleet"

    result = run_orchestrator(data_dir, flag, value)

    assert result.returncode == EXIT_UNAVAILABLE, result.stderr
    assert "Traceback" not in result.stderr
    assert f"cannot listen on {value}" in error_line(result)
    assert f"check {flag}" in error_line(result)
    # NOTE: with port 0 there is no probe, so main creates the data directory before the bind fails.
    assert list(data_dir.rglob("*")) == []


def test_metrics_port_taken_after_the_probe_creates_nothing(
    tmp_path: Path, held_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A metrics port taken between the probe and the bind still ends the start before the database opens."""
    # Without the probe, start_server meets the held port as a port taken just after the probe would be.
    monkeypatch.setattr(server_module, "check_listen_addresses", lambda config: None)
    data_dir = tmp_path / "fleet"
    config = orchestrator_config(data_dir, metrics_listen=f"127.0.0.1:{held_port}")

    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{held_port} \\(--metrics-listen\\)"):
        asyncio.run(server_module.start_server(config))

    assert not data_dir.exists()


def connected_fleet(data_dir: Path) -> None:
    """Create data_dir with a database whose device edge-01 is connected, and an admin.token.

    The device's stream is open on the running orchestrator. A start that went on would mark it disconnected.
    """
    data_dir.mkdir()
    store_connected_device(f"sqlite:///{data_dir / 'edgefleet.db'}")
    (data_dir / "admin.token").write_text("efa_kept\n")


def test_startup_port_in_use_keeps_state_dir(tmp_path: Path, held_port: int) -> None:
    """A failed start on the state directory of a running orchestrator changes none of its files."""
    data_dir = tmp_path / "fleet"
    connected_fleet(data_dir)
    before = tree_snapshot(data_dir)

    result = run_orchestrator(data_dir, "--listen", f"127.0.0.1:{held_port}")

    assert result.returncode == EXIT_UNAVAILABLE
    assert tree_snapshot(data_dir) == before
    assert stored_device_connected(f"sqlite:///{data_dir / 'edgefleet.db'}")


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("missing.key", "cannot read private key"),
        ("ca.key", "does not match certificate"),
    ],
)
def test_startup_tls_files_invalid_keep_state_dir(tmp_path: Path, key: str, problem: str) -> None:
    """A start with a bad --key ends before it opens the database of a running orchestrator."""
    pki = make_pki(tmp_path / "pki")
    data_dir = tmp_path / "fleet"
    connected_fleet(data_dir)
    before = tree_snapshot(data_dir)
    tls_args = ["--no-insecure", "--operator-listen", "127.0.0.1:0", "--ca-cert", str(pki.ca)]
    tls_args += ["--cert", str(pki.directory / "server.pem"), "--key", str(pki.directory / key)]

    result = run_orchestrator(data_dir, *tls_args)

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert problem in error_line(result)
    assert tree_snapshot(data_dir) == before
    assert stored_device_connected(f"sqlite:///{data_dir / 'edgefleet.db'}")


def test_startup_tls_key_missing_writes_nothing(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    data_dir = tmp_path / "fleet"
    tls_args = ["--no-insecure", "--operator-listen", "127.0.0.1:0", "--ca-cert", str(pki.ca)]
    tls_args += ["--cert", str(pki.directory / "server.pem"), "--key", str(pki.directory / "missing.key")]

    result = run_orchestrator(data_dir, *tls_args)

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "cannot read private key" in error_line(result)
    assert list(data_dir.rglob("*")) == []


def test_startup_port_in_use_by_name(tmp_path: Path, running_port: int) -> None:
    # localhost resolves to 127.0.0.1 (and ::1), so the port is in use on one of its addresses.
    result = run_orchestrator(tmp_path / "second", "--listen", f"localhost:{running_port}")

    assert result.returncode == EXIT_UNAVAILABLE
    assert "already in use by another process" in error_line(result)


def test_startup_operator_port_in_use(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls: dict[str, Any] = {
        "insecure": False,
        "ca_cert": pki.ca,
        "cert": pki.directory / "server.pem",
        "key": pki.directory / "server.key",
    }
    first = OrchestratorThread(orchestrator_config(tmp_path / "first", operator_listen="127.0.0.1:0", **tls))
    try:
        assert first._running is not None
        operator_address = f"127.0.0.1:{first._running.operator_port}"
        with pytest.raises(OSError) as raised:
            OrchestratorThread(orchestrator_config(tmp_path / "second", operator_listen=operator_address, **tls))
    finally:
        first.stop()

    assert f"cannot listen on {operator_address}" in str(raised.value)
    assert "already in use by another process" in str(raised.value)
    assert "--operator-listen" in str(raised.value)


@pytest.mark.parametrize(
    ("ca_cert", "cert", "key", "problem"),
    [
        ("ca.pem", "server.pem", "ca.key", "private key {d}/ca.key (--key) does not match certificate"),
        ("ca.pem", "server.key", "server.pem", "certificate {d}/server.key (--cert) is not a valid PEM certificate"),
        ("server.key", "server.pem", "server.key", "CA certificate {d}/server.key (--ca-cert) is not a valid PEM"),
    ],
)
def test_startup_tls_files_swapped(tmp_path: Path, ca_cert: str, cert: str, key: str, problem: str) -> None:
    """Swapped TLS files stop the start as a configuration error, not as an address that cannot be bound."""
    pki = make_pki(tmp_path / "pki")
    files = pki.directory

    result = run_orchestrator(
        tmp_path / "data",
        "--no-insecure",
        "--operator-listen",
        "127.0.0.1:0",
        "--ca-cert",
        str(files / ca_cert),
        "--cert",
        str(files / cert),
        "--key",
        str(files / key),
    )

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert problem.format(d=files) in error_line(result)
    assert "cannot listen" not in result.stderr
    assert "Traceback" not in result.stderr


def test_startup_key_readable_by_others_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pki = make_pki(tmp_path / "pki")
    key = pki.directory / "server.key"
    key.chmod(0o644)
    config = orchestrator_config(
        tmp_path / "data", insecure=False, ca_cert=pki.ca, cert=pki.directory / "server.pem", key=key
    )

    with caplog.at_level(logging.WARNING, logger="edgefleet.common.tls"):
        OrchestratorThread(config).stop()

    warnings = [r.getMessage() for r in caplog.records if r.name == "edgefleet.common.tls"]
    assert len(warnings) == 1
    assert f"private key {key} (--key) has mode 0644" in warnings[0]


def test_server_options_disable_reuseport() -> None:
    """Check that server_options stop gRPC from binding a port whose listener set SO_REUSEPORT, as gRPC does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"

        async def bound_port(options: list[tuple[str, int]]) -> int:
            server = grpc.aio.server(options=options)
            try:
                return server.add_insecure_port(address)
            except RuntimeError:
                return 0
            finally:
                await server.stop(None)

        shared_port = asyncio.run(bound_port([]))
        rejected_port = asyncio.run(bound_port(server_options(OrchestratorConfig())))

    # The default shows that the listener alone does not stop a second bind.
    assert shared_port != 0
    assert rejected_port == 0


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--listen", "127.0.0.1:99999"),
        ("--operator-listen", "127.0.0.1:99999"),
    ],
)
def test_startup_port_out_of_range(tmp_path: Path, flag: str, value: str) -> None:
    result = run_orchestrator(tmp_path / "data", flag, value)

    assert result.returncode == EXIT_CONFIG
    assert f"invalid {flag} '{value}'" in error_line(result)
    assert "use a port from 0 to 65535" in error_line(result)


def test_startup_listen_without_port(tmp_path: Path) -> None:
    result = run_orchestrator(tmp_path / "data", "--listen", "127.0.0.1")

    assert result.returncode == EXIT_CONFIG
    assert "invalid --listen '127.0.0.1': expected HOST:PORT" in error_line(result)


def test_startup_negative_stale_after(tmp_path: Path) -> None:
    result = run_orchestrator(tmp_path / "data", "--stale-after-s", "-5")

    assert result.returncode == EXIT_CONFIG
    assert "invalid --stale-after-s -5: must be greater than 0 seconds" in error_line(result)


def test_startup_database_not_sqlite(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "edgefleet.db").write_text("notes, not a database\n")

    result = run_orchestrator(data_dir, "--log-format", "text")

    assert result.returncode == EXIT_CONFIG
    assert f"{data_dir.resolve() / 'edgefleet.db'} is not a SQLite database" in error_line(result)
    assert "point --db or --data-dir elsewhere or restore the file" in error_line(result)
    assert "Traceback" not in result.stderr


def test_startup_database_corrupt(tmp_path: Path) -> None:
    # A valid header passes the file check, so SQLite itself rejects the file when it opens it.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "edgefleet.db").write_bytes(SQLITE_HEADER + b"\xff" * 512)

    result = run_orchestrator(data_dir)

    assert result.returncode == EXIT_CONFIG
    assert f"cannot use the SQLite database {data_dir.resolve() / 'edgefleet.db'}" in error_line(result)
    assert "Traceback" not in result.stderr


# An Alembic revision that this checkout does not ship, as a later release would add one.
NEWER_REVISION = "20270101_next_release"


def set_schema_revision(db_url: str, revision: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("UPDATE alembic_version SET version_num = :revision"), {"revision": revision})
    finally:
        engine.dispose()


def schema_revision(db_url: str) -> str:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as connection:
            return str(connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one())
    finally:
        engine.dispose()


def assert_newer_release_error(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    error = error_line(result)
    assert f"is at schema revision {NEWER_REVISION}, which edgefleet {__version__} does not know" in error
    assert "because a newer release migrated it" in error
    assert "Start that release, or restore the backup taken before the upgrade" in error


def test_startup_database_from_newer_release(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    db_url = f"sqlite:///{data_dir / 'edgefleet.db'}"
    open_store(db_url).close()
    set_schema_revision(db_url, NEWER_REVISION)

    result = run_orchestrator(data_dir)

    assert_newer_release_error(result)
    assert schema_revision(db_url) == NEWER_REVISION


def test_startup_postgres_from_newer_release(tmp_path: Path, postgres_cluster: PostgresCluster) -> None:
    db_url = postgres_cluster.create_database("newer_release")
    try:
        open_store(db_url).close()
        set_schema_revision(db_url, NEWER_REVISION)

        result = run_orchestrator(tmp_path / "data", "--db", db_url)

        assert_newer_release_error(result)
        assert schema_revision(db_url) == NEWER_REVISION
    finally:
        postgres_cluster.drop_database("newer_release")


def test_startup_database_is_directory(tmp_path: Path) -> None:
    database = tmp_path / "data" / "edgefleet.db"
    database.mkdir(parents=True)

    result = run_orchestrator(tmp_path / "data")

    assert result.returncode == EXIT_CONFIG
    assert f"{database.resolve()} is a directory, not a file" in error_line(result)


@pytest.mark.parametrize("url", ["bogus://x", "mysql+pymysql://user@localhost/db", "sqlite://"])
def test_startup_unsupported_database_url(tmp_path: Path, url: str) -> None:
    result = run_orchestrator(tmp_path / "data", "--db", url)

    assert result.returncode == EXIT_CONFIG
    assert repr(url) in error_line(result)
    assert "sqlite:///PATH" in error_line(result)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("url", "shown", "problem"),
    [
        (
            "postgresql+psycopg://edgefleet@127.0.0.1:5432/",
            "postgresql+psycopg://edgefleet@127.0.0.1:5432/",
            "names no database",
        ),
        ("postgresql://edgefleet@127.0.0.1", "postgresql://edgefleet@127.0.0.1", "names no database"),
        (
            "postgresql+psycopg://edgefleet:secret@127.0.0.1:5432x/edgefleet",
            "edgefleet:***@",
            "the port is not a number",
        ),
        (
            "postgresql+psycopg://edgefleet:secret@127.0.0.1:99999/edgefleet",
            "edgefleet:***@",
            "the port is not a number",
        ),
        ("postgresql+psycopg://edgefleet@127.0.0.1:0/edgefleet", "127.0.0.1:0/", "the port is not a number"),
    ],
)
def test_startup_postgresql_url_invalid(tmp_path: Path, url: str, shown: str, problem: str) -> None:
    """A typo in the URL stops the start with a configuration error, before anything connects."""
    result = run_orchestrator(tmp_path / "data", "--db", url)

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert shown in error_line(result)
    assert problem in error_line(result)
    assert "secret" not in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "admin.token").exists()


def test_startup_data_dir_is_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.write_text("")

    result = run_orchestrator(data_dir)

    assert result.returncode == EXIT_CONFIG
    assert f"invalid --data-dir {data_dir}: it exists but is not a directory" in error_line(result)


def test_startup_database_parent_is_file(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")

    result = run_orchestrator(tmp_path / "data", "--db", f"sqlite:///{blocker}/edgefleet.db")

    assert result.returncode == EXIT_CONFIG
    assert f"the directory {blocker} of the SQLite database" in error_line(result)
    assert "exists but is not a directory" in error_line(result)


@pytest.mark.skipif(bool(read_only_mounts_work()), reason=read_only_mounts_work() or "runs")
def test_startup_data_dir_read_only(tmp_path: Path) -> None:
    """A data directory on a read-only file system, which root cannot write either."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()

    result = run_orchestrator(data_dir, read_only=data_dir)

    assert result.returncode == EXIT_CONFIG
    assert f"invalid --data-dir {data_dir}: it is not writable by uid" in error_line(result)
    assert "Read-only file system" in error_line(result)


@pytest.mark.skipif(bool(read_only_mounts_work()), reason=read_only_mounts_work() or "runs")
def test_startup_database_dir_read_only(tmp_path: Path) -> None:
    database_dir = tmp_path / "db"
    database_dir.mkdir()

    result = run_orchestrator(
        tmp_path / "data", "--db", f"sqlite:///{database_dir}/edgefleet.db", read_only=database_dir
    )

    assert result.returncode == EXIT_CONFIG
    assert f"the directory {database_dir} of the SQLite database" in error_line(result)
    assert "is not writable by uid" in error_line(result)


def test_startup_postgres_unreachable(tmp_path: Path) -> None:
    # A loopback port that nothing listens on: the server is down, which a restart may fix.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    result = run_orchestrator(tmp_path / "data", "--db", f"postgresql+psycopg://edgefleet@127.0.0.1:{port}/edgefleet")

    assert result.returncode == EXIT_UNAVAILABLE
    assert "cannot open the database" in error_line(result)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--lisen", "127.0.0.1:0"], "unrecognized arguments: --lisen 127.0.0.1:0 (--lisen: did you mean --listen?)"),
        (["--stale-after-s"], "argument --stale-after-s: expected one argument"),
    ],
)
def test_startup_command_line_invalid(tmp_path: Path, args: list[str], expected: str) -> None:
    result = run_orchestrator(tmp_path / "data", *args)

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"edgefleet-orchestrator: invalid command line: {expected}; `edgefleet-orchestrator --help` lists the flags"
    ]
    assert not (tmp_path / "data").exists()


def test_stop_signal_during_start_stops_gracefully(tmp_path: Path) -> None:
    """SIGTERM sent while the orchestrator starts gets the graceful stop once the start is done.

    The lock file appears before the store opens, so the signal lands in the middle of the start.
    """
    data_dir = tmp_path / "data"
    lock_file = data_dir / "edgefleet.db.orchestrator.lock"
    command = [sys.executable, "-m", "edgefleet.orchestrator.main", "--insecure", "--listen", "127.0.0.1:0"]
    command += ["--log-level", "info", "--data-dir", str(data_dir)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while not lock_file.exists():
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the orchestrator did not take its lock"
            time.sleep(0.001)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=STEP_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "received SIGTERM; orchestrator stops" in stderr
    assert "orchestrator serving on" in stderr


def test_interrupt_before_stop_handlers_exits_130(tmp_path: Path) -> None:
    """SIGINT while serve() is still being imported ends the start with one line, not a traceback.

    asyncio logs its selector at debug level when asyncio.run creates the loop, which is before
    serve_config imports the server module and serve() installs its handlers. The import takes
    about a second on two cores, so a signal 50 ms after that line lands in it.
    """
    command = [sys.executable, "-m", "edgefleet.orchestrator.main", "--insecure", "--listen", "127.0.0.1:0"]
    command += ["--log-level", "debug", "--data-dir", str(tmp_path / "data")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        lines = [process.stderr.readline()]
        while "Using selector" not in lines[-1]:
            assert lines[-1], "".join(lines)
            lines.append(process.stderr.readline())
        # Without the pause the signal can land inside the loop's constructor, where CPython 3.11
        # prints an ignored AttributeError that no handler in edgefleet can prevent.
        time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stderr = "".join(lines) + process.communicate(timeout=STEP_TIMEOUT_S)[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert "Traceback" not in stderr
    # The signal may land after serve() installed its handlers on a fast machine, which stops gracefully.
    assert process.returncode in (EXIT_INTERRUPTED, 0), stderr
