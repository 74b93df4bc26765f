"""The model catalog over gRPC: uploads of real models, variants, rejections and artifact downloads."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from edgefleet.demo.assets import ensure_efficientnet_lite0_onnx
from edgefleet.v1 import agent_pb2, common_pb2, operator_pb2
from tests.agent.models import tflite_linear
from tests.servers import (
    OrchestratorThread,
    linear_onnx,
    register,
    stored_artifacts,
    upload,
    upload_requests,
    wait_until,
)

pytest_plugins = ["tests.servers"]

# EfficientNet-Lite0 at 224x224: about 4.6 million parameters and 0.39 billion multiply-accumulates.
EFFICIENTNET_PARAMETERS = (4_500_000, 4_800_000)
EFFICIENTNET_MACS = (350_000_000, 420_000_000)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """Run call, which must fail, and return its error."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def code_of(error: grpc.RpcError) -> grpc.StatusCode:
    return error.code()


def details_of(error: grpc.RpcError) -> str:
    return error.details() or ""


def list_models(orchestrator: OrchestratorThread) -> list[operator_pb2.Model]:
    return list(orchestrator.operator.ListModels(operator_pb2.ListModelsRequest(), timeout=30).models)


def test_upload_efficientnet(start_orchestrator: Callable[..., OrchestratorThread]) -> None:
    orchestrator = start_orchestrator()
    path = ensure_efficientnet_lite0_onnx()
    data = path.read_bytes()
    assert len(data) > 4 * 1024 * 1024

    model = upload(orchestrator, data, "efficientnet-lite0", "1", chunk_bytes=1024 * 1024)

    metadata = model.metadata
    assert model.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert model.size_bytes == len(data)
    assert metadata.format == common_pb2.MODEL_FORMAT_ONNX
    assert [t.name for t in metadata.inputs] == ["input"]
    assert list(metadata.inputs[0].shape) == [1, 3, 224, 224]
    assert metadata.inputs[0].dtype == "float32"
    assert list(metadata.outputs[0].shape) == [1, 1000]
    assert EFFICIENTNET_PARAMETERS[0] <= metadata.parameters <= EFFICIENTNET_PARAMETERS[1]
    assert EFFICIENTNET_MACS[0] <= metadata.macs <= EFFICIENTNET_MACS[1]
    assert metadata.macs_by_op_type["Conv"] > 0
    assert metadata.opset == 18
    assert [(v.kind, v.status) for v in model.variants] == [("source", "accepted")]
    stored = orchestrator.state.artifacts.path_of(model.digest)  # type: ignore[attr-defined]
    assert Path(stored).read_bytes() == data


def test_upload_small_model(orchestrator: OrchestratorThread) -> None:
    data = linear_onnx()

    model = upload(orchestrator, data, "linear", "1", chunk_bytes=100)

    assert model.name == "linear"
    assert model.version == "1"
    assert model.metadata.parameters == 15
    assert model.metadata.macs == 12
    assert [t.name for t in model.metadata.inputs] == ["x"]
    assert [v.variant_id for v in model.variants] == ["linear:1:source"]
    assert [m.name for m in list_models(orchestrator)] == ["linear"]


def test_upload_idempotent(orchestrator: OrchestratorThread) -> None:
    data = linear_onnx()
    first = upload(orchestrator, data, "linear", "1")

    second = upload(orchestrator, data, "linear", "1")

    assert second.digest == first.digest
    assert second.created_at == first.created_at
    assert len(list_models(orchestrator)) == 1
    assert len(second.variants) == 1
    assert len(stored_artifacts(orchestrator)) == 1


def test_upload_conflict(orchestrator: OrchestratorThread) -> None:
    first = upload(orchestrator, linear_onnx(seed=0), "linear", "1")
    files_before = stored_artifacts(orchestrator)

    error = rpc_error(lambda: upload(orchestrator, linear_onnx(seed=1), "linear", "1"))

    assert code_of(error) == grpc.StatusCode.ALREADY_EXISTS
    assert "linear:1" in details_of(error)
    assert [m.digest for m in list_models(orchestrator)] == [first.digest]
    assert stored_artifacts(orchestrator) == files_before


def test_upload_new_version(orchestrator: OrchestratorThread) -> None:
    upload(orchestrator, linear_onnx(seed=0), "linear", "1")
    upload(orchestrator, linear_onnx(seed=1), "linear", "2")

    latest = orchestrator.operator.GetModel(operator_pb2.GetModelRequest(name="linear"), timeout=30)

    assert latest.version == "2"
    assert len(list_models(orchestrator)) == 2


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x00garbage that is no model\xff" * 100, id="garbage"),
        pytest.param(linear_onnx()[:-40], id="truncated-onnx"),
    ],
)
def test_upload_not_a_model(orchestrator: OrchestratorThread, data: bytes) -> None:
    error = rpc_error(lambda: upload(orchestrator, data, "broken", "1"))

    assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(error).startswith("invalid file:")
    assert list_models(orchestrator) == []
    assert stored_artifacts(orchestrator) == []


def test_upload_over_limit(start_orchestrator: Callable[..., OrchestratorThread]) -> None:
    orchestrator = start_orchestrator(max_upload_bytes=64)
    data = linear_onnx()

    error = rpc_error(lambda: upload(orchestrator, data, "linear", "1"))

    assert code_of(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "64 bytes" in details_of(error)
    assert list_models(orchestrator) == []
    assert stored_artifacts(orchestrator) == []


def test_upload_over_limit_undeclared(start_orchestrator: Callable[..., OrchestratorThread]) -> None:
    orchestrator = start_orchestrator(max_upload_bytes=64)
    data = linear_onnx()

    error = rpc_error(lambda: upload(orchestrator, data, "linear", "1", size_bytes=0, chunk_bytes=32))

    assert code_of(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stored_artifacts(orchestrator) == []


def test_upload_size_mismatch(orchestrator: OrchestratorThread) -> None:
    data = linear_onnx()

    longer = rpc_error(lambda: upload(orchestrator, data, "linear", "1", size_bytes=len(data) - 1))
    shorter = rpc_error(lambda: upload(orchestrator, data, "linear", "1", size_bytes=len(data) + 1))

    assert code_of(longer) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(shorter) == grpc.StatusCode.INVALID_ARGUMENT
    assert "truncated" in details_of(shorter)
    assert list_models(orchestrator) == []
    assert stored_artifacts(orchestrator) == []


def test_upload_sha256_mismatch(orchestrator: OrchestratorThread) -> None:
    data = linear_onnx()

    error = rpc_error(lambda: upload(orchestrator, data, "linear", "1", sha256=hashlib.sha256(b"other").hexdigest()))

    assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert "SHA-256" in details_of(error)
    assert list_models(orchestrator) == []
    assert stored_artifacts(orchestrator) == []


def test_upload_header_checks(orchestrator: OrchestratorThread) -> None:
    data = linear_onnx()
    chunk_first = iter([operator_pb2.UploadModelRequest(chunk=data)])

    no_header = rpc_error(lambda: orchestrator.operator.UploadModel(chunk_first, timeout=30))
    bad_name = rpc_error(lambda: upload(orchestrator, data, "../linear", "1"))
    bad_kind = rpc_error(lambda: upload(orchestrator, data, "linear", "1", variant_kind="Source!"))

    assert code_of(no_header) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(bad_name) == grpc.StatusCode.INVALID_ARGUMENT
    assert "header.name" in details_of(bad_name)
    assert code_of(bad_kind) == grpc.StatusCode.INVALID_ARGUMENT
    assert "header.variant_kind" in details_of(bad_kind)
    assert stored_artifacts(orchestrator) == []


def test_upload_tflite_variant(orchestrator: OrchestratorThread) -> None:
    upload(orchestrator, linear_onnx(), "linear", "1")
    tflite = tflite_linear().read_bytes()

    model = upload(orchestrator, tflite, "linear", "1", variant_kind="tflite-fp32", filename="linear.tflite")

    by_kind = {v.kind: v for v in model.variants}
    assert sorted(by_kind) == ["source", "tflite-fp32"]
    variant = by_kind["tflite-fp32"]
    assert variant.variant_id == "linear:1:tflite-fp32"
    assert variant.format == common_pb2.MODEL_FORMAT_TFLITE
    assert variant.digest == "sha256:" + hashlib.sha256(tflite).hexdigest()
    assert variant.status == "accepted"
    assert list(variant.metadata.inputs[0].shape) == [1, 4]
    listed = orchestrator.operator.ListVariants(
        operator_pb2.ListVariantsRequest(model_name="linear", model_version="1"), timeout=30
    )
    assert sorted(v.kind for v in listed.variants) == ["source", "tflite-fp32"]
    assert model.digest == by_kind["source"].digest


def test_variant_unknown_version(orchestrator: OrchestratorThread) -> None:
    upload(orchestrator, linear_onnx(), "linear", "1")

    error = rpc_error(lambda: upload(orchestrator, linear_onnx(seed=1), "linear", "9", variant_kind="int8"))

    assert code_of(error) == grpc.StatusCode.NOT_FOUND
    assert "linear:9" in details_of(error)
    assert sorted(v.kind for v in list_models(orchestrator)[0].variants) == ["source"]


def test_variant_kind_twice(orchestrator: OrchestratorThread) -> None:
    upload(orchestrator, linear_onnx(), "linear", "1")
    upload(orchestrator, linear_onnx(seed=1), "linear", "1", variant_kind="pruned")

    error = rpc_error(lambda: upload(orchestrator, linear_onnx(seed=2), "linear", "1", variant_kind="pruned"))

    assert code_of(error) == grpc.StatusCode.ALREADY_EXISTS


def test_get_model_unknown(orchestrator: OrchestratorThread) -> None:
    upload(orchestrator, linear_onnx(), "linear", "1")

    error = rpc_error(lambda: orchestrator.operator.GetModel(operator_pb2.GetModelRequest(name="linaer"), timeout=30))

    assert code_of(error) == grpc.StatusCode.NOT_FOUND
    assert "did you mean linear?" in details_of(error)


def download(orchestrator: OrchestratorThread, device_id: str, digest: str, offset: int = 0) -> bytes:
    chunks = orchestrator.agent.DownloadArtifact(
        agent_pb2.DownloadArtifactRequest(device_id=device_id, digest=digest, offset=offset, chunk_size=64),
        timeout=30,
    )
    data = b""
    for chunk in chunks:
        assert chunk.offset == offset + len(data)
        assert chunk.chunk_sha256 == hashlib.sha256(chunk.data).hexdigest()
        data += chunk.data
    return data


def test_download_undesired(orchestrator: OrchestratorThread) -> None:
    device_id, _ = register(orchestrator.agent)
    model = upload(orchestrator, linear_onnx(), "linear", "1")

    error = rpc_error(lambda: download(orchestrator, device_id, model.digest))

    assert code_of(error) == grpc.StatusCode.FAILED_PRECONDITION
    assert device_id in details_of(error)


def test_download_desired(orchestrator: OrchestratorThread) -> None:
    device_id, _ = register(orchestrator.agent)
    data = linear_onnx()
    model = upload(orchestrator, data, "linear", "1")
    orchestrator.operator.Deploy(operator_pb2.DeployRequest(model_name="linear", device_id=device_id), timeout=30)

    whole = download(orchestrator, device_id, model.digest)
    tail = download(orchestrator, device_id, model.digest, offset=100)

    assert whole == data
    assert tail == data[100:]


def test_download_unknown_device(orchestrator: OrchestratorThread) -> None:
    model = upload(orchestrator, linear_onnx(), "linear", "1")

    error = rpc_error(lambda: download(orchestrator, "nobody", model.digest))

    assert code_of(error) == grpc.StatusCode.NOT_FOUND


def test_upload_concurrent_conflict(orchestrator: OrchestratorThread) -> None:
    """Two different files raced under one name and version: one is stored, the other gets ALREADY_EXISTS."""
    files = [linear_onnx(seed=0), linear_onnx(seed=1)] * 3

    def upload_one(data: bytes) -> grpc.StatusCode:
        try:
            upload(orchestrator, data, "linear", "1")
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(max_workers=len(files)) as pool:
        codes = list(pool.map(upload_one, files))

    models = list_models(orchestrator)
    stored_digest = models[0].digest
    winners = [data for data, code in zip(files, codes, strict=True) if code == grpc.StatusCode.OK]
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS}
    assert len(models) == 1
    assert {"sha256:" + hashlib.sha256(data).hexdigest() for data in winners} == {stored_digest}
    # NOTE: a losing upload whose validation ran before the winner was stored leaves its artifact in
    # the store, unreferenced, because the artifact store has no garbage collection yet.
    assert stored_digest.removeprefix("sha256:") in [p.name for p in stored_artifacts(orchestrator)]
    assert [p for p in stored_artifacts(orchestrator) if p.parent.name == "tmp"] == []


def test_upload_cancelled(orchestrator: OrchestratorThread) -> None:
    """A client that cancels an upload halfway leaves no temporary file and no model."""
    data = linear_onnx() * 4
    sent = threading.Event()
    release = threading.Event()

    def requests() -> Iterator[operator_pb2.UploadModelRequest]:
        stream = upload_requests(data, "linear", "1", chunk_bytes=64, sha256="")
        yield next(stream)
        yield next(stream)
        sent.set()
        release.wait(30)

    future = orchestrator.operator.UploadModel.future(requests(), timeout=60)
    sent.wait(30)
    wait_until(lambda: stored_artifacts(orchestrator), "the upload's temporary file")
    future.cancel()
    release.set()

    wait_until(lambda: stored_artifacts(orchestrator) == [], "the temporary file to be removed")
    assert list_models(orchestrator) == []
