"""Variant selection, deploy and rollouts against the runtime versions that devices report over gRPC.

Devices register through the real Register call with HardwareProfile messages that report older
onnxruntime and LiteRT releases. The models are real ONNX files at different opsets, and a real
TFLite file whose min_runtime_version entry is rewritten.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import flatbuffers  # type: ignore[import-untyped]
import grpc
import numpy as np
import pytest
import sqlalchemy as sa
from ai_edge_litert import schema_py_generated as tflite_schema

from edgefleet.orchestrator.artifacts import FileArtifactStore
from edgefleet.orchestrator.modelinfo_tflite import min_runtime_version
from edgefleet.orchestrator.runtime_compat import (
    ONNXRUNTIME_MAX_OPSET,
    first_onnxruntime_for_opset,
    onnxruntime_max_opset,
    parse_release,
)
from edgefleet.orchestrator.store.engine import create_store_engine
from edgefleet.orchestrator.store.tables import variants
from edgefleet.v1 import common_pb2, operator_pb2
from tests.agent.models import tflite_linear
from tests.servers import (
    OrchestratorThread,
    get_device,
    hardware_message,
    linear_onnx,
    register,
    upload,
    wait_until,
)

pytest_plugins = ["tests.servers"]

NEWEST_TABLE_OPSET = max(ONNXRUNTIME_MAX_OPSET.values())


def with_min_runtime_version(content: bytes, version: str) -> bytes:
    """Return the TFLite file with its min_runtime_version entry set to version, NUL-padded as converters write it."""
    model = tflite_schema.ModelT.InitFromPackedBuf(content, 0)
    buffer = tflite_schema.BufferT()
    buffer.data = np.frombuffer(version.encode().ljust(16, b"\0"), dtype=np.uint8)
    model.buffers.append(buffer)
    entries = [m for m in (model.metadata or []) if m.name != b"min_runtime_version"]
    entry = tflite_schema.MetadataT()
    entry.name = b"min_runtime_version"
    entry.buffer = len(model.buffers) - 1
    model.metadata = [*entries, entry]
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def device_with(orchestrator: OrchestratorThread, device_id: str, *runtimes: common_pb2.Runtime) -> str:
    hardware = hardware_message(runtimes=list(runtimes))
    return register(orchestrator.agent, device_id, hardware=hardware, labels={"kind": "camera"})[0]


def onnxruntime(version: str) -> common_pb2.Runtime:
    return common_pb2.Runtime(name="onnxruntime", version=version, providers=["CPUExecutionProvider"])


def litert(version: str, package: str = "ai-edge-litert") -> common_pb2.Runtime:
    return common_pb2.Runtime(name="litert", version=version, providers=["XNNPACK"], package=package)


def explain(
    orchestrator: OrchestratorThread, device_id: str, model: str = "linear"
) -> operator_pb2.ExplainSelectionResponse:
    request = operator_pb2.ExplainSelectionRequest(device_id=device_id, model_name=model, model_version="1")
    return orchestrator.operator.ExplainSelection(request, timeout=30)


def reasons(response: operator_pb2.ExplainSelectionResponse) -> dict[str, str]:
    return {c.variant.variant_id: c.reason for c in response.candidates}


def drop_min_runtime_versions(db_url: str) -> None:
    """Remove the min_runtime_version entry from the stored TFLite variants, as earlier releases stored them."""
    engine = create_store_engine(db_url)
    try:
        with engine.begin() as connection:
            query = sa.select(variants.c.variant_id, variants.c.metadata).where(variants.c.format == "tflite")
            for variant_id, metadata in connection.execute(query).all():
                older = {key: value for key, value in metadata.items() if key != "min_runtime_version"}
                update = sa.update(variants).where(variants.c.variant_id == variant_id).values(metadata=older)
                connection.execute(update)
    finally:
        engine.dispose()


def deploy_error(orchestrator: OrchestratorThread, device_id: str, variant_id: str = "") -> grpc.RpcError:
    request = operator_pb2.DeployRequest(
        model_name="linear", model_version="1", device_id=device_id, variant_id=variant_id
    )
    with pytest.raises(grpc.RpcError) as caught:
        orchestrator.operator.Deploy(request, timeout=30)
    return caught.value


# The table and version parsing


@pytest.mark.parametrize(
    ("version", "opset"),
    [
        ("1.10.0", 15),
        ("1.14.1", 18),
        ("1.16.3", 19),
        ("1.17.0", 20),
        ("1.18.0rc1", 21),
        ("1.17.1+cu118", 20),
        ("1.20", 21),
        ("0.1.4", 8),
    ],
)
def test_max_opset_from_table(version: str, opset: int) -> None:
    assert onnxruntime_max_opset(version) == opset


def test_max_opset_unknown_newer_release() -> None:
    newest = onnxruntime_max_opset("99.0.0")

    assert newest is not None
    assert newest >= NEWEST_TABLE_OPSET
    assert onnxruntime_max_opset("1.99.0") == newest


@pytest.mark.parametrize("version", ["", "banana", "latest", "1", "one.two"])
def test_unparsable_version_is_unknown(version: str) -> None:
    assert parse_release(version) is None
    assert onnxruntime_max_opset(version) is None


def test_first_release_for_opset() -> None:
    assert first_onnxruntime_for_opset(17) == "1.12"
    assert first_onnxruntime_for_opset(20) == "1.17"
    assert first_onnxruntime_for_opset(1000) == ""


def test_min_runtime_version_read_from_tflite() -> None:
    content = with_min_runtime_version(tflite_linear().read_bytes(), "2.10.0")

    assert min_runtime_version(content, "linear.tflite") == "2.10.0"


# Selection, deploy and rollouts over gRPC


@pytest.fixture
def fleet(start_orchestrator: Callable[..., OrchestratorThread]) -> OrchestratorThread:
    """Return an orchestrator on SQLite with linear:1 at opset 17 (source) and at opset 13 (onnx-fp32)."""
    orchestrator = start_orchestrator()
    upload(orchestrator, linear_onnx(opset=17), "linear", "1")
    upload(orchestrator, linear_onnx(opset=13), "linear", "1", variant_kind="onnx-fp32")
    return orchestrator


def test_metadata_stores_opset(fleet: OrchestratorThread) -> None:
    model = fleet.operator.GetModel(operator_pb2.GetModelRequest(name="linear", version="1"), timeout=30)

    opsets = {v.variant_id: v.metadata.opset for v in model.variants}
    assert opsets == {"linear:1:source": 17, "linear:1:onnx-fp32": 13}


def test_old_onnxruntime_gets_lower_opset(fleet: OrchestratorThread) -> None:
    device_id = device_with(fleet, "old-ort", onnxruntime("1.10.0"))

    response = explain(fleet, device_id)

    assert response.chosen_variant_id == "linear:1:onnx-fp32"
    reason = reasons(response)["linear:1:source"]
    assert reason.startswith("runtime version too old")
    assert "onnxruntime 1.10.0" in reason
    assert "opset 17" in reason
    assert "upgrade onnxruntime on the device to 1.12 or later" in reason
    assert "add a variant at opset 15 or lower" in reason


def test_new_onnxruntime_gets_source(fleet: OrchestratorThread) -> None:
    device_id = device_with(fleet, "new-ort", onnxruntime("1.17.3"))

    response = explain(fleet, device_id)

    assert "runtime version too old" not in " ".join(reasons(response).values())
    assert response.chosen_variant_id in {"linear:1:source", "linear:1:onnx-fp32"}


def test_explicit_deploy_rejected(fleet: OrchestratorThread) -> None:
    device_id = device_with(fleet, "old-ort", onnxruntime("1.10.0"))
    before = get_device(fleet, device_id)

    error = deploy_error(fleet, device_id, variant_id="linear:1:source")

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = error.details() or ""
    assert "onnxruntime 1.10.0" in details
    assert "opset 17" in details
    assert "upgrade onnxruntime" in details
    after = get_device(fleet, device_id)
    assert list(after.desired) == []
    assert after.desired_generation == before.desired_generation


def test_automatic_deploy_rejected_without_fit(start_orchestrator: Callable[..., OrchestratorThread]) -> None:
    orchestrator = start_orchestrator()
    upload(orchestrator, linear_onnx(opset=17), "linear", "1")
    device_id = device_with(orchestrator, "old-ort", onnxruntime("1.8.1"))

    error = deploy_error(orchestrator, device_id)

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = error.details() or ""
    assert "onnxruntime 1.8.1" in details
    assert "opset 14 or lower" in details
    assert "upgrade the runtime on the device" in details
    assert list(get_device(orchestrator, device_id).desired) == []


def test_unparsable_version_reported(fleet: OrchestratorThread, caplog: pytest.LogCaptureFixture) -> None:
    device_id = device_with(fleet, "odd-ort", onnxruntime("custom-build"))

    response = explain(fleet, device_id)

    assert response.chosen_variant_id
    chosen_reason = reasons(response)[response.chosen_variant_id]
    assert "onnxruntime version 'custom-build' on the device does not parse" in chosen_reason
    assert any("'custom-build'" in record.getMessage() for record in caplog.records)


def test_empty_version_reported(fleet: OrchestratorThread) -> None:
    device_id = device_with(fleet, "blank-ort", onnxruntime(""))

    response = explain(fleet, device_id)

    assert "an empty version" in reasons(response)[response.chosen_variant_id]


def test_rollout_skips_old_runtime(start_orchestrator: Callable[..., OrchestratorThread]) -> None:
    orchestrator = start_orchestrator()
    old = device_with(orchestrator, "old-ort", onnxruntime("1.10.0"))
    new = device_with(orchestrator, "new-ort", onnxruntime("1.20.1"))
    upload(orchestrator, linear_onnx(opset=17), "linear", "1")
    request = operator_pb2.CreateRolloutRequest(
        model_name="linear",
        model_version="1",
        target_labels={"kind": "camera"},
        wave_percents=[100],
        budget_ms=50.0,
        max_p95_regression_pct=50.0,
        max_error_rate_pct=1.0,
        min_samples=20,
    )
    rollout_id = orchestrator.operator.CreateRollout(request, timeout=30).rollout_id

    def wave_devices() -> dict[str, operator_pb2.WaveDevice] | None:
        rollout = orchestrator.operator.GetRollout(operator_pb2.GetRolloutRequest(rollout_id=rollout_id), timeout=30)
        devices = {d.device_id: d for w in rollout.waves for d in w.devices}
        return devices if len(devices) == 2 else None

    devices = wait_until(wave_devices, "the first wave with both devices")

    assert devices[old].verdict == "skipped"
    assert devices[old].variant_id == ""
    assert "onnxruntime 1.10.0" in devices[old].note
    assert "opset 17" in devices[old].note
    assert devices[new].variant_id == "linear:1:source"
    assert list(get_device(orchestrator, old).desired) == []


def test_litert_min_runtime_version(start_orchestrator: Callable[..., OrchestratorThread]) -> None:
    orchestrator = start_orchestrator()
    upload(orchestrator, linear_onnx(opset=13), "linear", "1")
    tflite = with_min_runtime_version(tflite_linear().read_bytes(), "2.10.0")
    model = upload(orchestrator, tflite, "linear", "1", variant_kind="tflite-fp32", filename="linear.tflite")
    stored = {v.kind: v.metadata.min_runtime_version for v in model.variants}
    assert stored == {"source": "", "tflite-fp32": "2.10.0"}
    old = device_with(orchestrator, "old-tflite-runtime", litert("2.5.0", package="tflite-runtime"))
    new = device_with(orchestrator, "new-tflite-runtime", litert("2.14.0", package="tflite-runtime"))

    old_reason = reasons(explain(orchestrator, old))["linear:1:tflite-fp32"]
    new_response = explain(orchestrator, new)

    assert old_reason.startswith("runtime version too old")
    assert "tflite-runtime 2.5.0" in old_reason
    assert "2.10.0" in old_reason
    assert "with ai-edge-litert" in old_reason
    assert new_response.chosen_variant_id == "linear:1:tflite-fp32"
    error = deploy_error(orchestrator, old, variant_id="linear:1:tflite-fp32")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "tflite-runtime 2.5.0" in (error.details() or "")


@pytest.mark.parametrize("version", ["1.0.1", "1.4.0", "2.3.0"])
def test_ai_edge_litert_loads_tensorflow_requirements(
    start_orchestrator: Callable[..., OrchestratorThread], version: str
) -> None:
    """ai-edge-litert numbers its releases from 1.0, below the TensorFlow releases that converters write."""
    orchestrator = start_orchestrator()
    upload(orchestrator, linear_onnx(opset=13), "linear", "1")
    tflite = with_min_runtime_version(tflite_linear().read_bytes(), "2.10.0")
    upload(orchestrator, tflite, "linear", "1", variant_kind="tflite-fp32", filename="linear.tflite")
    device = device_with(orchestrator, "camera-1", litert(version))

    response = explain(orchestrator, device)

    assert response.chosen_variant_id == "linear:1:tflite-fp32"
    assert "not checked" not in reasons(response)["linear:1:tflite-fp32"]


@pytest.mark.parametrize(("package", "required"), [("ai-edge-litert", "2.18.0"), ("", "2.10.0")])
def test_litert_requirement_not_comparable(
    start_orchestrator: Callable[..., OrchestratorThread], package: str, required: str
) -> None:
    orchestrator = start_orchestrator()
    upload(orchestrator, linear_onnx(opset=13), "linear", "1")
    tflite = with_min_runtime_version(tflite_linear().read_bytes(), required)
    upload(orchestrator, tflite, "linear", "1", variant_kind="tflite-fp32", filename="linear.tflite")
    device = device_with(orchestrator, "camera-1", litert("1.4.0", package=package))

    response = explain(orchestrator, device)

    assert response.chosen_variant_id == "linear:1:tflite-fp32"
    assert f"min_runtime_version {required} was not checked" in reasons(response)["linear:1:tflite-fp32"]


def test_startup_fills_min_runtime_version(
    db_url: str, start_orchestrator: Callable[..., OrchestratorThread], caplog: pytest.LogCaptureFixture
) -> None:
    """TFLite variants stored without min_runtime_version get it from their artifact at the next start."""
    first = start_orchestrator(db_url)
    upload(first, linear_onnx(opset=13), "linear", "1")
    files = {
        kind: with_min_runtime_version(tflite_linear().read_bytes(), version)
        for kind, version in [("tflite-fp32", "2.10.0"), ("tflite-fp16", "2.11.0"), ("tflite-int8", "2.12.0")]
    }
    for kind, content in files.items():
        upload(first, content, "linear", "1", variant_kind=kind, filename=f"{kind}.tflite")
    artifacts = FileArtifactStore(first.config.data_dir / "artifacts")
    digests = {kind: first.state.store.get_variant(f"linear:1:{kind}").digest for kind in files}
    first.stop()
    drop_min_runtime_versions(db_url)
    artifacts.path_of(digests["tflite-fp16"]).write_bytes(b"not the uploaded file")
    artifacts.delete(digests["tflite-int8"])

    with caplog.at_level(logging.WARNING, logger="edgefleet.orchestrator.backfill"):
        second = start_orchestrator(db_url)
    store = second.state.store
    old = device_with(second, "old-tflite-runtime", litert("2.5.0", package="tflite-runtime"))

    assert store.get_variant("linear:1:tflite-fp32").metadata.min_runtime_version == "2.10.0"
    assert store.get_variant("linear:1:tflite-fp16").metadata.min_runtime_version == ""
    assert store.get_variant("linear:1:tflite-int8").metadata.min_runtime_version == ""
    left = [v.variant_id for v in store.list_tflite_variants_without_min_runtime_version()]
    assert left == ["linear:1:tflite-fp16", "linear:1:tflite-int8"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "edgefleet.orchestrator.backfill"]
    assert len(warnings) == 2, warnings
    assert "variant linear:1:tflite-fp16" in warnings[0]
    assert "does not match the digest" in warnings[0]
    assert "variant linear:1:tflite-int8" in warnings[1]
    assert "artifact is missing" in warnings[1]
    assert reasons(explain(second, old))["linear:1:tflite-fp32"].startswith("runtime version too old")
