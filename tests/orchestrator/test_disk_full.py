"""An orchestrator whose SQLite database sits on a full disk: clear errors, quiet logs, health and recovery."""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgefleet.cli.main import main as edgefleet_cli
from edgefleet.common.errors import DATABASE_UNAVAILABLE_TEXT, EXIT_UNAVAILABLE
from edgefleet.orchestrator.server import DATABASE_CHECK_INTERVAL_S
from edgefleet.orchestrator.store import engine as engine_module
from edgefleet.orchestrator.store import open_store
from edgefleet.orchestrator.store.engine import FULL_DISK_REPORT_S, DatabaseDiskFull
from edgefleet.v1 import agent_pb2_grpc
from tests.faults.processes import STEP_TIMEOUT_S, AgentProcess, OrchestratorProcess, wait_for
from tests.orchestrator.test_store import _register
from tests.servers import register
from tests.tmpfs import mounted_tmpfs

OPERATOR_SERVICE = "edgefleet.v1.OperatorService"
# Longer than the rollout engine's 1 s tick and the last-seen writer's 2 s interval, so both fail
# several times while the disk is full.
OUTAGE_S = 6.0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """Mount a 4 MiB tmpfs for the SQLite database and yield its path."""
    with mounted_tmpfs(tmp_path / "small-disk", "size=4m", lazy_unmount=True) as mount_point:
        yield mount_point


def fill(disk: Path) -> Path:
    """Write a file until disk has no space left; return the file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for block_size in (65536, 4096, 512):
            try:
                while True:
                    os.write(fd, b"\0" * block_size)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
    finally:
        os.close(fd)
    return filler


def health_status(address: str, service: str) -> str:
    """Return the grpc.health.v1 status name of service."""
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def register_error(address: str) -> grpc.RpcError | None:
    """Register a new device, a call that writes; return its error, or None when it succeeds."""
    with grpc.insecure_channel(address) as channel:
        try:
            register(agent_pb2_grpc.AgentServiceStub(channel))
        except grpc.RpcError as error:
            return error
    return None


def test_store_disk_full_then_freed(small_disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "FULL_DISK_REPORT_S", 1.0)
    database = small_disk / "edgefleet.db"
    store = open_store(f"sqlite:///{database}")
    try:
        store.ping()
        filler = fill(small_disk)
        with pytest.raises(DatabaseDiskFull) as raised:
            # The WAL file may have room for a few rows; 200 devices with 20 KB of labels each need 4 MB.
            for index in range(200):
                _register(store, f"dev-{index}", labels={"note": "x" * 20_000})
        with pytest.raises(DatabaseDiskFull):
            store.ping()

        filler.unlink()
        _register(store, "dev-after")
        time.sleep(1.0)
        store.ping()
    finally:
        store.close()

    assert raised.value.message.startswith(DATABASE_UNAVAILABLE_TEXT)
    assert f"the file system of the SQLite database {database} is full" in raised.value.message
    assert "database or disk is full" in raised.value.message
    assert "free space on that file system" in raised.value.message


def test_disk_full_unavailable_then_recovers(
    small_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = small_disk / "edgefleet.db"
    orchestrator = OrchestratorProcess(tmp_path, "--db", f"sqlite:///{database}")
    orchestrator.start()
    agent = AgentProcess(tmp_path, "camera", orchestrator.address)
    agent.start()
    try:
        wait_for(agent.device_id, "the agent to register")
        wait_for(lambda: "control stream opened" in orchestrator.log_path.read_text(), "the agent's stream")
        with grpc.insecure_channel(orchestrator.address) as channel:
            spare_device, _ = register(agent_pb2_grpc.AgentServiceStub(channel))
        tracebacks_before = orchestrator.log_path.read_text().count("Traceback")

        filler = fill(small_disk)
        error = wait_for(lambda: register_error(orchestrator.address), "a write to fail")
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert error.details().startswith(DATABASE_UNAVAILABLE_TEXT), error.details()
        assert f"the file system of the SQLite database {database} is full" in error.details()
        assert "free space on that file system" in error.details()
        repeated_errors = [register_error(orchestrator.address) for _ in range(3)]

        capsys.readouterr()
        exit_code = edgefleet_cli(
            ["--insecure", "--orchestrator", orchestrator.address, "devices", "remove", spare_device]
        )
        cli_error = capsys.readouterr().err
        wait_for(
            lambda: health_status(orchestrator.address, OPERATOR_SERVICE) == "NOT_SERVING",
            "health to report NOT_SERVING",
            timeout_s=3 * DATABASE_CHECK_INTERVAL_S,
        )
        time.sleep(OUTAGE_S)
        outage_log = orchestrator.log_path.read_text()

        filler.unlink()
        wait_for(
            lambda: health_status(orchestrator.address, OPERATOR_SERVICE) == "SERVING",
            "health to report SERVING again",
            timeout_s=FULL_DISK_REPORT_S + 3 * DATABASE_CHECK_INTERVAL_S,
        )
        recovered_error = register_error(orchestrator.address)
        wait_for(lambda: "rollout engine tick works again" in orchestrator.log_path.read_text(), "the tick to recover")
        recovery_log = orchestrator.log_path.read_text()
    finally:
        agent.stop()
        orchestrator.stop()

    assert all(e is not None and e.code() == grpc.StatusCode.UNAVAILABLE for e in repeated_errors)
    # One line for the failed Register calls during the outage and a count of them after it, not one line each.
    assert outage_log.count("[AgentService.Register] UNAVAILABLE") == 1
    summary = next(line for line in recovery_log.splitlines() if "calls that failed while the database" in line)
    failed_registers = re.search(r"AgentService\.Register (\d+)", summary)
    assert failed_registers is not None, summary
    assert int(failed_registers.group(1)) >= 4

    assert outage_log.count("Traceback") == tracebacks_before
    assert outage_log.count("rollout engine tick failed") == 1
    assert outage_log.count("writing last-seen times failed") == 1
    assert outage_log.count("reporting the gRPC services NOT_SERVING") == 1
    assert exit_code == EXIT_UNAVAILABLE
    assert "is full" in cli_error
    assert str(database) in cli_error
    assert recovered_error is None


def test_start_on_full_disk_names_it(small_disk: Path, tmp_path: Path) -> None:
    database = small_disk / "edgefleet.db"
    first = OrchestratorProcess(tmp_path / "first", "--db", f"sqlite:///{database}")
    first.start()
    first.stop()  # A clean stop removes the -wal and -shm files, which a start must create again.
    fill(small_disk)

    second = OrchestratorProcess(tmp_path / "second", "--db", f"sqlite:///{database}")
    second.spawn()
    assert second.popen is not None
    exit_code = second.popen.wait(STEP_TIMEOUT_S)
    log_text = second.log_path.read_text()

    assert exit_code == EXIT_UNAVAILABLE, log_text
    assert f"the file system of the SQLite database {database} is full" in log_text
    assert "disk I/O error" in log_text
    assert "free space on that file system" in log_text
    assert "Traceback" not in log_text


def test_start_on_full_empty_disk(small_disk: Path, tmp_path: Path) -> None:
    # No database yet: the start fails on the first file it writes next to it.
    fill(small_disk)

    orchestrator = OrchestratorProcess(tmp_path, "--db", f"sqlite:///{small_disk / 'edgefleet.db'}")
    orchestrator.spawn()
    assert orchestrator.popen is not None
    exit_code = orchestrator.popen.wait(STEP_TIMEOUT_S)
    log_text = orchestrator.log_path.read_text()

    assert exit_code == EXIT_UNAVAILABLE, log_text
    assert "cannot start: the disk is full" in log_text
    assert str(small_disk / "edgefleet.db") in log_text
    assert "Traceback" not in log_text
