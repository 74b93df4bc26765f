"""Files the orchestrator stores: the database with the signing keys, and model artifacts on disk."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.v1 import common_pb2
from tests.faults.processes import OrchestratorProcess
from tests.security.helpers import SecureOrchestrator
from tests.security.test_signing import deploy_and_wait, served_version, start_enrolled_agent
from tests.servers import AgentThread, linear_onnx, upload_requests, wait_until

pytest_plugins = ["tests.servers", "tests.security.helpers"]

StartSecure = Callable[..., SecureOrchestrator]
StartAgent = Callable[..., AgentThread]


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """Run the test under umask 022, which makes new files readable by every user unless a mode is given."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.usefixtures("usual_umask")
def test_sqlite_database_private(tmp_path: Path) -> None:
    """The SQLite database and its WAL files hold the private signing keys, so only the owner may read them."""
    orchestrator = OrchestratorProcess(tmp_path)
    orchestrator.start()
    try:
        database = orchestrator.data_dir / "edgefleet.db"
        modes = {
            path.name: f"{stat.S_IMODE(path.stat().st_mode):04o}"
            for path in (database, database.with_name("edgefleet.db-wal"), database.with_name("edgefleet.db-shm"))
        }
    finally:
        orchestrator.stop()

    assert modes == {"edgefleet.db": "0600", "edgefleet.db-wal": "0600", "edgefleet.db-shm": "0600"}


def test_reupload_repairs_stored_artifact(start_secure: StartSecure, start_agent: StartAgent) -> None:
    """Uploading a changed artifact's bytes again replaces the stored copy, so devices can install it."""
    orchestrator = start_secure()
    admin = orchestrator.operator()
    content = linear_onnx(0)
    hex_digest = hashlib.sha256(content).hexdigest()
    admin.UploadModel(upload_requests(content, "linear", "1"), timeout=120)
    stored = orchestrator.server.config.data_dir / "artifacts" / "sha256" / hex_digest[:2] / hex_digest
    stored.write_bytes(linear_onnx(1))
    agent = start_enrolled_agent(orchestrator, start_agent, "ecu-1")
    wait_until(lambda: agent.agent.connected, "the agent to connect")
    failed = deploy_and_wait(orchestrator, "ecu-1", "1", common_pb2.MODEL_STATE_FAILED)

    admin.UploadModel(upload_requests(content, "linear", "2"), timeout=120)
    repaired = stored.read_bytes()
    served = deploy_and_wait(orchestrator, "ecu-1", "2", common_pb2.MODEL_STATE_SERVING)

    assert "SHA-256" in failed.error
    assert repaired == content
    assert served.variant_id == "linear:2:source"
    assert served_version(agent) == "2"
