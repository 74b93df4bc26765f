"""kill -9 of real agents and orchestrators at bad moments, and restarts over crash leftovers."""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest

from edgefleet.agent.tensor_socket import TensorReply
from edgefleet.agent.tensor_socket_client import TensorSocketClient
from edgefleet.common.serde import timestamp
from edgefleet.common.sketch import LatencySketch
from edgefleet.v1 import agent_pb2, agent_pb2_grpc, common_pb2, inference_pb2, inference_pb2_grpc, operator_pb2
from tests.faults.fleet import (
    MODEL,
    deploy,
    inference_total,
    linear_model,
    online_device,
    serving_fleet,
    upload,
    wait_serving,
)
from tests.faults.processes import (
    STEP_TIMEOUT_S,
    AgentProcess,
    InferenceClient,
    OrchestratorProcess,
    installed_files_consistent,
    wait_for,
)
from tests.faults.proxy import TcpProxy
from tests.servers import register_request, upload_requests

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
T = TypeVar("T")


def local_version(agent: AgentProcess) -> str:
    """Wait until the agent's local API serves MODEL, from its own files after a restart; return the version."""

    def version() -> str:
        with grpc.insecure_channel(f"unix://{agent.socket_path}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            request = inference_pb2.ListLocalModelsRequest()
            models = stub.ListLocalModels(request, timeout=10, wait_for_ready=True).models
        return next((m.model_version for m in models if m.model_name == MODEL), "")

    return wait_for(version, f"the agent to serve {MODEL}", interval_s=0.1)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[OrchestratorProcess, TcpProxy, AgentProcess]]:
    """Yield an orchestrator, a proxy in front of it and an agent behind the proxy that serves MODEL:1."""
    with serving_fleet(tmp_path) as processes:
        yield processes


def test_agent_killed_mid_download(fleet: tuple[OrchestratorProcess, TcpProxy, AgentProcess]) -> None:
    orchestrator, proxy, agent = fleet
    channel, operator = orchestrator.operator()
    new_model = linear_model(1, padding_floats=2 * MIB)  # About 8 MiB.
    new_digest = hashlib.sha256(new_model).hexdigest()
    try:
        device_id = agent.device_id()
        upload(operator, new_model, "2")
        proxy.throttle(2 * MIB)
        deploy(operator, device_id, "2")
        part = agent.state_dir / "models" / "partial" / f"{new_digest}.part"
        wait_for(lambda: part.exists() and part.stat().st_size > MIB, "a partial download of over 1 MiB")
        agent.kill()
        after_crash = installed_files_consistent(agent.state_dir, MODEL)

        proxy.throttle(None)
        agent.start()
        version_at_restart = local_version(agent)
        wait_serving(operator, device_id, "2")
        after_restart = installed_files_consistent(agent.state_dir, MODEL)
        output = InferenceClient(agent.socket_path, MODEL).infer_once()
    finally:
        channel.close()

    assert not after_crash["current"].startswith(new_digest)
    assert version_at_restart in ("1", "2")
    assert after_restart["current"] == f"{new_digest}.onnx"
    assert output.model_version == "2"
    assert not part.exists()


def test_agent_killed_mid_swap(fleet: tuple[OrchestratorProcess, TcpProxy, AgentProcess]) -> None:
    orchestrator, _, agent = fleet
    channel, operator = orchestrator.operator()
    # 4 MiB, so the download, hashing, rename and load of a swap take long enough to be interrupted.
    swapped_in = linear_model(2, padding_floats=MIB)
    digests = {"1": hashlib.sha256(linear_model(0)).hexdigest(), "2": hashlib.sha256(swapped_in).hexdigest()}
    observed: list[tuple[str, str]] = []
    try:
        device_id = agent.device_id()
        upload(operator, swapped_in, "2")
        # Kill at several delays after the deploy, to land at different points of the swap.
        for delay_s, old, new in ((0.05, "1", "2"), (0.25, "2", "1"), (0.6, "1", "2")):
            deploy(operator, device_id, new)
            time.sleep(delay_s)
            agent.kill()
            files = installed_files_consistent(agent.state_dir, MODEL)
            agent.start()
            served = local_version(agent)
            observed.append((files["current"], served))
            response = InferenceClient(agent.socket_path, MODEL).infer_once()

            assert files["current"] in (f"{digests[old]}.onnx", f"{digests[new]}.onnx")
            assert served in (old, new)
            assert response.model_version in (old, new)
            wait_serving(operator, device_id, new)
    finally:
        channel.close()
    print(f"after each kill (file, served version): {observed}")


def test_orchestrator_killed_mid_upload(tmp_path: Path) -> None:
    orchestrator = OrchestratorProcess(tmp_path)
    orchestrator.start()
    data = linear_model(3, padding_floats=2 * MIB)
    staging = orchestrator.data_dir / "artifacts" / "tmp"
    errors: list[grpc.RpcError] = []

    def slow_requests() -> Iterator[operator_pb2.UploadModelRequest]:
        for request in upload_requests(data, MODEL, "1", chunk_bytes=128 * 1024):
            yield request
            time.sleep(0.02)

    def send() -> None:
        channel, operator = orchestrator.operator()
        try:
            operator.UploadModel(slow_requests(), timeout=STEP_TIMEOUT_S)
        except grpc.RpcError as error:
            errors.append(error)
        finally:
            channel.close()

    sender = threading.Thread(target=send)
    sender.start()
    try:
        wait_for(lambda: sum(p.stat().st_size for p in staging.glob("*")) > 2 * MIB, "half of the upload on disk")
        orchestrator.kill()
        sender.join(STEP_TIMEOUT_S)
        leftovers = [p.name for p in staging.glob("*")]
        orchestrator.start()
        channel, operator = orchestrator.operator()
        models_after_restart = list(operator.ListModels(operator_pb2.ListModelsRequest(), timeout=30).models)
        staged_after_restart = list(staging.glob("*"))
        stored_after_restart = list((orchestrator.data_dir / "artifacts" / "sha256").rglob("*.*"))
        model = upload(operator, data, "1")
        channel.close()
    finally:
        orchestrator.stop()

    assert errors[0].code() == grpc.StatusCode.UNAVAILABLE
    assert leftovers, "the crash left a partial upload in the staging directory"
    assert models_after_restart == []
    assert staged_after_restart == []
    assert [p for p in stored_after_restart if p.is_file()] == []
    assert model.digest == "sha256:" + hashlib.sha256(data).hexdigest()


def metric_batch(device_id: str, index: int) -> agent_pb2.UploadMetricsRequest:
    sketch = LatencySketch()
    for i in range(index % 7 + 1):
        sketch.add(1.0 + i)
    window = common_pb2.MetricWindow(
        model_name=MODEL,
        model_version="1",
        variant_id=f"{MODEL}:1:source",
        window_start=timestamp(None),
        window_seconds=1,
        inference_count=sketch.count,
        latency=sketch.to_proto(),
    )
    window.window_start.GetCurrentTime()
    return agent_pb2.UploadMetricsRequest(device_id=device_id, batch_id=f"batch-{index:05d}", windows=[window])


def test_orchestrator_killed_with_batches_in_flight(tmp_path: Path) -> None:
    orchestrator = OrchestratorProcess(tmp_path, "--metric-uploads-per-s", "10000", "--metric-upload-burst", "10000")
    orchestrator.start()
    channel = grpc.insecure_channel(orchestrator.address)
    device_id = agent_pb2_grpc.AgentServiceStub(channel).Register(register_request(), timeout=30).device_id
    channel.close()
    batches = [metric_batch(device_id, i) for i in range(600)]
    pending: queue.Queue[agent_pb2.UploadMetricsRequest] = queue.Queue()
    for batch in batches:
        pending.put(batch)
    acknowledged: set[str] = set()

    def sender() -> None:
        with grpc.insecure_channel(orchestrator.address) as sender_channel:
            stub = agent_pb2_grpc.AgentServiceStub(sender_channel)
            while True:
                try:
                    batch = pending.get_nowait()
                except queue.Empty:
                    return
                try:
                    stub.UploadMetrics(batch, timeout=10)
                except grpc.RpcError:
                    return
                acknowledged.add(batch.batch_id)

    threads = [threading.Thread(target=sender) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(acknowledged) >= 100, "100 acknowledged batches", interval_s=0.005)
        orchestrator.kill()
        for thread in threads:
            thread.join(STEP_TIMEOUT_S)
        acknowledged_before_kill = set(acknowledged)

        orchestrator.start()
        channel = grpc.insecure_channel(orchestrator.address)
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        # The agent keeps every unacknowledged batch and resends it with its id. Resending the
        # acknowledged ones as well shows that the orchestrator stores none of them twice.
        responses = {batch.batch_id: stub.UploadMetrics(batch, timeout=30) for batch in batches}
        _, operator = orchestrator.operator()
        stored = inference_total(operator, device_id)
        channel.close()
    finally:
        orchestrator.stop()

    duplicates = {batch_id for batch_id, response in responses.items() if response.duplicate}
    print(f"{len(acknowledged_before_kill)} acknowledged before the kill; {len(duplicates)} were stored before it")
    assert acknowledged_before_kill < set(responses)
    assert acknowledged_before_kill <= duplicates
    assert stored == sum(b.windows[0].inference_count for b in batches)


def test_restart_with_leftovers(fleet: tuple[OrchestratorProcess, TcpProxy, AgentProcess]) -> None:
    orchestrator, proxy, agent = fleet
    agent.stop()
    orchestrator.stop()
    leftovers = [
        agent.state_dir / "models" / "tmp" / "install-1234.tmp",
        agent.state_dir / "models" / "partial" / f"{'ab' * 32}.part",
        agent.state_dir / "metrics" / f"{'0' * 15}9-{'c' * 32}.batch.tmp",
        orchestrator.data_dir / "artifacts" / "tmp" / "upload-1234.part",
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")

    orchestrator.start()
    proxy.retarget(orchestrator.port)
    agent.start()
    served = local_version(agent)
    channel, operator = orchestrator.operator()
    try:
        device_id = agent.device_id()
        wait_for(lambda: online_device(operator, device_id), "the device to come online again")
        wait_serving(operator, device_id, "1")
        response = InferenceClient(agent.socket_path, MODEL).infer_once()
    finally:
        channel.close()

    assert served == "1"
    assert response.model_version == "1"
    assert [path for path in leftovers if path.exists()] == []


def first_answer(call: Callable[[], T]) -> T:
    """Return the result of call's first attempt that reaches a listening agent, trying every 5 ms."""
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while True:
        try:
            return call()
        except (grpc.RpcError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def test_restart_serves_before_listening(fleet: tuple[OrchestratorProcess, TcpProxy, AgentProcess]) -> None:
    orchestrator, _, agent = fleet
    channel, operator = orchestrator.operator()
    try:
        device_id = agent.device_id()
        # 32 MiB, so that loading the model at start-up takes long enough for a client to call in between.
        upload(operator, linear_model(5, padding_floats=8 * MIB), "2")
        deploy(operator, device_id, "2")
        wait_serving(operator, device_id, "2")
    finally:
        channel.close()
    agent.stop()
    tensor_socket = agent.state_dir / "agent.tensor.sock"
    agent.socket_path.unlink(missing_ok=True)
    tensor_socket.unlink(missing_ok=True)

    def list_local_models() -> list[inference_pb2.LocalModel]:
        with grpc.insecure_channel(f"unix://{agent.socket_path}") as local_channel:
            stub = inference_pb2_grpc.InferenceServiceStub(local_channel)
            return list(stub.ListLocalModels(inference_pb2.ListLocalModelsRequest(), timeout=10).models)

    def tensor_infer() -> TensorReply:
        with TensorSocketClient(tensor_socket) as client:
            return client.infer(MODEL, {"x": np.ones((1, 4), dtype=np.float32)})

    agent.start()
    listed = first_answer(list_local_models)
    reply = first_answer(tensor_infer)

    assert [(m.model_name, m.model_version) for m in listed] == [(MODEL, "2")]
    assert reply.model_version == "2"


def test_orchestrator_lost_mid_download(fleet: tuple[OrchestratorProcess, TcpProxy, AgentProcess]) -> None:
    orchestrator, proxy, agent = fleet
    channel, operator = orchestrator.operator()
    new_model = linear_model(4, padding_floats=2 * MIB)  # About 8 MiB.
    new_digest = hashlib.sha256(new_model).hexdigest()
    try:
        device_id = agent.device_id()
        upload(operator, new_model, "2")
        proxy.throttle(2 * MIB)
        deploy(operator, device_id, "2")
        part = agent.state_dir / "models" / "partial" / f"{new_digest}.part"
        wait_for(lambda: part.exists() and part.stat().st_size > MIB, "a partial download of over 1 MiB")
        # The control stream ends while the agent is busy applying the desired state, so the heartbeats
        # of the next seconds are written to a stream that has already finished.
        proxy.drop()
        time.sleep(3)
        assert agent.running, f"the agent exited while the orchestrator was unreachable:\n{agent.log_tail()}"

        proxy.throttle(None)
        proxy.pass_traffic()
        wait_serving(operator, device_id, "2")
        output = InferenceClient(agent.socket_path, MODEL).infer_once()
    finally:
        channel.close()

    assert agent.running
    assert "agent failed" not in agent.log_path.read_text()
    assert output.model_version == "2"


def test_download_given_up_resumes_on_reconnect(fleet: tuple[OrchestratorProcess, TcpProxy, AgentProcess]) -> None:
    orchestrator, proxy, agent = fleet
    channel, operator = orchestrator.operator()
    new_model = linear_model(5, padding_floats=2 * MIB)  # About 8 MiB.
    new_digest = hashlib.sha256(new_model).hexdigest()
    try:
        device_id = agent.device_id()
        upload(operator, new_model, "2")
        proxy.throttle(2 * MIB)
        deploy(operator, device_id, "2")
        part = agent.state_dir / "models" / "partial" / f"{new_digest}.part"
        wait_for(lambda: part.exists() and part.stat().st_size > MIB, "a partial download of over 1 MiB")
        # The orchestrator stays unreachable until the agent gives the download up. RetryPolicy's defaults
        # do that at the 9th failed attempt, after 8 jittered waits: about 46 s on average, at most 92 s.
        proxy.drop()
        wait_for(
            lambda: "failed 9 times in a row" in agent.log_path.read_text(),
            "the agent to give the download up",
            timeout_s=150,
        )

        proxy.throttle(None)
        proxy.pass_traffic()
        wait_serving(operator, device_id, "2")
        output = InferenceClient(agent.socket_path, MODEL).infer_once()
    finally:
        channel.close()

    assert output.model_version == "2"
    assert not part.exists()


def test_changed_model_file_downloaded_again(fleet: tuple[OrchestratorProcess, TcpProxy, AgentProcess]) -> None:
    orchestrator, _, agent = fleet
    agent.stop()
    model_dir = agent.state_dir / "models" / "models" / MODEL
    current = model_dir / json.loads((model_dir / "state.json").read_text())["current"]
    current.write_bytes(linear_model(5))  # Another valid model under the file name of the one installed.

    def restored() -> bool:
        return current.exists() and hashlib.sha256(current.read_bytes()).hexdigest() == current.stem

    agent.start()
    wait_for(restored, "the agent to download its changed model file again")
    # The file is in place before the agent loads it, so wait until the model serves.
    local_version(agent)
    output = InferenceClient(agent.socket_path, MODEL).infer_once()
    files = installed_files_consistent(agent.state_dir, MODEL)
    log_text = agent.log_path.read_text()

    assert "changed after its download" in log_text
    assert files["current"] == current.name
    assert output.model_version == "1"
    assert orchestrator.running


def test_corrupt_model_offline_serves_kept_version(fleet: tuple[OrchestratorProcess, TcpProxy, AgentProcess]) -> None:
    orchestrator, proxy, agent = fleet
    channel, operator = orchestrator.operator()
    try:
        device_id = agent.device_id()
        upload(operator, linear_model(5), "2")
        deploy(operator, device_id, "2")
        wait_serving(operator, device_id, "2")
    finally:
        channel.close()
    agent.stop()
    model_dir = agent.state_dir / "models" / "models" / MODEL
    current = model_dir / json.loads((model_dir / "state.json").read_text())["current"]
    with current.open("r+b") as handle:
        handle.truncate(current.stat().st_size // 2)

    proxy.drop()
    agent.start()
    offline_version = local_version(agent)
    offline_output = InferenceClient(agent.socket_path, MODEL).infer_once()
    proxy.pass_traffic()
    wait_for(
        lambda: InferenceClient(agent.socket_path, MODEL).infer_once().model_version == "2",
        "the agent to download version 2 again and serve it",
    )
    files = installed_files_consistent(agent.state_dir, MODEL)
    log_text = agent.log_path.read_text()

    assert offline_version == "1"
    assert offline_output.model_version == "1"
    assert "serves variant" in log_text
    assert files["current"] == current.name
    assert hashlib.sha256(current.read_bytes()).hexdigest() == current.stem
