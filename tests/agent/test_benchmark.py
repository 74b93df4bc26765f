"""Tests of the on-device benchmark and of the reports an agent sends after a deploy."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.benchmark import BenchmarkWorker, benchmark_model, sample_input
from edgefleet.agent.runtime import ModelLoadError
from edgefleet.common.models import TensorSpec
from edgefleet.orchestrator.costmodel.store import benchmark_store
from edgefleet.v1 import agent_pb2, common_pb2, operator_pb2
from tests.agent.models import onnx_linear, tflite_linear, tflite_linear_int8
from tests.servers import (
    AgentThread,
    OrchestratorThread,
    get_device,
    linear_onnx,
    upload,
    wait_until,
)

pytest_plugins = ["tests.servers"]

StartAgent = Callable[..., AgentThread]
StartOrchestrator = Callable[..., OrchestratorThread]


def test_benchmark_onnx_threads(tmp_path: Path) -> None:
    result = benchmark_model(onnx_linear(tmp_path / "linear.onnx"), "onnx", max_threads=2, runs=5)
    assert result.runtime == "onnxruntime"
    assert [t.threads for t in result.by_threads] == [1, 2]
    assert all(t.runs == 5 for t in result.by_threads)
    assert all(0 < t.p50_ms <= t.p95_ms for t in result.by_threads)
    assert result.choice.threads in (1, 2)
    assert 0.0 <= result.choice.parallel_fraction <= 1.0


def test_benchmark_tflite() -> None:
    result = benchmark_model(tflite_linear(), "tflite", max_threads=1, runs=5, warmup=1)
    assert result.runtime == "litert"
    assert result.by_threads[0].p50_ms > 0
    assert result.choice.threads == 1


def test_benchmark_tflite_int8_random() -> None:
    result = benchmark_model(tflite_linear_int8(), "tflite", max_threads=1, runs=3, random_inputs=True)
    assert result.by_threads[0].p50_ms > 0


def test_benchmark_report_proto(tmp_path: Path) -> None:
    result = benchmark_model(onnx_linear(tmp_path / "linear.onnx"), "onnx", max_threads=1, runs=3)
    report = result.to_proto("v1")
    assert report.variant_id == "v1"
    assert report.runtime == "onnxruntime"
    assert report.by_threads[0].threads == 1
    assert report.by_threads[0].runs == 3


def test_benchmark_rejects_counts(tmp_path: Path) -> None:
    path = onnx_linear(tmp_path / "linear.onnx")
    with pytest.raises(ValueError, match="max_threads must be in"):
        benchmark_model(path, "onnx", max_threads=0)
    with pytest.raises(ValueError, match="runs must be in"):
        benchmark_model(path, "onnx", max_threads=1, runs=0)


def test_benchmark_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model format 'pt'"):
        benchmark_model(onnx_linear(tmp_path / "linear.onnx"), "pt", max_threads=1)


def test_benchmark_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError):
        benchmark_model(path, "onnx", max_threads=1)


def test_sample_input_dtypes() -> None:
    rng = np.random.default_rng(0)
    floats = sample_input(TensorSpec("x", "float32", (-1, 4)), rng)
    ints = sample_input(TensorSpec("q", "int8", (1, 8)), rng)
    assert floats.shape == (1, 4)
    assert floats.dtype == np.float32
    assert ints.dtype == np.int8
    assert not np.all(sample_input(TensorSpec("x", "float32", (2, 2)), rng) == 0)
    assert np.all(sample_input(TensorSpec("x", "float32", (2, 2)), None) == 0)


def test_worker_sends_report_and_ack(tmp_path: Path) -> None:
    sent: list[agent_pb2.AgentMessage] = []
    done = threading.Event()

    def send(message: agent_pb2.AgentMessage) -> None:
        sent.append(message)
        if message.WhichOneof("body") == "ack":
            done.set()

    worker = BenchmarkWorker(send, max_threads=1, runs=3)
    try:
        future = worker.submit("v1", onnx_linear(tmp_path / "linear.onnx"), "onnx", max_threads=4, command_id="c1")
        assert future is not None
        result = future.result(timeout=30)
    finally:
        worker.close()
    assert result is not None
    assert len(result.by_threads) == 1  # Capped at the worker's thread budget.
    assert done.is_set()
    assert [m.WhichOneof("body") for m in sent] == ["benchmark", "ack"]
    assert sent[1].ack.ok


def test_worker_failure_acks_error(tmp_path: Path) -> None:
    sent: list[agent_pb2.AgentMessage] = []
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a model")
    worker = BenchmarkWorker(sent.append, max_threads=1)
    try:
        future = worker.submit("v1", path, "onnx", command_id="c2")
        assert future is not None
        assert future.result(timeout=30) is None
    finally:
        worker.close()
    assert [m.WhichOneof("body") for m in sent] == ["ack"]
    assert not sent[0].ack.ok
    assert "onnxruntime failed to load" in sent[0].ack.error


def test_worker_closed_rejects(tmp_path: Path) -> None:
    worker = BenchmarkWorker(lambda message: None, max_threads=1)
    worker.close()
    assert worker.submit("v1", tmp_path / "x.onnx", "onnx") is None


def test_agent_reports_after_deploy(start_orchestrator: StartOrchestrator, start_agent: StartAgent) -> None:
    orchestrator = start_orchestrator()
    agent = start_agent(orchestrator.address, "bench")
    device_id = wait_until(lambda: agent.agent.device_id, "the agent to register")
    wait_until(
        lambda: get_device(orchestrator, device_id).status == common_pb2.DEVICE_STATUS_ONLINE,
        "the agent to come online",
    )
    model = upload(orchestrator, linear_onnx(seed=0), "linear", "1")
    orchestrator.operator.Deploy(operator_pb2.DeployRequest(model_name="linear", device_id=device_id), timeout=30)

    store = benchmark_store(orchestrator.state)
    results = wait_until(lambda: store.list_results(device_id=device_id), "the benchmark report to be stored")
    device = get_device(orchestrator, device_id)
    assert results[0].variant_id == model.variants[0].variant_id
    assert results[0].hardware_class == device.hardware.hardware_class
    assert results[0].runtime == "onnxruntime"
    assert [r.threads for r in results] == [1]  # The test agent's thread budget is 1.
    assert results[0].p50_ms > 0


def test_agent_runs_benchmark_command(start_orchestrator: StartOrchestrator, start_agent: StartAgent) -> None:
    orchestrator = start_orchestrator()
    agent = start_agent(orchestrator.address, "bench")
    device_id = wait_until(lambda: agent.agent.device_id, "the agent to register")
    model = upload(orchestrator, linear_onnx(seed=0), "linear", "1")
    variant_id = model.variants[0].variant_id
    orchestrator.operator.Deploy(operator_pb2.DeployRequest(model_name="linear", device_id=device_id), timeout=30)
    store = benchmark_store(orchestrator.state)
    wait_until(lambda: store.list_results(device_id=device_id), "the benchmark after the deploy")

    command = agent_pb2.OrchestratorMessage(
        command_id="bench-1", run_benchmark=agent_pb2.RunBenchmark(variant_id=variant_id, runs=7)
    )
    assert orchestrator.state.hub.push_threadsafe(device_id, command)

    results = wait_until(
        lambda: [r for r in store.list_results(device_id=device_id) if r.runs == 7], "the commanded benchmark"
    )
    assert results[0].variant_id == variant_id
