"""Compression jobs: the job store, data sources, and real jobs run by a real orchestrator's worker processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgefleet.common.models import ModelMetadata, TensorSpec
from edgefleet.orchestrator.compress.recipe import DataSource
from edgefleet.orchestrator.domain import ModelVersion, Variant
from edgefleet.orchestrator.jobs import sources
from edgefleet.orchestrator.jobs.runner import JobRunner, RunnerConfig
from edgefleet.orchestrator.jobs.store import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Job,
    SqlJobStore,
    open_job_store,
)
from edgefleet.orchestrator.store import AlreadyExistsError, open_store
from edgefleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc
from tests.servers import OrchestratorThread, agent_hardware, orchestrator_config, register, upload

pytest_plugins = ["tests.servers"]

REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 120.0
DEMO = {"images": "builtin:demo-photos"}


def tiny_conv_onnx(seed: int = 0, size: int = 224, layout: str = "NCHW") -> bytes:
    """Return a small image classifier: (N, 3, size, size) -> strided Conv -> ReLU -> pool -> Gemm -> (N, 10).

    With layout "NHWC" the input is (N, size, size, 3), transposed to NCHW before the Conv, as in models
    converted from TFLite.
    """
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((8, 3, 4, 4)).astype(np.float32) * 0.3
    fc = rng.standard_normal((10, 8)).astype(np.float32)
    conv_input = "nchw" if layout == "NHWC" else "input"
    nodes = [
        helper.make_node("Conv", [conv_input, "w"], ["conv"], strides=[4, 4]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1),
    ]
    if layout == "NHWC":
        nodes.insert(0, helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]))
        input_shape: list[str | int] = ["batch", size, size, 3]
    else:
        input_shape = ["batch", 3, size, size]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [
            helper.make_tensor("w", TensorProto.FLOAT, weight.shape, weight.ravel().tolist()),
            helper.make_tensor("fc", TensorProto.FLOAT, fc.shape, fc.ravel().tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def truncated_png() -> bytes:
    """Return the first 60 bytes of a PNG: Pillow reads its header but fails to decode its pixels."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()[:60]


def create(server: OrchestratorThread, recipe: dict[str, Any], model: str = "tiny") -> operator_pb2.CompressionJob:
    request = operator_pb2.CreateCompressionJobRequest(model_name=model, recipe_json=json.dumps(recipe))
    return server.operator.CreateCompressionJob(request, timeout=30)


def wait_job(
    operator: operator_pb2_grpc.OperatorServiceStub,
    job_id: str,
    until: Callable[[operator_pb2.CompressionJob], bool] | None = None,
    timeout_s: float = JOB_TIMEOUT_S,
) -> operator_pb2.CompressionJob:
    """Poll a job until until(job) is true (default: the job finished); fail after timeout_s."""
    done = until or (
        lambda j: (
            j.state
            in (operator_pb2.JOB_STATE_SUCCEEDED, operator_pb2.JOB_STATE_FAILED, operator_pb2.JOB_STATE_CANCELLED)
        )
    )
    deadline = time.monotonic() + timeout_s
    while True:
        job = operator.GetCompressionJob(operator_pb2.GetCompressionJobRequest(job_id=job_id), timeout=30)
        if done(job):
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} still {job.state} ({job.stage}) after {timeout_s:g} s")
        time.sleep(0.2)


def variants_of(server_operator: operator_pb2_grpc.OperatorServiceStub, model: str) -> list[operator_pb2.Variant]:
    request = operator_pb2.ListVariantsRequest(model_name=model)
    return list(server_operator.ListVariants(request, timeout=30).variants)


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def _fast_recipe(**gate: Any) -> dict[str, Any]:
    return {"quantize": {"calibration": DEMO, "calibration_size": 4}, "gate": {"max_accuracy_drop": 100.0, **gate}}


@dataclass(frozen=True)
class TinyJobs:
    """One orchestrator with the tiny classifier and the jobs that the module's tests inspect."""

    server: OrchestratorThread
    accepted: operator_pb2.CompressionJob
    rejected: operator_pb2.CompressionJob
    failed: operator_pb2.CompressionJob
    cancelled: operator_pb2.CompressionJob  # Cancelled while queued behind the others.
    variants_after_failure: tuple[str, ...]


@pytest.fixture(scope="module")
def tiny_jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyJobs]:
    """Run the module's jobs once on a real orchestrator on SQLite; each job runs in a worker process."""
    tmp_path = tmp_path_factory.mktemp("jobs")
    server = OrchestratorThread(orchestrator_config(tmp_path))
    try:
        upload(server, tiny_conv_onnx(), "tiny", "1")
        # The request reads only image headers; the worker fails to decode this truncated PNG.
        undecodable = tmp_path / "undecodable"
        undecodable.mkdir()
        (undecodable / "broken.png").write_bytes(truncated_png())
        failed = create(server, _fast_recipe(evaluation={"images": str(undecodable)}))
        queued = create(server, _fast_recipe())
        cancelled = server.operator.CancelCompressionJob(
            operator_pb2.CancelCompressionJobRequest(job_id=queued.job_id), timeout=30
        )
        failed = wait_job(server.operator, failed.job_id)
        kinds = tuple(v.kind for v in variants_of(server.operator, "tiny"))
        accepted = create(server, _fast_recipe())
        # An upload with other weights disagrees with the source on some of 16 noise samples.
        upload(server, tiny_conv_onnx(seed=3), "tiny", "1", variant_kind="distilled")
        np.savez(tmp_path / "noise.npz", input=np.random.default_rng(5).standard_normal((16, 3, 224, 224), np.float32))
        evaluation = {"npz": str(tmp_path / "noise.npz")}
        rejected = create(
            server, {"gate": {"variant": "tiny:1:distilled", "evaluation": evaluation, "max_accuracy_drop": 0.0}}
        )
        yield TinyJobs(
            server,
            wait_job(server.operator, accepted.job_id),
            wait_job(server.operator, rejected.job_id),
            failed,
            cancelled,
            kinds,
        )
    finally:
        server.stop()


@pytest.fixture
def tiny(tiny_jobs: TinyJobs) -> OrchestratorThread:
    """The module's orchestrator, with tiny:1 uploaded."""
    return tiny_jobs.server


# The job store, on SQLite and PostgreSQL.


def _metadata() -> ModelMetadata:
    spec = TensorSpec("input", "float32", (1, 3, 224, 224))
    return ModelMetadata("onnx", (spec,), (TensorSpec("logits", "float32", (1, 10)),), 17, 10, 100, 1000)


def _job(job_id: str, created_at: datetime) -> Job:
    return Job(job_id, "m", "1", "m:1:source", "sha256:" + "0" * 64, "onnx", "{}", created_at, created_at)


def _variant(variant_id: str, status: str = "accepted") -> Variant:
    return Variant(variant_id, "m", "1", "int8", "onnx", "int8", "sha256:" + "1" * 64, 10, _metadata(), status=status)


@pytest.fixture
def job_store(db_url: str) -> Iterator[SqlJobStore]:
    store = open_store(db_url)
    now = datetime.now(UTC)
    store.add_model_version(
        ModelVersion("m", "1", "sha256:" + "0" * 64, 10, _metadata(), now),
        Variant("m:1:source", "m", "1", "source", "onnx", "fp32", "sha256:" + "0" * 64, 10, _metadata()),
    )
    store.close()
    jobs = open_job_store(db_url)
    yield jobs
    jobs.close()


def test_store_claim_oldest(job_store: SqlJobStore) -> None:
    now = datetime.now(UTC)
    job_store.add_job(_job("b", now))
    job_store.add_job(_job("a", now - timedelta(seconds=5)))
    claimed = job_store.claim_next("host:1", now)
    assert claimed is not None and (claimed.job_id, claimed.state, claimed.attempt) == ("a", RUNNING, 1)


def test_store_claim_empty(job_store: SqlJobStore) -> None:
    assert job_store.claim_next("host:1", datetime.now(UTC)) is None


def test_store_finish_stores_variants(job_store: SqlJobStore, db_url: str) -> None:
    now = datetime.now(UTC)
    job_store.add_job(_job("a", now))
    job_store.claim_next("host:1", now)
    assert job_store.finish("a", 1, [_variant("m:1:int8-a"), _variant("m:1:fp16-a", "rejected")], now)
    store = open_store(db_url)
    try:
        stored = {v.variant_id: v.status for v in store.list_variants("m")}
    finally:
        store.close()
    assert stored == {"m:1:source": "accepted", "m:1:int8-a": "accepted", "m:1:fp16-a": "rejected"}


def test_store_finish_sets_state(job_store: SqlJobStore) -> None:
    now = datetime.now(UTC)
    job_store.add_job(_job("a", now))
    job_store.claim_next("host:1", now)
    job_store.finish("a", 1, [_variant("m:1:int8-a")], now)
    job = job_store.get_job("a")
    assert job.state == SUCCEEDED
    assert job.progress == 1.0
    assert job.variant_ids == ("m:1:int8-a",)


def test_store_finish_after_cancel(job_store: SqlJobStore, db_url: str) -> None:
    now = datetime.now(UTC)
    job_store.add_job(_job("a", now))
    job_store.claim_next("host:1", now)
    job_store.cancel("a", now)
    assert not job_store.finish("a", 1, [_variant("m:1:int8-a")], now)
    store = open_store(db_url)
    try:
        assert [v.variant_id for v in store.list_variants("m")] == ["m:1:source"]
    finally:
        store.close()


def test_store_finish_duplicate_rolls_back(job_store: SqlJobStore) -> None:
    now = datetime.now(UTC)
    job_store.add_job(_job("a", now))
    job_store.claim_next("host:1", now)
    with pytest.raises(AlreadyExistsError):
        job_store.finish("a", 1, [_variant("m:1:int8-a"), _variant("m:1:source")], now)
    assert job_store.get_job("a").state == RUNNING


def test_store_requeue_fences_old_attempt(job_store: SqlJobStore) -> None:
    now = datetime.now(UTC)
    job_store.add_job(_job("a", now))
    job_store.claim_next("host:1", now)
    job_store.requeue("a", 1, "test", now)
    job_store.claim_next("host:2", now)
    assert not job_store.report_progress("a", 1, 0.5, "old attempt", now)


def test_store_cancel_queued(job_store: SqlJobStore) -> None:
    now = datetime.now(UTC)
    job_store.add_job(_job("a", now))
    job, changed = job_store.cancel("a", now)
    assert job.state == CANCELLED
    assert changed


def test_store_cancel_finished_unchanged(job_store: SqlJobStore) -> None:
    now = datetime.now(UTC)
    job_store.add_job(_job("a", now))
    job_store.claim_next("host:1", now)
    job_store.fail("a", 1, "broken", now)
    _, changed = job_store.cancel("a", now)
    assert not changed


def test_store_list_filters(job_store: SqlJobStore) -> None:
    now = datetime.now(UTC)
    job_store.add_job(_job("a", now))
    job_store.add_job(_job("b", now + timedelta(seconds=1)))
    job_store.claim_next("host:1", now)
    assert [j.job_id for j in job_store.list_jobs("m", [QUEUED])] == ["b"]


def _runner(job_store: SqlJobStore, tmp_path: Path) -> JobRunner:
    return JobRunner(job_store, RunnerConfig(db_url="", artifacts_root=tmp_path, work_root=tmp_path, lease_s=60.0))


def test_recover_dead_owner(job_store: SqlJobStore, tmp_path: Path) -> None:
    exited = subprocess.Popen(["true"])
    exited.wait()  # Its pid now belongs to no process.
    dead_pid = exited.pid
    now = datetime.now(UTC)
    job_store.add_job(_job("a", now))
    job_store.claim_next(f"{socket.gethostname()}:{dead_pid}:0", now)
    assert _runner(job_store, tmp_path).recover() == ["a"]


def test_worker_losing_database_fails_at_limit(job_store: SqlJobStore, tmp_path: Path) -> None:
    """A worker that cannot reach the database while the runner can is requeued a bounded number of times."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # Nothing listens on it once the socket closes.
    unreachable = f"postgresql+psycopg://edgefleet@127.0.0.1:{closed_port}/absent"
    config = RunnerConfig(
        db_url=unreachable,
        artifacts_root=tmp_path,
        work_root=tmp_path,
        poll_interval_s=0.1,
        max_database_losses=2,
    )
    job_store.add_job(_job("a", datetime.now(UTC)))
    runner = JobRunner(job_store, config)
    runner.start()
    try:
        deadline = time.monotonic() + 120
        while job_store.get_job("a").state in (QUEUED, RUNNING) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        runner.stop()

    job = job_store.get_job("a")
    assert job.state == FAILED
    assert job.attempt == 2
    assert "the workers of 2 attempts in a row lost the database" in job.error


def test_recover_live_owner_kept(job_store: SqlJobStore, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    job_store.add_job(_job("a", now))
    job_store.claim_next(f"{socket.gethostname()}:{os.getppid()}:0", now)
    assert _runner(job_store, tmp_path).recover() == []


def test_recover_stale_heartbeat(job_store: SqlJobStore, tmp_path: Path) -> None:
    long_ago = datetime.now(UTC) - timedelta(minutes=5)
    job_store.add_job(_job("a", long_ago))
    job_store.claim_next("other-host:1:0", long_ago)
    assert _runner(job_store, tmp_path).recover() == ["a"]


def _old_work_dir(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "int8.onnx").write_bytes(b"half-written")
    past = time.time() - 60
    os.utime(folder, (past, past))
    return folder


def test_recover_removes_dead_attempt_dir(job_store: SqlJobStore, tmp_path: Path) -> None:
    exited = subprocess.Popen(["true"])
    exited.wait()
    now = datetime.now(UTC)
    job_store.add_job(_job("a", now))
    job_store.claim_next(f"{socket.gethostname()}:{exited.pid}:0", now)
    work_root = tmp_path / "jobs"
    work_root.mkdir()
    dead = _old_work_dir(work_root, "a-1")
    unrelated = _old_work_dir(work_root, "not a work dir")

    _runner(job_store, work_root).recover()

    assert not dead.exists()
    assert unrelated.exists()


def test_recover_keeps_running_attempt_dir(job_store: SqlJobStore, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    job_store.add_job(_job("a", now))
    job_store.claim_next(f"{socket.gethostname()}:{os.getppid()}:0", now)
    work_root = tmp_path / "jobs"
    work_root.mkdir()
    running = _old_work_dir(work_root, "a-1")
    earlier_attempt = _old_work_dir(work_root, "a-0")

    _runner(job_store, work_root).recover()

    assert running.exists()
    assert not earlier_attempt.exists()


# Data sources.


def test_sources_suffixes_match_calibration() -> None:
    from edgefleet.orchestrator.compress.calibration import IMAGE_SUFFIXES

    assert sources.IMAGE_SUFFIXES == IMAGE_SUFFIXES


def test_sources_demo_photos_disjoint() -> None:
    from edgefleet.demo.images import demo_photos

    calibration, evaluation = sources.split_demo_photos(demo_photos())
    assert not {p.name for p in calibration} & {p.name for p in evaluation}


def test_sources_digits_split() -> None:
    spec = TensorSpec("input", "float32", (-1, 1, 8, 8))
    calibration = sources.load_samples(DataSource(images="builtin:digits"), "c", "calibration", spec)
    evaluation = sources.load_samples(DataSource(images="builtin:digits"), "e", "evaluation", spec)
    assert calibration.inputs.shape[0] == 1347
    assert evaluation.inputs.shape[0] == 450


def test_sources_demo_photos_count() -> None:
    spec = TensorSpec("input", "float32", (1, 3, 224, 224))
    samples = sources.load_samples(DataSource(images="builtin:demo-photos"), "c", "calibration", spec, 6)
    assert samples.inputs.shape == (6, 3, 224, 224)


# Creating jobs: recipes and sources that are checked up front.


@pytest.mark.parametrize(
    ("recipe", "named"),
    [
        ({"quantize": {"calibration": DEMO, "colour": 1}}, "quantize.colour"),
        ({"quantize": {"calibration": DEMO, "calibration_size": 0}}, "quantize.calibration_size"),
        ({"gate": {"max_accuracy_drop": -1}, "quantize": {"calibration": DEMO}}, "gate.max_accuracy_drop"),
        ({"quantise": {}}, "quantise"),
        ({"quantize": {}}, "quantize.calibration"),
        ({"prune": {}}, "prune"),
        ({"quantize": {"calibration": {"images": "builtin:cats"}}}, "builtin:cats"),
        ({"quantize": {"calibration": {"images": "/no/such/folder"}}}, "/no/such/folder"),
        ({"quantize": {"calibration": {"images": "relative/folder"}}}, "relative/folder"),
        ({"quantize": {"calibration": {"images": "builtin:digits"}}}, "builtin:digits"),
        ({"quantize": {"calibration": DEMO, "gate": 1}}, "quantize.gate"),
        ({"quantize": {"method": "dynamic"}, "gate": {"evaluation": DEMO}}, "'dynamic' does not suit this model"),
    ],
    ids=[
        "unknown-key",
        "size-zero",
        "negative-drop",
        "unknown-section",
        "no-calibration",
        "prune-onnx",
        "unknown-builtin",
        "missing-folder",
        "relative-folder",
        "digits-rgb-model",
        "misplaced-key",
        "dynamic-conv-net",
    ],
)
def test_create_rejects(tiny: OrchestratorThread, recipe: dict[str, Any], named: str) -> None:
    error = rpc_error(lambda: create(tiny, recipe))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in (error.details() or "")


def test_create_empty_folder(tiny: OrchestratorThread, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    error = rpc_error(lambda: create(tiny, {"quantize": {"calibration": {"images": str(tmp_path / "empty")}}}))
    assert "contains no images" in (error.details() or "")


def test_create_npz_wrong_shape(tiny: OrchestratorThread, tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", input=np.zeros((4, 3, 32, 32), np.float32))
    error = rpc_error(lambda: create(tiny, {"quantize": {"calibration": {"npz": str(tmp_path / "c.npz")}}}))
    assert "axis 2 is 32" in (error.details() or "")


def test_create_npz_wrong_dtype(tiny: OrchestratorThread, tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", input=np.zeros((4, 3, 224, 224), np.float64))
    error = rpc_error(lambda: create(tiny, {"quantize": {"calibration": {"npz": str(tmp_path / "c.npz")}}}))
    assert "float64" in (error.details() or "")


def test_create_npz_nan(tiny: OrchestratorThread, tmp_path: Path) -> None:
    samples = np.zeros((4, 3, 224, 224), np.float32)
    samples[2, 0, 5, 5] = np.nan
    np.savez(tmp_path / "c.npz", input=samples)
    error = rpc_error(lambda: create(tiny, {"quantize": {"calibration": {"npz": str(tmp_path / "c.npz")}}}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN or infinite values in 1 of 4 samples (the first is sample 2)" in (error.details() or "")


def test_create_preprocess_size(tiny: OrchestratorThread) -> None:
    calibration = {"images": "builtin:demo-photos", "preprocess": {"height": 160}}
    error = rpc_error(lambda: create(tiny, {"quantize": {"calibration": calibration}}))
    assert "preprocess.height" in (error.details() or "")


def test_create_unknown_model(tiny: OrchestratorThread) -> None:
    error = rpc_error(lambda: create(tiny, {"quantize": {"calibration": DEMO}}, model="nope"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


# Jobs that run.


def _variant_of(tiny_jobs: TinyJobs, job: operator_pb2.CompressionJob) -> operator_pb2.Variant:
    return next(v for v in variants_of(tiny_jobs.server.operator, "tiny") if v.variant_id in job.variant_ids)


def test_job_accepted(tiny_jobs: TinyJobs) -> None:
    assert tiny_jobs.accepted.state == operator_pb2.JOB_STATE_SUCCEEDED, tiny_jobs.accepted.error


def test_job_accepted_variant(tiny_jobs: TinyJobs) -> None:
    variant = _variant_of(tiny_jobs, tiny_jobs.accepted)
    assert variant.status == "accepted"
    assert variant.kind == "int8"
    assert variant.format == common_pb2.MODEL_FORMAT_ONNX


def test_job_variant_latency(tiny_jobs: TinyJobs) -> None:
    assert sorted(_variant_of(tiny_jobs, tiny_jobs.accepted).latency_ms) == ["threads=1", "threads=2"]


def test_job_variant_evaluation_samples(tiny_jobs: TinyJobs) -> None:
    assert _variant_of(tiny_jobs, tiny_jobs.accepted).evaluation_samples == sources.DEMO_EVAL_CROPS * 4


def test_job_variant_source_latency(tiny_jobs: TinyJobs) -> None:
    """The source's p50 from the same gate run is stored, so the speed-up is measured, not assumed."""
    variant = _variant_of(tiny_jobs, tiny_jobs.accepted)
    assert sorted(variant.source_latency_ms) == ["threads=1", "threads=2"]
    assert all(value > 0 for value in variant.source_latency_ms.values())


def test_job_variant_figures(tiny_jobs: TinyJobs) -> None:
    variant = _variant_of(tiny_jobs, tiny_jobs.accepted)
    assert variant.metadata.macs > 0
    assert variant.size_bytes > 0
    assert 0.0 <= variant.accuracy <= 1.0
    assert variant.accuracy_metric == "top1_agreement"
    assert variant.parent_variant_id == "tiny:1:source"


def test_job_rejected_stored(tiny_jobs: TinyJobs) -> None:
    variant = _variant_of(tiny_jobs, tiny_jobs.rejected)
    assert variant.status == "rejected"
    assert "exceeds max_accuracy_drop 0" in variant.rejection_reason


def test_job_rejected_not_deployable(tiny_jobs: TinyJobs) -> None:
    server = tiny_jobs.server
    device_id, _ = register(server.agent)
    request = operator_pb2.DeployRequest(
        model_name="tiny", device_id=device_id, variant_id=tiny_jobs.rejected.variant_ids[0]
    )
    error = rpc_error(lambda: server.operator.Deploy(request, timeout=30))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


# Uploaded pruned and distilled variants wait for a gate job.


@dataclass(frozen=True)
class GatedUploads:
    """An orchestrator with tiny:1, its pruned and distilled uploads, and an evaluation set for them."""

    server: OrchestratorThread
    evaluation: dict[str, str]  # An npz source labelled with the source model's own predictions.
    device_id: str


@pytest.fixture
def gated_uploads(start_orchestrator: Callable[..., OrchestratorThread], tmp_path: Path) -> GatedUploads:
    import onnxruntime

    server = start_orchestrator()
    upload(server, tiny_conv_onnx(), "tiny", "1")
    upload(server, tiny_conv_onnx(seed=0), "tiny", "1", variant_kind="pruned")
    upload(server, tiny_conv_onnx(seed=3), "tiny", "1", variant_kind="distilled")
    samples = np.random.default_rng(5).standard_normal((16, 3, 224, 224)).astype(np.float32)
    session = onnxruntime.InferenceSession(tiny_conv_onnx(), providers=["CPUExecutionProvider"])
    labels = session.run(None, {"input": samples})[0].argmax(axis=1).astype(np.int64)
    np.savez(tmp_path / "eval.npz", input=samples)
    np.save(tmp_path / "labels.npy", labels)
    device_id, _ = register(server.agent)
    evaluation = {"npz": str(tmp_path / "eval.npz"), "labels": str(tmp_path / "labels.npy")}
    return GatedUploads(server, evaluation, device_id)


def variant_by_id(server: OrchestratorThread, variant_id: str) -> operator_pb2.Variant:
    return next(v for v in variants_of(server.operator, "tiny") if v.variant_id == variant_id)


def deploy_request(uploads: GatedUploads, variant_id: str) -> operator_pb2.DeployRequest:
    return operator_pb2.DeployRequest(
        model_name="tiny", model_version="1", device_id=uploads.device_id, variant_id=variant_id
    )


def test_upload_pruned_pending(gated_uploads: GatedUploads) -> None:
    server = gated_uploads.server

    pruned = variant_by_id(server, "tiny:1:pruned")
    error = rpc_error(lambda: server.operator.Deploy(deploy_request(gated_uploads, "tiny:1:pruned"), timeout=30))

    assert pruned.status == "pending"
    assert "accuracy is unmeasured" in pruned.rejection_reason
    assert "edgefleet models compress tiny:1 --gate tiny:1:pruned --evaluation SOURCE" in pruned.rejection_reason
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "variant tiny:1:pruned is pending" in (error.details() or "")


def test_upload_second_pruned_message(gated_uploads: GatedUploads) -> None:
    """A version can have one uploaded variant per kind, and the error names the two ways out."""
    server = gated_uploads.server

    error = rpc_error(lambda: upload(server, tiny_conv_onnx(seed=7), "tiny", "1", variant_kind="pruned"))

    details = error.details() or ""
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "'tiny:1:pruned' already exists: a model version can have one uploaded variant of each kind" in details
    assert "edgefleet models delete tiny:1 --variant tiny:1:pruned" in details
    assert "choose another id" not in details


def test_gate_job_accepts_upload(gated_uploads: GatedUploads) -> None:
    server = gated_uploads.server
    # One of the 16 samples is worth 6.25 points, the smallest limit that they can measure.
    recipe = {"gate": {"variant": "tiny:1:pruned", "evaluation": gated_uploads.evaluation, "max_accuracy_drop": 6.25}}

    job = wait_job(server.operator, create(server, recipe).job_id)

    assert job.state == operator_pb2.JOB_STATE_SUCCEEDED, job.error
    assert list(job.variant_ids) == ["tiny:1:pruned"]
    pruned = variant_by_id(server, "tiny:1:pruned")
    assert pruned.status == "accepted"
    assert pruned.accuracy == 1.0
    assert pruned.accuracy_metric == "top1"
    assert sorted(pruned.latency_ms) == ["threads=1", "threads=2"]
    assert sorted(pruned.source_latency_ms) == ["threads=1", "threads=2"]
    assert pruned.parent_variant_id == "tiny:1:source"
    assert [v.kind for v in variants_of(server.operator, "tiny")].count("pruned") == 1
    server.operator.Deploy(deploy_request(gated_uploads, "tiny:1:pruned"), timeout=30)


def test_gate_job_with_labels_stores_source_accuracy(gated_uploads: GatedUploads) -> None:
    """The source's top-1 that a labelled gate measured ranks it against its lossy variants."""
    server = gated_uploads.server
    recipe = {
        "gate": {"variant": "tiny:1:distilled", "evaluation": gated_uploads.evaluation, "max_accuracy_drop": 100}
    }

    job = wait_job(server.operator, create(server, recipe).job_id)
    explained = server.operator.ExplainSelection(
        operator_pb2.ExplainSelectionRequest(model_name="tiny", model_version="1", device_id=gated_uploads.device_id),
        timeout=30,
    )

    assert job.state == operator_pb2.JOB_STATE_SUCCEEDED, job.error
    source = variant_by_id(server, "tiny:1:source")
    distilled = variant_by_id(server, "tiny:1:distilled")
    # The labels are the source's own top-1, so the source scores 1.0 and the other model less.
    assert (source.accuracy, source.accuracy_metric) == (1.0, "top1")
    assert source.evaluation_samples == 16
    assert distilled.evaluation_samples == 16
    assert distilled.status == "accepted"
    assert distilled.accuracy < 1.0
    ranked = {c.variant.variant_id: c.ranked_accuracy for c in explained.candidates}
    assert ranked["tiny:1:source"] == 1.0
    assert distilled.accuracy_drop == pytest.approx((1.0 - distilled.accuracy) * 100.0)
    assert ranked["tiny:1:distilled"] == pytest.approx(distilled.accuracy)
    assert explained.chosen_variant_id == "tiny:1:source"


def test_gate_jobs_store_evaluation_digest(gated_uploads: GatedUploads) -> None:
    """Two gates on the same data store one digest, so selection treats their drops as comparable."""
    server = gated_uploads.server
    for variant_id in ("tiny:1:pruned", "tiny:1:distilled"):
        recipe = {"gate": {"variant": variant_id, "evaluation": gated_uploads.evaluation, "max_accuracy_drop": 100}}
        job = wait_job(server.operator, create(server, recipe).job_id)
        assert job.state == operator_pb2.JOB_STATE_SUCCEEDED, job.error

    pruned = variant_by_id(server, "tiny:1:pruned")
    distilled = variant_by_id(server, "tiny:1:distilled")

    assert pruned.evaluation_digest.startswith("sha256:")
    assert pruned.evaluation_digest == distilled.evaluation_digest
    assert variant_by_id(server, "tiny:1:source").evaluation_digest == ""


def test_gate_job_rejects_too_few_samples(gated_uploads: GatedUploads) -> None:
    """On 16 samples one changed top-1 is 6.25 points, so the request for a 1-point limit is refused."""
    server = gated_uploads.server
    recipe = {"gate": {"variant": "tiny:1:pruned", "evaluation": gated_uploads.evaluation, "max_accuracy_drop": 1}}

    error = rpc_error(lambda: create(server, recipe))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1 points cannot be measured on the 16 evaluation samples" in (error.details() or "")
    assert variant_by_id(server, "tiny:1:pruned").status == "pending"


@pytest.mark.parametrize("kind", ["int8", "fp16"])
def test_upload_lossy_kind_pending(gated_uploads: GatedUploads, kind: str) -> None:
    """Lower precision made outside the orchestrator waits for the gate too, as pruning does."""
    server = gated_uploads.server

    upload(server, tiny_conv_onnx(seed=0), "tiny", "1", variant_kind=kind)

    assert variant_by_id(server, f"tiny:1:{kind}").status == "pending"
    error = rpc_error(lambda: server.operator.Deploy(deploy_request(gated_uploads, f"tiny:1:{kind}"), timeout=30))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_upload_fp32_conversion_accepted(gated_uploads: GatedUploads) -> None:
    server = gated_uploads.server

    upload(server, tiny_conv_onnx(), "tiny", "1", variant_kind="onnx-fp32")

    assert variant_by_id(server, "tiny:1:onnx-fp32").status == "accepted"
    server.operator.Deploy(deploy_request(gated_uploads, "tiny:1:onnx-fp32"), timeout=30)


def test_gate_job_accepts_uploaded_int8(gated_uploads: GatedUploads, tmp_path: Path) -> None:
    """An int8 QDQ file quantized outside the orchestrator is measured and accepted by a gate job."""
    from edgefleet.orchestrator.compress.quantize import quantize_static_qdq

    server = gated_uploads.server
    (tmp_path / "tiny.onnx").write_bytes(tiny_conv_onnx())
    calibration = np.load(gated_uploads.evaluation["npz"])["input"]
    quantize_static_qdq(tmp_path / "tiny.onnx", tmp_path / "tiny-int8.onnx", calibration)
    upload(server, (tmp_path / "tiny-int8.onnx").read_bytes(), "tiny", "1", variant_kind="int8")
    recipe = {"gate": {"variant": "tiny:1:int8", "evaluation": gated_uploads.evaluation, "max_accuracy_drop": 100}}

    job = wait_job(server.operator, create(server, recipe).job_id)

    assert job.state == operator_pb2.JOB_STATE_SUCCEEDED, job.error
    int8 = variant_by_id(server, "tiny:1:int8")
    assert int8.status == "accepted", int8.rejection_reason
    assert int8.accuracy_metric == "top1"
    assert 0.0 <= int8.accuracy <= 1.0
    assert sorted(int8.latency_ms) == ["threads=1", "threads=2"]
    server.operator.Deploy(deploy_request(gated_uploads, "tiny:1:int8"), timeout=30)


def test_delete_variant_queued_gate_job(gated_uploads: GatedUploads) -> None:
    """A queued gate job reads the uploaded variant, so deleting that variant alone is rejected."""
    server = gated_uploads.server
    # Without its runner the job stays queued.
    server.state.job_runner.stop()  # type: ignore[union-attr]
    recipe = {"gate": {"variant": "tiny:1:pruned", "evaluation": gated_uploads.evaluation, "max_accuracy_drop": 10}}
    job = create(server, recipe)
    request = operator_pb2.DeleteModelRequest(name="tiny", version="1", variant_id="tiny:1:pruned")

    error = rpc_error(lambda: server.operator.DeleteModel(request, timeout=30))

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert job.job_id in (error.details() or "")
    assert variant_by_id(server, "tiny:1:pruned").status == "pending"

    server.operator.CancelCompressionJob(operator_pb2.CancelCompressionJobRequest(job_id=job.job_id), timeout=30)
    assert list(server.operator.DeleteModel(request, timeout=30).deleted_variant_ids) == ["tiny:1:pruned"]


def test_gate_job_rejects_upload(gated_uploads: GatedUploads) -> None:
    server = gated_uploads.server
    recipe = {"gate": {"variant": "tiny:1:distilled", "evaluation": gated_uploads.evaluation, "max_accuracy_drop": 0}}

    job = wait_job(server.operator, create(server, recipe).job_id)

    assert job.state == operator_pb2.JOB_STATE_SUCCEEDED, job.error
    distilled = variant_by_id(server, "tiny:1:distilled")
    assert distilled.status == "rejected"
    assert distilled.accuracy < 1.0
    assert "exceeds max_accuracy_drop 0" in distilled.rejection_reason
    error = rpc_error(lambda: server.operator.Deploy(deploy_request(gated_uploads, "tiny:1:distilled"), timeout=30))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("gate", "extra", "code", "expected"),
    [
        ({"variant": "tiny:1:prund"}, {}, grpc.StatusCode.INVALID_ARGUMENT, "did you mean tiny:1:pruned"),
        ({"variant": "tiny:1:source"}, {}, grpc.StatusCode.FAILED_PRECONDITION, "is accepted already"),
        (
            {"variant": "tiny:1:pruned"},
            {"quantize": {"calibration": DEMO}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "remove the [quantize] section",
        ),
        (
            {"variant": "tiny:1:pruned", "evaluation": {}},
            {},
            grpc.StatusCode.INVALID_ARGUMENT,
            "gate.evaluation: no data given",
        ),
    ],
    ids=["unknown", "not-pending", "with-quantize", "no-evaluation"],
)
def test_gate_job_create_rejected(
    gated_uploads: GatedUploads, gate: dict[str, Any], extra: dict[str, Any], code: grpc.StatusCode, expected: str
) -> None:
    server = gated_uploads.server
    recipe = {**extra, "gate": {"evaluation": gated_uploads.evaluation, **gate}}

    error = rpc_error(lambda: create(server, recipe))

    assert error.code() == code
    assert expected in (error.details() or "")
    assert variant_by_id(server, "tiny:1:pruned").status == "pending"


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (np.zeros(4, np.float32), "contains float32 (4,); expected a 1-D integer array"),
        (np.zeros((4, 2), np.int64), "contains int64 (4, 2); expected a 1-D integer array"),
        (None, "as .npy"),
        (np.array([0, 9, -1, 3]), "holds class -1 at sample 2 (1 of 4 labels out of range)"),
        (np.array([0, 10, 12]), "holds class 10 at sample 1 (2 of 3 labels out of range), but the model outputs 10"),
    ],
    ids=["float", "2-d", "not-npy", "negative", "past-classes"],
)
def test_create_rejects_labels(
    tiny: OrchestratorThread, tmp_path: Path, labels: np.ndarray | None, expected: str
) -> None:
    """Labels of the wrong kind are rejected when the job is created, not when it runs."""
    path = tmp_path / "labels.npy"
    if labels is None:
        path.write_text("0,1,2,3\n")
    else:
        np.save(path, labels)
    recipe = {"quantize": {"calibration": DEMO}, "gate": {"evaluation": {**DEMO, "labels": str(path)}}}

    error = rpc_error(lambda: create(tiny, recipe))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "gate.evaluation.labels" in (error.details() or "")
    assert expected in (error.details() or "")


def test_create_rejects_short_labels_npz(tiny: OrchestratorThread, tmp_path: Path) -> None:
    """Fewer labels than .npz samples are found from the two headers when the job is created."""
    np.savez(tmp_path / "eval.npz", input=np.zeros((6, 3, 224, 224), np.float32))
    np.save(tmp_path / "labels.npy", np.zeros(2, np.int64))
    evaluation = {"npz": str(tmp_path / "eval.npz"), "labels": str(tmp_path / "labels.npy")}
    jobs_before = len(tiny.operator.ListCompressionJobs(operator_pb2.ListCompressionJobsRequest(), timeout=30).jobs)

    error = rpc_error(lambda: create(tiny, {**_fast_recipe(), "gate": {"evaluation": evaluation}}))

    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "gate.evaluation.labels" in details
    assert f"'{tmp_path / 'labels.npy'}' has 2 labels for the 6 samples of '{tmp_path / 'eval.npz'}'" in details
    jobs_after = tiny.operator.ListCompressionJobs(operator_pb2.ListCompressionJobsRequest(), timeout=30).jobs
    assert len(jobs_after) == jobs_before


def test_create_rejects_short_labels_folder(tiny: OrchestratorThread, tmp_path: Path) -> None:
    """Fewer labels than images in an evaluation folder are rejected when the job is created."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(3):
        (folder / f"photo{index}.png").write_bytes(truncated_png())  # Never decoded by the request.
    np.save(tmp_path / "labels.npy", np.zeros(2, np.int64))
    evaluation = {"images": str(folder), "labels": str(tmp_path / "labels.npy")}

    error = rpc_error(lambda: create(tiny, {**_fast_recipe(), "gate": {"evaluation": evaluation}}))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"has 2 labels for the 3 samples of '{folder}'" in (error.details() or "")


def _job_count(server: OrchestratorThread) -> int:
    return len(server.operator.ListCompressionJobs(operator_pb2.ListCompressionJobsRequest(), timeout=30).jobs)


def _image_folder(folder: Path, count: int) -> Path:
    from PIL import Image

    folder.mkdir()
    for index in range(count):
        Image.new("RGB", (40, 30), (index * 40, 80, 120)).save(folder / f"{index}.png")
    return folder


@pytest.mark.parametrize("spelling", ["same", "dot-segment", "symlink"])
def test_create_rejects_evaluation_npz_is_calibration(tiny: OrchestratorThread, tmp_path: Path, spelling: str) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, input=np.zeros((2, 3, 224, 224), np.float32))
    evaluation = {
        "same": str(path),
        "dot-segment": f"{tmp_path}/./data.npz",
        "symlink": str(tmp_path / "link.npz"),
    }[spelling]
    (tmp_path / "link.npz").symlink_to(path)
    recipe = {"quantize": {"calibration": {"npz": str(path)}}, "gate": {"evaluation": {"npz": evaluation}}}
    jobs_before = _job_count(tiny)

    error = rpc_error(lambda: create(tiny, recipe))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "gate.evaluation.npz" in (error.details() or "")
    assert "is the calibration data as well" in (error.details() or "")
    assert _job_count(tiny) == jobs_before


def test_create_rejects_evaluation_npz_copy(tiny: OrchestratorThread, tmp_path: Path) -> None:
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, input=np.zeros((2, 3, 224, 224), np.float32))
    copy = tmp_path / "evaluation.npz"
    copy.write_bytes(calibration.read_bytes())
    recipe = {"quantize": {"calibration": {"npz": str(calibration)}}, "gate": {"evaluation": {"npz": str(copy)}}}
    jobs_before = _job_count(tiny)

    error = rpc_error(lambda: create(tiny, recipe))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"gate.evaluation.npz: '{copy}' has the same contents as the calibration file" in (error.details() or "")
    assert _job_count(tiny) == jobs_before


def test_create_rejects_evaluation_folder_is_calibration(tiny: OrchestratorThread, tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "photos", 2)
    recipe = {
        "quantize": {"calibration": {"images": str(folder)}},
        "gate": {"evaluation": {"images": f"{tmp_path}/../{tmp_path.name}/photos/"}},
    }
    jobs_before = _job_count(tiny)

    error = rpc_error(lambda: create(tiny, recipe))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "gate.evaluation.images" in (error.details() or "")
    assert _job_count(tiny) == jobs_before


def test_create_rejects_runtime_of_other_format(tiny: OrchestratorThread) -> None:
    jobs_before = _job_count(tiny)

    error = rpc_error(lambda: create(tiny, _fast_recipe(runtimes=["onnxruntime", "litert"])))

    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'gate.runtimes: ["onnxruntime", "litert"] includes "litert", which cannot load the int8' in details
    assert 'an ONNX model loads on onnxruntime only; set runtimes = ["onnxruntime"]' in details
    assert _job_count(tiny) == jobs_before


def test_create_rejects_undecodable_image(tiny: OrchestratorThread, tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "photos", 2)
    (folder / "notes.png").write_bytes(b"not a PNG image")
    jobs_before = _job_count(tiny)

    error = rpc_error(lambda: create(tiny, {**_fast_recipe(), "gate": {"evaluation": {"images": str(folder)}}}))

    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"gate.evaluation.images: '{folder / 'notes.png'}' is not an image that Pillow can read" in details
    assert _job_count(tiny) == jobs_before


def test_create_undecodable_past_calibration_size(tiny: OrchestratorThread, tmp_path: Path) -> None:
    """Only the images that calibration_size takes are checked, as only those are read."""
    folder = _image_folder(tmp_path / "photos", 2)
    (folder / "z-notes.png").write_bytes(b"not a PNG image")
    recipe = {"quantize": {"calibration": {"images": str(folder)}, "calibration_size": 2}, "gate": {"evaluation": DEMO}}

    upload(tiny, tiny_conv_onnx(seed=4), "tinycal", "1")

    job = create(tiny, recipe, model="tinycal")

    tiny.operator.CancelCompressionJob(operator_pb2.CancelCompressionJobRequest(job_id=job.job_id), timeout=60)
    assert job.state == operator_pb2.JOB_STATE_QUEUED


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("photo", "did you mean photos in"),
        ("demo-photo", 'did you mean the built-in source demo-photos (images = "builtin:demo-photos" in a recipe)?'),
    ],
)
def test_create_missing_folder_hint(tiny: OrchestratorThread, tmp_path: Path, name: str, hint: str) -> None:
    _image_folder(tmp_path / "photos", 1)

    error = rpc_error(lambda: create(tiny, {"quantize": {"calibration": {"images": str(tmp_path / name)}}}))

    assert f"folder '{tmp_path / name}' not found" in (error.details() or "")
    assert hint in (error.details() or "")


def test_create_recipe_without_variant(tiny: OrchestratorThread) -> None:
    error = rpc_error(lambda: create(tiny, {"gate": {"evaluation": DEMO}}))

    assert (error.details() or "").startswith("invalid recipe: produces no variant")


def test_check_apart_warns_on_shared_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    calibration = _image_folder(tmp_path / "calibration", 3)
    evaluation = _image_folder(tmp_path / "evaluation", 0)
    (evaluation / "copy.png").write_bytes((calibration / "1.png").read_bytes())
    (evaluation / "other.png").write_bytes((calibration / "2.png").read_bytes()[:-1] + b"\0")

    with caplog.at_level("WARNING", logger="edgefleet.orchestrator.jobs.sources"):
        sources.check_apart(DataSource(images=str(calibration)), DataSource(images=str(evaluation)), "gate.evaluation")

    assert len(caplog.records) == 1
    assert "1 of the images in" in caplog.records[0].getMessage()
    assert "(the first is copy.png)" in caplog.records[0].getMessage()


def test_check_apart_builtin_passes() -> None:
    sources.check_apart(DataSource(images="builtin:demo-photos"), DataSource(images="builtin:demo-photos"), "gate")


def test_check_source_labels_limit(tmp_path: Path) -> None:
    """A calibration folder read up to a limit needs labels only for the images it reads."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(5):
        (folder / f"photo{index}.png").write_bytes(truncated_png())
    np.save(tmp_path / "labels.npy", np.zeros(3, np.int64))
    source = DataSource(images=str(folder), labels=str(tmp_path / "labels.npy"))
    spec = TensorSpec("input", "float32", (-1, 3, 224, 224))

    assert sources.check_source(source, "quantize.calibration", [spec], limit=3) == spec
    with pytest.raises(sources.SourceError, match="has 3 labels for the 5 samples"):
        sources.check_source(source, "quantize.calibration", [spec])


def test_job_undecodable_image_fails(tiny_jobs: TinyJobs) -> None:
    failed = tiny_jobs.failed
    assert failed.state == operator_pb2.JOB_STATE_FAILED
    assert "gate.evaluation.images" in failed.error
    assert "broken.png" in failed.error


def test_job_failed_stores_no_variant(tiny_jobs: TinyJobs) -> None:
    assert tiny_jobs.variants_after_failure == ("source",)


def test_cancel_queued(tiny_jobs: TinyJobs) -> None:
    assert tiny_jobs.cancelled.state == operator_pb2.JOB_STATE_CANCELLED


def test_cancel_cancelled_again(tiny_jobs: TinyJobs) -> None:
    request = operator_pb2.CancelCompressionJobRequest(job_id=tiny_jobs.cancelled.job_id)

    job = tiny_jobs.server.operator.CancelCompressionJob(request, timeout=30)

    assert job.state == operator_pb2.JOB_STATE_CANCELLED
    assert job.updated_at == tiny_jobs.cancelled.updated_at


def test_cancel_finished(tiny_jobs: TinyJobs) -> None:
    request = operator_pb2.CancelCompressionJobRequest(job_id=tiny_jobs.accepted.job_id)
    error = rpc_error(lambda: tiny_jobs.server.operator.CancelCompressionJob(request, timeout=30))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_list_jobs(tiny_jobs: TinyJobs) -> None:
    listed = tiny_jobs.server.operator.ListCompressionJobs(
        operator_pb2.ListCompressionJobsRequest(model_name="tiny"), timeout=30
    )
    assert len(listed.jobs) == 4


def test_get_unknown_job(tiny: OrchestratorThread) -> None:
    request = operator_pb2.GetCompressionJobRequest(job_id="0123456789ab")
    error = rpc_error(lambda: tiny.operator.GetCompressionJob(request, timeout=30))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_server_process_without_worker(tiny_jobs: TinyJobs) -> None:
    # The jobs ran in worker processes; the runner never imports the worker module (and with it
    # onnxruntime's quantizer) into the orchestrator process.
    assert "edgefleet.orchestrator.jobs.worker" not in sys.modules


def test_job_folder_and_npz(start_orchestrator: Callable[..., OrchestratorThread], tmp_path: Path) -> None:
    from PIL import Image

    from edgefleet.demo.images import demo_photos

    server = start_orchestrator()
    upload(server, tiny_conv_onnx(), "tiny", "1")
    folder = tmp_path / "images"
    folder.mkdir()
    for photo in demo_photos()[:3]:
        Image.fromarray(photo.image).save(folder / f"{photo.name}.png")
    np.savez(tmp_path / "eval.npz", input=np.random.default_rng(0).standard_normal((6, 3, 224, 224), np.float32))
    recipe = {
        "quantize": {"calibration": {"images": str(folder)}},
        "gate": {"evaluation": {"npz": str(tmp_path / "eval.npz")}, "max_accuracy_drop": 100.0},
    }
    job = wait_job(server.operator, create(server, recipe).job_id)
    assert job.state == operator_pb2.JOB_STATE_SUCCEEDED, job.error


def test_job_folder_takes_input_size(start_orchestrator: Callable[..., OrchestratorThread], tmp_path: Path) -> None:
    from PIL import Image

    from edgefleet.demo.images import demo_photos

    server = start_orchestrator()
    upload(server, tiny_conv_onnx(size=32), "tiny32", "1")
    photos = demo_photos()
    for name, chosen in (("calibration", photos[:2]), ("evaluation", photos[2:4])):
        (tmp_path / name).mkdir()
        for photo in chosen:
            Image.fromarray(photo.image).save(tmp_path / name / f"{photo.name}.png")
    # No preprocess section: the images are resized to the model's 32x32 input, not the 224x224 default.
    recipe = {
        "quantize": {"calibration": {"images": str(tmp_path / "calibration")}},
        "gate": {"evaluation": {"images": str(tmp_path / "evaluation")}, "max_accuracy_drop": 100.0},
    }

    job = wait_job(server.operator, create(server, recipe, model="tiny32").job_id)

    assert job.state == operator_pb2.JOB_STATE_SUCCEEDED, job.error
    assert json.loads(job.recipe_json) == recipe


def test_job_nhwc_takes_input_layout(start_orchestrator: Callable[..., OrchestratorThread]) -> None:
    """The recipe of `models compress --int8 --calibration demo-photos` calibrates an NHWC model."""
    server = start_orchestrator()
    upload(server, tiny_conv_onnx(size=32, layout="NHWC"), "nhwc", "1")

    job = wait_job(server.operator, create(server, _fast_recipe(), model="nhwc").job_id)

    assert job.state == operator_pb2.JOB_STATE_SUCCEEDED, job.error
    assert json.loads(job.recipe_json) == _fast_recipe()


def _image_metadata(shape: tuple[int, ...]) -> ModelMetadata:
    spec = TensorSpec("input", "float32", shape)
    return ModelMetadata("onnx", (spec,), (TensorSpec("logits", "float32", (1, 10)),), 17, 10, 100, 1000)


def test_plan_layout_from_input() -> None:
    from edgefleet.orchestrator.jobs.plan import plan_job

    nhwc = plan_job(_fast_recipe(evaluation=DEMO), _image_metadata((1, 32, 32, 3)))
    nchw = plan_job(_fast_recipe(evaluation=DEMO), _image_metadata((1, 3, 32, 32)))

    assert nhwc.calibration is not None
    assert nhwc.calibration.preprocess.layout == "NHWC"
    assert (nhwc.calibration.preprocess.height, nhwc.calibration.preprocess.width) == (32, 32)
    assert nhwc.evaluation.preprocess.layout == "NHWC"
    assert nchw.calibration is not None
    assert nchw.calibration.preprocess.layout == "NCHW"


def test_plan_layout_ambiguous() -> None:
    from edgefleet.orchestrator.jobs.plan import PlanError, plan_job

    with pytest.raises(PlanError, match='ambiguous: set layout = "NCHW" or "NHWC"') as caught:
        plan_job(_fast_recipe(), _image_metadata((1, 3, 32, 3)))

    assert caught.value.field == "quantize.calibration.preprocess.layout"


def test_plan_layout_explicit_kept() -> None:
    from edgefleet.orchestrator.jobs.plan import PlanError, plan_job

    recipe = _fast_recipe()
    recipe["quantize"]["calibration"] = {**DEMO, "preprocess": {"layout": "NCHW"}}

    with pytest.raises(PlanError, match=r"'NCHW' puts 32 channels .* set layout = \"NCHW\" or \"NHWC\" in "):
        plan_job(recipe, _image_metadata((1, 32, 32, 3)))


def test_create_rejects_model_without_weights(tiny: OrchestratorThread) -> None:
    """A model with only a Relu has nothing to quantize, which its stored MACs show before calibration."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"])],
        "relu",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 224, 224])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    upload(tiny, model.SerializeToString(), "relu", "1")
    jobs_before = _job_count(tiny)

    error = rpc_error(lambda: create(tiny, _fast_recipe(), model="relu"))

    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid recipe quantize: the model has no Conv, ConvTranspose, Gemm or MatMul" in details
    assert "(1 nodes, 0 multiply-accumulates)" in details
    assert _job_count(tiny) == jobs_before


@pytest.mark.slow
def test_job_on_postgres(postgres_url: str, start_orchestrator: Callable[..., OrchestratorThread]) -> None:

    server = start_orchestrator(postgres_url)
    upload(server, tiny_conv_onnx(seed=3), "tinypg", "1")
    job = wait_job(server.operator, create(server, _fast_recipe(), model="tinypg").job_id)
    assert job.state == operator_pb2.JOB_STATE_SUCCEEDED


# EfficientNet-Lite0: the real model, slow on 2 cores.


def _efficientnet_recipe(size: int = 8) -> dict[str, Any]:
    # EfficientNet-Lite takes (pixel - 127) / 128 (see edgefleet.demo.images). Half of the evaluation photos
    # (hubble_deep_field, retina) show no ImageNet class, so their top-1 flips easily: with 8 calibration
    # samples int8 agreed with fp32 on about 90 % of the evaluation crops.
    preprocess = {"mean": [127 / 255] * 3, "std": [128 / 255] * 3}
    return {
        "quantize": {"calibration": {**DEMO, "preprocess": preprocess}, "calibration_size": size},
        "gate": {"max_accuracy_drop": 20.0},
    }


def _upload_efficientnet(server: OrchestratorThread | operator_pb2_grpc.OperatorServiceStub) -> None:
    from edgefleet.demo.assets import ensure_efficientnet_lite0_onnx
    from tests.servers import upload_requests

    stub = server.operator if isinstance(server, OrchestratorThread) else server
    data = ensure_efficientnet_lite0_onnx().read_bytes()
    stub.UploadModel(upload_requests(data, "effnet", "1"), timeout=120)


@pytest.mark.slow
def test_efficientnet_int8_deploys(
    start_orchestrator: Callable[..., OrchestratorThread], start_agent: Callable[..., Any]
) -> None:
    server = start_orchestrator()
    _upload_efficientnet(server)
    job = wait_job(server.operator, create(server, _efficientnet_recipe(), model="effnet").job_id, timeout_s=300)
    assert job.state == operator_pb2.JOB_STATE_SUCCEEDED, job.error
    variant = next(v for v in variants_of(server.operator, "effnet") if v.variant_id in job.variant_ids)
    assert variant.status == "accepted", variant.rejection_reason
    agent = start_agent(server.address, "edge", hardware=agent_hardware(("onnxruntime",)))
    deadline = time.monotonic() + 60
    while not server.operator.ListDevices(operator_pb2.ListDevicesRequest(), timeout=30).devices:
        assert time.monotonic() < deadline, "agent did not register"
        time.sleep(0.2)
    device_id = server.operator.ListDevices(operator_pb2.ListDevicesRequest(), timeout=30).devices[0].device_id
    server.operator.Deploy(
        operator_pb2.DeployRequest(model_name="effnet", device_id=device_id, variant_id=variant.variant_id), timeout=30
    )
    while True:
        device = server.operator.GetDevice(operator_pb2.GetDeviceRequest(device_id=device_id), timeout=30)
        states = {(m.variant_id, m.state) for m in device.models}
        if (variant.variant_id, common_pb2.MODEL_STATE_SERVING) in states or time.monotonic() > deadline + 60:
            break
        time.sleep(0.3)
    assert agent.running and (variant.variant_id, common_pb2.MODEL_STATE_SERVING) in states


@pytest.mark.slow
def test_cancel_running(start_orchestrator: Callable[..., OrchestratorThread]) -> None:
    server = start_orchestrator()
    _upload_efficientnet(server)
    job = create(server, _efficientnet_recipe(), model="effnet")
    wait_job(server.operator, job.job_id, lambda j: j.state == operator_pb2.JOB_STATE_RUNNING and j.progress >= 0.05)
    runner = server.state.job_runner
    assert runner is not None
    cancelled = server.operator.CancelCompressionJob(
        operator_pb2.CancelCompressionJobRequest(job_id=job.job_id), timeout=60
    )
    time.sleep(1.0)  # A finish write of a worker that survived would land in this time.
    assert cancelled.state == operator_pb2.JOB_STATE_CANCELLED
    assert runner.current_job_id == ""
    assert [v.kind for v in variants_of(server.operator, "effnet")] == ["source"]


def _start_orchestrator_process(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = data_dir / "port"
    port_file.unlink(missing_ok=True)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgefleet.orchestrator.main",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
            "--port-file",
            str(port_file),
            "--log-level",
            "info",
        ],
        cwd=REPO,
        # Plaintext gRPC on loopback; set through the environment, which orchestrators without TLS support ignore.
        env={**os.environ, "PYTHONPATH": str(REPO), "EDGEFLEET_INSECURE": "true"},
    )
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text().strip():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"orchestrator did not start (exit status {process.poll()})")
        time.sleep(0.1)
    return process, f"127.0.0.1:{port_file.read_text().strip()}"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_restart_after_sigkill_requeues(tmp_path: Path) -> None:
    data_dir = tmp_path / "orchestrator"
    first, address = _start_orchestrator_process(data_dir)
    # The first orchestrator dies with SIGKILL while its worker calibrates; the second one finds the job
    # RUNNING under a dead owner, requeues it and runs it again as attempt 2.
    try:
        with grpc.insecure_channel(address) as channel:
            stub = operator_pb2_grpc.OperatorServiceStub(channel)
            _upload_efficientnet(stub)
            request = operator_pb2.CreateCompressionJobRequest(
                model_name="effnet", recipe_json=json.dumps(_efficientnet_recipe())
            )
            job_id = stub.CreateCompressionJob(request, timeout=30).job_id
            wait_job(stub, job_id, lambda j: j.state == operator_pb2.JOB_STATE_RUNNING and j.progress >= 0.05)
            maps = Path(f"/proc/{first.pid}/maps").read_text()
            workers = _children(first.pid)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert "libtorch" not in maps, "torch loaded into the orchestrator process"

    second, address = _start_orchestrator_process(data_dir)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = operator_pb2_grpc.OperatorServiceStub(channel)
            job = wait_job(stub, job_id, timeout_s=300)
            variants = {
                v.variant_id: v.status
                for v in stub.ListVariants(operator_pb2.ListVariantsRequest(model_name="effnet"), timeout=30).variants
            }
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)

    jobs = open_job_store(f"sqlite:///{(data_dir / 'edgefleet.db').resolve()}")
    try:
        attempt = jobs.get_job(job_id).attempt
    finally:
        jobs.close()
    orphans = [pid for pid in workers if process_alive(pid)]
    assert job.state == operator_pb2.JOB_STATE_SUCCEEDED, job.error
    assert attempt == 2
    assert [variants[v] for v in job.variant_ids] == ["accepted"]
    assert orphans == []
    assert list((data_dir / "jobs").iterdir()) == [], "a work directory of attempt 1 or 2 was left behind"


def process_alive(pid: int) -> bool:
    from edgefleet.orchestrator.jobs.runner import _process_exists

    return _process_exists(pid)


def test_create_fine_tune_size_too_small(tiny: OrchestratorThread) -> None:
    """4 calibration samples cannot fill two fine-tuning batches, which the request finds before calibrating."""
    recipe = _fast_recipe()
    recipe["quantize"]["fine_tune_steps"] = 10
    jobs_before = _job_count(tiny)

    error = rpc_error(lambda: create(tiny, recipe))

    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "quantize.calibration_size: calibration_size = 4, but fine_tune_steps needs at least 36" in details
    assert "--calibration-size" in details
    assert _job_count(tiny) == jobs_before


def test_create_fine_tune_npz_too_small(tiny: OrchestratorThread, tmp_path: Path) -> None:
    np.savez(tmp_path / "calibration.npz", input=np.zeros((20, 3, 224, 224), np.float32))
    np.savez(tmp_path / "evaluation.npz", input=np.zeros((2, 3, 224, 224), np.float32))
    recipe = {
        "quantize": {"calibration": {"npz": str(tmp_path / "calibration.npz")}, "fine_tune_steps": 10},
        "gate": {"evaluation": {"npz": str(tmp_path / "evaluation.npz")}},
    }

    error = rpc_error(lambda: create(tiny, recipe))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "calibration.npz' contains 20 samples, but fine_tune_steps needs at least 36" in (error.details() or "")


def test_plan_fine_tune_minimum_matches_qat() -> None:
    from edgefleet.orchestrator.compress.qat import FineTuneConfig, min_fine_tune_samples
    from edgefleet.orchestrator.jobs.plan import FINE_TUNE_MIN_SAMPLES

    assert min_fine_tune_samples(FineTuneConfig()) == FINE_TUNE_MIN_SAMPLES


def test_job_fine_tuned_variant(start_orchestrator: Callable[..., OrchestratorThread], tmp_path: Path) -> None:
    server = start_orchestrator()
    upload(server, tiny_conv_onnx(), "tiny", "1")
    samples = np.random.default_rng(0).uniform(-1.0, 1.0, (54, 3, 224, 224)).astype(np.float32)
    np.savez(tmp_path / "calibration.npz", input=samples[:48])
    np.savez(tmp_path / "evaluation.npz", input=samples[48:])
    calibration = {"npz": str(tmp_path / "calibration.npz")}
    recipe = {
        "quantize": {"calibration": calibration, "calibration_size": 48, "fine_tune_steps": 10},
        "gate": {"evaluation": {"npz": str(tmp_path / "evaluation.npz")}, "max_accuracy_drop": 100.0},
    }
    job = wait_job(server.operator, create(server, recipe).job_id)
    assert job.state == operator_pb2.JOB_STATE_SUCCEEDED, job.error
    assert len(job.variant_ids) == 1


def test_create_drop_below_one_sample(tiny: OrchestratorThread, tmp_path: Path) -> None:
    """On 20 evaluation samples one changed prediction is 5 points: a 1-point limit cannot be measured."""
    np.savez(tmp_path / "calibration.npz", input=np.zeros((8, 3, 224, 224), np.float32))
    np.savez(tmp_path / "evaluation.npz", input=np.ones((20, 3, 224, 224), np.float32))
    recipe = {
        "quantize": {"calibration": {"npz": str(tmp_path / "calibration.npz")}},
        "gate": {"evaluation": {"npz": str(tmp_path / "evaluation.npz")}, "max_accuracy_drop": 1.0},
    }
    jobs_before = _job_count(tiny)

    error = rpc_error(lambda: create(tiny, recipe))

    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "gate.max_accuracy_drop: 1 points cannot be measured on the 20 evaluation samples of" in details
    assert "give at least 100 evaluation samples, or set max_accuracy_drop (--max-accuracy-drop) to 5" in details
    assert _job_count(tiny) == jobs_before
    recipe["gate"]["max_accuracy_drop"] = 5.0
    job = create(tiny, recipe)
    tiny.operator.CancelCompressionJob(operator_pb2.CancelCompressionJobRequest(job_id=job.job_id), timeout=30)


def test_plan_demo_photos_resolve_default_drop() -> None:
    """The built-in photos give enough evaluation samples for the gate's default limit of 1 point."""
    from edgefleet.orchestrator.jobs.sources import evaluation_count

    spec = TensorSpec("input", "float32", (1, 3, 224, 224))
    source = DataSource(images="builtin:demo-photos")

    assert evaluation_count(source, spec) == 100


def test_plan_fine_tune_needs_onnx_static() -> None:
    """Fine-tuning works on the ONNX QDQ graph; a TFLite job would ignore it, so the plan refuses it."""
    from edgefleet.common.models import ModelMetadata
    from edgefleet.orchestrator.jobs.plan import PlanError, plan_job

    metadata = ModelMetadata(
        format="tflite",
        inputs=(TensorSpec("input", "float32", (1, 224, 224, 3)),),
        outputs=(TensorSpec("logits", "float32", (1, 1000)),),
        opset=3,
        parameters=1000,
        macs=1000,
        peak_activation_bytes=1000,
    )
    recipe = {"quantize": {"calibration": {**DEMO, "preprocess": {"layout": "NHWC"}}, "fine_tune_steps": 10}}

    with pytest.raises(PlanError, match=r"^quantize\.fine_tune_steps: .* this job makes tflite-int8 from a tflite "):
        plan_job(recipe, metadata)


def test_plan_tflite_kinds_match_uploads() -> None:
    """Job-made TFLite variants take the kinds that uploads of TFLite variants take."""
    from edgefleet.common.models import ModelMetadata
    from edgefleet.orchestrator.handlers.catalog import UPLOAD_VARIANT_KINDS
    from edgefleet.orchestrator.jobs.plan import plan_job

    spec = TensorSpec("input", "float32", (1, 224, 224, 3))
    metadata = ModelMetadata(
        format="tflite",
        inputs=(spec,),
        outputs=(TensorSpec("logits", "float32", (1, 1000)),),
        opset=3,
        parameters=1000,
        macs=1000,
        peak_activation_bytes=1000,
    )
    calibration = {**DEMO, "preprocess": {"layout": "NHWC"}}
    recipe = {"quantize": {"calibration": calibration}, "tflite": {"precisions": ["fp16", "int8"]}}

    plan = plan_job(recipe, metadata)

    assert sorted(v.kind for v in plan.variants) == ["tflite-fp16", "tflite-int8"]
    assert all(v.kind in UPLOAD_VARIANT_KINDS["tflite"] for v in plan.variants)
