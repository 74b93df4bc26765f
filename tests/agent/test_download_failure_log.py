"""How the agent logs a download that the orchestrator fails the same way in every retry round."""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable

import pytest

from edgefleet.agent.delivery import RetryPolicy
from edgefleet.v1 import common_pb2, operator_pb2
from tests.servers import AgentThread, OrchestratorThread, get_device, linear_onnx, upload, wait_until

pytest_plugins = ["tests.servers"]

pytestmark = pytest.mark.slow

StartAgent = Callable[..., AgentThread]
StartOrchestrator = Callable[..., OrchestratorThread]

# Short waits between attempts, so a retry round of 3 attempts takes a fraction of a second.
QUICK_RETRIES = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)


def messages(caplog: pytest.LogCaptureFixture, logger: str, level: int, text: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == logger and record.levelno == level and text in record.getMessage()
    ]


def model_state(orchestrator: OrchestratorThread, device_id: str) -> int:
    models = get_device(orchestrator, device_id).models
    return next((m.state for m in models if m.model_name == "linear"), common_pb2.MODEL_STATE_UNSPECIFIED)


def test_repeated_download_failure_quiet(
    start_orchestrator: StartOrchestrator, start_agent: StartAgent, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="edgefleet.agent")
    orchestrator = start_orchestrator()
    agent = start_agent(orchestrator.address, "camera")
    downloader = agent.agent.downloader
    downloader.retry = QUICK_RETRIES
    device_id = wait_until(lambda: agent.agent.device_id, "the agent to register")
    wait_until(
        lambda: get_device(orchestrator, device_id).status == common_pb2.DEVICE_STATUS_ONLINE,
        "the agent to come online",
    )
    model = linear_onnx()
    digest = f"sha256:{hashlib.sha256(model).hexdigest()}"
    upload(orchestrator, model, "linear", "1")
    stored = orchestrator.config.data_dir / "artifacts" / "sha256" / digest[7:9] / digest[7:]
    stored.unlink()
    stored.mkdir()  # Every read of the artifact now fails on the orchestrator with INTERNAL.

    orchestrator.operator.Deploy(
        operator_pb2.DeployRequest(model_name="linear", model_version="1", device_id=device_id), timeout=30
    )
    repeats = "retrying the download of model=linear"
    wait_until(
        lambda: len(messages(caplog, "edgefleet.agent.reconcile", logging.DEBUG, repeats)) >= 2,
        "three retry rounds",
    )
    delivery_warnings = messages(caplog, "edgefleet.agent.delivery", logging.WARNING, digest)
    reconcile_errors = messages(caplog, "edgefleet.agent.reconcile", logging.ERROR, "model=linear")
    retry_infos = messages(caplog, "edgefleet.agent.reconcile", logging.INFO, repeats)
    repeated_failures = messages(caplog, "edgefleet.agent.delivery", logging.DEBUG, digest)

    downloader.failures.interval_s = 0.0  # The next repeat is due for a summary warning.
    summaries = wait_until(
        lambda: messages(caplog, "edgefleet.agent.delivery", logging.WARNING, "more identical failures"),
        "a summary warning",
    )

    shutil.rmtree(stored)
    stored.write_bytes(model)
    wait_until(lambda: model_state(orchestrator, device_id) == common_pb2.MODEL_STATE_SERVING, "the model to serve")
    successes = messages(caplog, "edgefleet.agent.delivery", logging.INFO, f"download of {digest} succeeded after")
    orchestrator_errors = [
        record
        for record in caplog.records
        if record.name == "edgefleet.orchestrator.servicer" and "unexpected error id=" in record.getMessage()
    ]

    assert len(delivery_warnings) == 1, delivery_warnings
    assert "INTERNAL: internal error (id " in delivery_warnings[0]
    assert len(reconcile_errors) == 1, reconcile_errors
    assert len(retry_infos) == 1, retry_infos
    assert len(repeated_failures) >= 7  # 3 repeats in the first round and 4 in the second.
    assert "INTERNAL: internal error (id " in summaries[0]
    assert len(successes) == 1, successes
    # The orchestrator logs a line for every failed attempt, and the traceback only for the first.
    assert len(orchestrator_errors) >= 7
    assert [record.exc_info is not None for record in orchestrator_errors].count(True) == 1
    assert orchestrator_errors[0].exc_info is not None
    assert all("the same error as id=" in record.getMessage() for record in orchestrator_errors[1:])
