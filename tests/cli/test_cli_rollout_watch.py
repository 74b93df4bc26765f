"""`edgefleet rollout status --watch` across an orchestrator restart, against real orchestrators."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from edgefleet.cli.main import EXIT_FAILED, main
from edgefleet.v1 import operator_pb2
from tests.servers import OrchestratorThread, linear_onnx, orchestrator_config, upload

pytest_plugins = ["tests.servers"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_rollout_watch_survives_restart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    config = orchestrator_config(tmp_path, listen=address)
    first = OrchestratorThread(config)
    try:
        upload(first, linear_onnx(1), "classifier", "1")
        # No device has the label, so the rollout stays pending until it is aborted.
        request = operator_pb2.CreateRolloutRequest(
            model_name="classifier",
            model_version="1",
            target_labels={"kind": "none"},
            wave_percents=[100],
            budget_ms=50,
        )
        rollout_id = first.operator.CreateRollout(request, timeout=30).rollout_id
        result: list[int] = []
        watch = ["--insecure", "--orchestrator", address, "rollout", "status", rollout_id, "--watch", "--interval=0.2"]
        watcher = threading.Thread(target=lambda: result.append(main(watch)))
        watcher.start()
        time.sleep(1.0)
    finally:
        first.stop()

    time.sleep(1.0)
    second = OrchestratorThread(config)
    try:
        abort = operator_pb2.UpdateRolloutRequest(rollout_id=rollout_id, action=operator_pb2.ROLLOUT_ACTION_ABORT)
        second.operator.UpdateRollout(abort, timeout=30, wait_for_ready=True)
        watcher.join(30)
    finally:
        second.stop()

    error = capsys.readouterr().err
    assert result == [EXIT_FAILED]
    assert error.count("retrying for up to 60 s") == 1
    assert "EDGEFLEET_ORCHESTRATOR; retrying" in error
    assert f"rollout {rollout_id} goes on if the orchestrator restarts" in error
    assert f"rollout {rollout_id} ended aborted: aborted by the operator" in error
