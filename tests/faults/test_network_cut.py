"""A real agent behind a blackholed link keeps serving, buffers its metrics on disk and delivers each once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.fleet import MODEL, deploy, inference_total, linear_model, online_device, upload, wait_serving
from tests.faults.processes import AgentProcess, InferenceClient, OrchestratorProcess, wait_for
from tests.faults.proxy import TcpProxy

# Longer than the agent's 10 s UploadMetrics deadline, so a batch stuck in the dead link is resent.
CUT_S = 12.0


@pytest.mark.slow
def test_network_cut_metrics_exactly_once(tmp_path: Path) -> None:
    orchestrator = OrchestratorProcess(tmp_path)
    orchestrator.start()
    proxy = TcpProxy(orchestrator.port)
    agent = AgentProcess(tmp_path, "camera", proxy.address)
    client = InferenceClient(agent.socket_path, MODEL)
    channel, operator = orchestrator.operator()
    try:
        agent.start()
        device_id = wait_for(agent.device_id, "the agent to register")
        wait_for(lambda: online_device(operator, device_id), "the device to come online")
        upload(operator, linear_model(0), "1")
        deploy(operator, device_id, "1")
        wait_serving(operator, device_id, "1")
        client.start()
        time.sleep(2)

        proxy.blackhole()
        served_before_cut = client.succeeded
        time.sleep(CUT_S)
        served_during_cut = client.succeeded - served_before_cut
        buffered_files = len(list((agent.state_dir / "metrics").glob("*.batch")))
        proxy.pass_traffic()
        time.sleep(2)
        client.stop()

        served = client.succeeded
        wait_for(lambda: inference_total(operator, device_id) >= served, "every inference in the orchestrator")
        time.sleep(3)  # Late duplicates would show up here.
        stored = inference_total(operator, device_id)
        left_on_disk = wait_for(
            lambda: not list((agent.state_dir / "metrics").glob("*.batch")) or None, "an empty buffer", timeout_s=10
        )
    finally:
        client.stop()
        agent.stop()
        proxy.close()
        channel.close()
        orchestrator.stop()

    print(f"served {served} ({served_during_cut} during the cut, {buffered_files} batches buffered); stored {stored}")
    assert served_during_cut > 0
    assert client.failed == 0
    assert buffered_files > 0
    assert stored == served
    assert left_on_disk
