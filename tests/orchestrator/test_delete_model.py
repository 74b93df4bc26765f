"""DeleteModel over gRPC and `edgefleet models delete`: what is deleted, what blocks it, and the artifact files."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgefleet.cli.main import main as cli_main
from edgefleet.common.sketch import LatencySketch
from edgefleet.orchestrator.artifacts import FileArtifactStore
from edgefleet.orchestrator.domain import MetricWindow
from edgefleet.v1 import agent_pb2, common_pb2, operator_pb2
from tests.agent.models import onnx_failing_reshape
from tests.servers import (
    AgentThread,
    ControlStream,
    OrchestratorThread,
    get_device,
    linear_onnx,
    register,
    upload,
    wait_until,
)

pytest_plugins = ["tests.servers"]

SOURCE = "linear:1:source"
FP32 = "linear:1:onnx-fp32"


@pytest.fixture
def catalog(orchestrator: OrchestratorThread) -> OrchestratorThread:
    """Return an orchestrator with linear:1 (seed 0) and its onnx-fp32 variant (seed 1)."""
    upload(orchestrator, linear_onnx(0), "linear", "1")
    upload(orchestrator, linear_onnx(1), "linear", "1", variant_kind="onnx-fp32")
    return orchestrator


def delete(
    orchestrator: OrchestratorThread, name: str = "linear", version: str = "1", variant_id: str = ""
) -> operator_pb2.DeleteModelResponse:
    request = operator_pb2.DeleteModelRequest(name=name, version=version, variant_id=variant_id)
    return orchestrator.operator.DeleteModel(request, timeout=30)


def rejection(orchestrator: OrchestratorThread, **fields: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        delete(orchestrator, **fields)
    return caught.value


def deploy(orchestrator: OrchestratorThread, device_id: str, variant_id: str, version: str = "1") -> None:
    request = operator_pb2.DeployRequest(
        model_name="linear", model_version=version, device_id=device_id, variant_id=variant_id
    )
    orchestrator.operator.Deploy(request, timeout=30)


def variant_ids(orchestrator: OrchestratorThread, version: str = "1") -> list[str]:
    return sorted(v.variant_id for v in orchestrator.state.store.list_variants("linear", version))


def digest_of(orchestrator: OrchestratorThread, variant_id: str) -> str:
    return orchestrator.state.store.get_variant(variant_id).digest


def artifact_exists(orchestrator: OrchestratorThread, digest: str) -> bool:
    return orchestrator.state.artifacts.exists(digest)


def run_cli(orchestrator: OrchestratorThread, *args: str) -> int:
    return cli_main(["--insecure", "--orchestrator", orchestrator.address, *args])


# Deleting


def test_delete_version(catalog: OrchestratorThread) -> None:
    digests = {digest_of(catalog, SOURCE), digest_of(catalog, FP32)}

    response = delete(catalog)

    assert sorted(response.deleted_variant_ids) == [FP32, SOURCE]
    assert set(response.removed_digests) == digests
    assert not any(artifact_exists(catalog, d) for d in digests)
    assert catalog.state.store.list_model_versions("linear") == []
    assert variant_ids(catalog) == []


def test_delete_variant(catalog: OrchestratorThread) -> None:
    digest = digest_of(catalog, FP32)

    response = delete(catalog, variant_id=FP32)

    assert list(response.deleted_variant_ids) == [FP32]
    assert list(response.removed_digests) == [digest]
    assert not artifact_exists(catalog, digest)
    assert variant_ids(catalog) == [SOURCE]
    assert artifact_exists(catalog, digest_of(catalog, SOURCE))


def test_delete_shared_digest_kept(catalog: OrchestratorThread) -> None:
    upload(catalog, linear_onnx(0), "linear", "2")
    digest = digest_of(catalog, SOURCE)

    response = delete(catalog)

    assert digest not in response.removed_digests
    assert artifact_exists(catalog, digest)
    assert digest_of(catalog, "linear:2:source") == digest


def test_delete_keeps_metric_windows(catalog: OrchestratorThread) -> None:
    register(catalog.agent, "edge-01")
    deploy(catalog, "edge-01", SOURCE)
    now = datetime.now(UTC)
    window = MetricWindow(
        device_id="edge-01",
        model_name="linear",
        model_version="1",
        variant_id=SOURCE,
        hardware_class="x86_64",
        window_start=now,
        window_seconds=10,
        received_at=now,
        inference_count=5,
        error_count=0,
        sketch=LatencySketch().to_bytes(),
    )
    catalog.state.store.add_metric_batch("edge-01", "batch-1", [window])
    upload(catalog, linear_onnx(2), "linear", "2")
    deploy(catalog, "edge-01", "linear:2:source", version="2")

    delete(catalog)

    assert len(catalog.state.store.query_metric_windows(variant_id=SOURCE)) == 1


# Rejections


def test_delete_source_alone(catalog: OrchestratorThread) -> None:
    error = rejection(catalog, variant_id=SOURCE)

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "delete the version linear:1" in (error.details() or "")
    assert variant_ids(catalog) == [FP32, SOURCE]


def test_delete_assigned_variant(catalog: OrchestratorThread) -> None:
    device_ids = [f"edge-{i:02d}" for i in range(6)]
    for device_id in device_ids:
        register(catalog.agent, device_id)
        deploy(catalog, device_id, FP32)

    error = rejection(catalog, variant_id=FP32)
    details = error.details() or ""

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "edge-00, edge-01, edge-02, edge-03, edge-04 and 1 more" in details
    assert "deploy another variant or version" in details
    assert variant_ids(catalog) == [FP32, SOURCE]
    assert artifact_exists(catalog, digest_of(catalog, FP32))


def test_delete_assigned_version(catalog: OrchestratorThread) -> None:
    register(catalog.agent, "edge-01")
    deploy(catalog, "edge-01", SOURCE)

    error = rejection(catalog)

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "(edge-01)" in (error.details() or "")
    assert variant_ids(catalog) == [FP32, SOURCE]


def report(orchestrator: OrchestratorThread, stream: ControlStream, device_id: str, states: dict[str, int]) -> None:
    """Send a reported state of variant id to MODEL_STATE_* over the control stream and wait until it is stored."""
    generation = get_device(orchestrator, device_id).desired_generation
    statuses = []
    for variant_id, state in states.items():
        name, version, _ = variant_id.split(":")
        status = agent_pb2.ModelStatus(
            model_name=name,
            model_version=version,
            variant_id=variant_id,
            digest=digest_of(orchestrator, variant_id),
            state=state,
            error="out of memory" if state == common_pb2.MODEL_STATE_FAILED else "",
            runtime="onnxruntime",
        )
        status.updated_at.GetCurrentTime()
        statuses.append(status)
    message = agent_pb2.ReportedState(desired_generation=generation, models=statuses)
    stream.send(agent_pb2.AgentMessage(reported_state=message))

    def stored() -> bool:
        reported = {s.variant_id: s.state for s in get_device(orchestrator, device_id).models}
        return reported == states

    wait_until(stored, f"the reported state of {device_id}")


def test_delete_version_still_served(catalog: OrchestratorThread, open_stream: Callable[..., ControlStream]) -> None:
    """A device whose deploy of version 2 failed still serves version 1, which must then stay."""
    upload(catalog, linear_onnx(2), "linear", "2")
    device_id, key = register(catalog.agent, "edge-01")
    deploy(catalog, device_id, SOURCE)
    deploy(catalog, device_id, "linear:2:source", version="2")
    stream = open_stream(catalog.agent)
    stream.hello(device_id, key, generation=get_device(catalog, device_id).desired_generation)
    report(
        catalog,
        stream,
        device_id,
        {SOURCE: common_pb2.MODEL_STATE_SERVING, "linear:2:source": common_pb2.MODEL_STATE_FAILED},
    )
    digests = {digest_of(catalog, SOURCE), digest_of(catalog, FP32)}

    error = rejection(catalog)
    details = error.details() or ""

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"1 device reports serving or loading it: edge-01 (serving {SOURCE})" in details
    assert "edgefleet deploy --model linear:VERSION --device edge-01" in details
    assert "edgefleet devices remove edge-01" in details
    assert variant_ids(catalog) == [FP32, SOURCE]
    assert all(artifact_exists(catalog, d) for d in digests)

    report(catalog, stream, device_id, {"linear:2:source": common_pb2.MODEL_STATE_SERVING})
    assert sorted(delete(catalog).deleted_variant_ids) == [FP32, SOURCE]


def test_delete_version_served_by_agent(
    catalog: OrchestratorThread, start_agent: Callable[..., AgentThread], tmp_path: Path
) -> None:
    """A real agent whose deploy of version 2 failed keeps serving version 1, which must then stay."""
    upload(catalog, onnx_failing_reshape(tmp_path / "failing.onnx").read_bytes(), "linear", "2")
    agent = start_agent(catalog.address, "edge")
    device_id = wait_until(lambda: agent.agent.device_id, "the agent to register")
    deploy(catalog, device_id, SOURCE)
    wait_until(lambda: reported_states(catalog, device_id) == [(SOURCE, "serving")], "version 1 to serve")
    deploy(catalog, device_id, "linear:2:source", version="2")
    expected = [("linear:2:source", "failed"), (SOURCE, "serving")]
    wait_until(lambda: reported_states(catalog, device_id) == expected, "version 2 to fail")
    digests = {digest_of(catalog, SOURCE), digest_of(catalog, FP32)}

    error = rejection(catalog)

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"1 device reports serving or loading it: {device_id} (serving {SOURCE})" in (error.details() or "")
    assert variant_ids(catalog) == [FP32, SOURCE]
    assert all(artifact_exists(catalog, d) for d in digests)


def reported_states(orchestrator: OrchestratorThread, device_id: str) -> list[tuple[str, str]]:
    """Return (variant_id, state) of each model status the device last reported, in report order."""
    states = {common_pb2.MODEL_STATE_SERVING: "serving", common_pb2.MODEL_STATE_FAILED: "failed"}
    return [(s.variant_id, states.get(s.state, str(s.state))) for s in get_device(orchestrator, device_id).models]


def test_delete_variant_still_loading(catalog: OrchestratorThread, open_stream: Callable[..., ControlStream]) -> None:
    device_ids = [f"edge-{i:02d}" for i in range(7)]
    for device_id in device_ids:
        _, key = register(catalog.agent, device_id)
        deploy(catalog, device_id, SOURCE)
        stream = open_stream(catalog.agent)
        stream.hello(device_id, key, generation=get_device(catalog, device_id).desired_generation)
        # The devices still report the variant that they ran before their desired state changed.
        report(catalog, stream, device_id, {FP32: common_pb2.MODEL_STATE_LOADING})

    error = rejection(catalog, variant_id=FP32)
    details = error.details() or ""

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "7 devices report serving or loading it" in details
    assert f"edge-04 (loading {FP32}) and 2 more" in details
    assert "edge-05" not in details
    assert variant_ids(catalog) == [FP32, SOURCE]
    assert artifact_exists(catalog, digest_of(catalog, FP32))


def test_delete_ignores_failed_report(catalog: OrchestratorThread, open_stream: Callable[..., ControlStream]) -> None:
    upload(catalog, linear_onnx(2), "linear", "2")
    device_id, key = register(catalog.agent, "edge-01")
    deploy(catalog, device_id, "linear:2:source", version="2")
    stream = open_stream(catalog.agent)
    stream.hello(device_id, key, generation=get_device(catalog, device_id).desired_generation)
    report(
        catalog,
        stream,
        device_id,
        {FP32: common_pb2.MODEL_STATE_FAILED, "linear:2:source": common_pb2.MODEL_STATE_SERVING},
    )

    response = delete(catalog)

    assert sorted(response.deleted_variant_ids) == [FP32, SOURCE]


def test_delete_active_rollout(catalog: OrchestratorThread) -> None:
    # Without its engine the rollout stays pending, which is an active state.
    catalog.run(catalog.state.rollout_service.stop())  # type: ignore[union-attr]
    request = operator_pb2.CreateRolloutRequest(
        model_name="linear", model_version="1", wave_percents=[100], budget_ms=100.0
    )
    rollout = catalog.operator.CreateRollout(request, timeout=30)

    error = rejection(catalog, variant_id=FP32)

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rollout.rollout_id in (error.details() or "")
    assert "abort it" in (error.details() or "")
    assert variant_ids(catalog) == [FP32, SOURCE]

    abort = operator_pb2.UpdateRolloutRequest(rollout_id=rollout.rollout_id, action=operator_pb2.ROLLOUT_ACTION_ABORT)
    catalog.operator.UpdateRollout(abort, timeout=30)
    delete(catalog)
    kept = catalog.operator.GetRollout(operator_pb2.GetRolloutRequest(rollout_id=rollout.rollout_id), timeout=30)
    assert kept.state == operator_pb2.ROLLOUT_STATE_ABORTED


def test_delete_active_job(catalog: OrchestratorThread, tmp_path: Path) -> None:
    # Without its runner the job stays queued.
    catalog.state.job_runner.stop()  # type: ignore[union-attr]
    np.savez(tmp_path / "calibration.npz", x=np.zeros((4, 4), np.float32))
    np.savez(tmp_path / "evaluation.npz", x=np.ones((4, 4), np.float32))
    recipe = {
        "quantize": {"calibration": {"npz": str(tmp_path / "calibration.npz")}, "calibration_size": 4},
        "gate": {"evaluation": {"npz": str(tmp_path / "evaluation.npz")}, "max_accuracy_drop": 100.0},
    }
    request = operator_pb2.CreateCompressionJobRequest(model_name="linear", recipe_json=json.dumps(recipe))
    job = catalog.operator.CreateCompressionJob(request, timeout=30)

    error = rejection(catalog)

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert job.job_id in (error.details() or "")
    assert "cancel it" in (error.details() or "")
    assert variant_ids(catalog) == [FP32, SOURCE]

    catalog.operator.CancelCompressionJob(operator_pb2.CancelCompressionJobRequest(job_id=job.job_id), timeout=30)
    assert sorted(delete(catalog).deleted_variant_ids) == [FP32, SOURCE]


def test_delete_unknown_version(catalog: OrchestratorThread) -> None:
    error = rejection(catalog, version="2")

    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "did you mean linear:1" in (error.details() or "")


def test_delete_unknown_variant(catalog: OrchestratorThread) -> None:
    error = rejection(catalog, variant_id="linear:1:onnx-fp16")

    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert FP32 in (error.details() or "")


def test_delete_variant_of_other_version(catalog: OrchestratorThread) -> None:
    upload(catalog, linear_onnx(2), "linear", "2")

    error = rejection(catalog, version="2", variant_id=FP32)

    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert variant_ids(catalog) == [FP32, SOURCE]


def test_delete_empty_version(catalog: OrchestratorThread) -> None:
    error = rejection(catalog, version="")

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "linear:VERSION" in (error.details() or "")
    assert variant_ids(catalog) == [FP32, SOURCE]


# Artifact store


def test_artifact_delete(tmp_path: Path) -> None:
    store = FileArtifactStore(tmp_path / "artifacts")
    source = tmp_path / "blob"
    source.write_bytes(b"content")
    digest = store.put_file(source)

    assert store.delete(digest) is True
    assert not store.exists(digest)
    assert store.delete(digest) is False


# CLI


def test_cli_delete_json(catalog: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(catalog, "models", "delete", "linear:1", "--variant", FP32, "--output", "json")
    result = json.loads(capsys.readouterr().out)

    assert code == 0
    assert result["deleted_variant_ids"] == [FP32]
    assert len(result["removed_digests"]) == 1


def test_cli_delete_table(catalog: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(catalog, "models", "delete", "linear:1")
    out = capsys.readouterr().out

    assert code == 0
    assert "deleted from linear:1" in out
    assert f"variant   {SOURCE}" in out
    assert "artifact  sha256:" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["linear"], 2),
        (["linear:9"], 3),
        (["linear:1", "--variant", "linear:1:nope"], 3),
        (["linear:1", "--variant", SOURCE], 4),
    ],
)
def test_cli_delete_exit_codes(catalog: OrchestratorThread, args: list[str], expected: int) -> None:
    assert run_cli(catalog, "models", "delete", *args) == expected
