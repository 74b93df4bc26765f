"""Upload checks of the model catalog over gRPC: variant kinds against the file format, and error file names."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import grpc
import onnx
import pytest
from onnx import TensorProto, helper

from edgefleet.orchestrator.handlers.catalog import UPLOAD_VARIANT_KINDS
from edgefleet.v1 import common_pb2, operator_pb2
from tests.agent.models import tflite_linear
from tests.servers import OrchestratorThread, linear_onnx, stored_artifacts, upload

pytest_plugins = ["tests.servers"]

JPEG_BYTES = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """Run call, which must fail, and return its error."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def variant_kinds(orchestrator: OrchestratorThread) -> list[str]:
    request = operator_pb2.ListVariantsRequest(model_name="linear", model_version="1")
    return sorted(v.kind for v in orchestrator.operator.ListVariants(request, timeout=30).variants)


@pytest.fixture
def catalog(orchestrator: OrchestratorThread) -> OrchestratorThread:
    """Return an orchestrator whose catalog contains linear:1 from an ONNX file."""
    upload(orchestrator, linear_onnx(), "linear", "1", filename="linear.onnx")
    return orchestrator


def test_kind_unknown(catalog: OrchestratorThread) -> None:
    error = rpc_error(lambda: upload(catalog, linear_onnx(seed=1), "linear", "1", variant_kind="bogus"))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert "'bogus' is not a known variant kind" in details
    assert "tflite-fp32" in details
    assert "int8" in details
    assert variant_kinds(catalog) == ["source"]


def test_kind_onnx_under_tflite(catalog: OrchestratorThread) -> None:
    error = rpc_error(
        lambda: upload(catalog, linear_onnx(seed=1), "linear", "1", variant_kind="tflite-fp32", filename="lin.onnx")
    )

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert "'tflite-fp32' is a kind for TFLite files" in details
    assert "lin.onnx is ONNX" in details
    assert ", ".join(UPLOAD_VARIANT_KINDS["onnx"]) in details
    assert variant_kinds(catalog) == ["source"]


def test_kind_tflite_under_onnx(catalog: OrchestratorThread) -> None:
    tflite = tflite_linear().read_bytes()

    error = rpc_error(lambda: upload(catalog, tflite, "linear", "1", variant_kind="int8", filename="lin.tflite"))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert "'int8' is a kind for ONNX files" in details
    assert "lin.tflite is TFLite" in details
    assert ", ".join(UPLOAD_VARIANT_KINDS["tflite"]) in details


def test_kind_rejected_stores_nothing(catalog: OrchestratorThread) -> None:
    before = stored_artifacts(catalog)
    rpc_error(lambda: upload(catalog, linear_onnx(seed=1), "linear", "1", variant_kind="tflite-fp32"))
    tflite = tflite_linear().read_bytes()

    model = upload(catalog, tflite, "linear", "1", variant_kind="tflite-fp32", filename="linear.tflite")

    added = [path for path in stored_artifacts(catalog) if path not in before]
    assert [path.name for path in added] == [hashlib.sha256(tflite).hexdigest()]
    by_kind = {v.kind: v for v in model.variants}
    assert sorted(by_kind) == ["source", "tflite-fp32"]
    assert by_kind["tflite-fp32"].format == common_pb2.MODEL_FORMAT_TFLITE


def test_kind_declared_format_early(catalog: OrchestratorThread) -> None:
    """A header that declares ONNX under a TFLite kind is rejected before any chunk is read."""
    header = operator_pb2.UploadModelHeader(
        name="linear",
        version="1",
        format=common_pb2.MODEL_FORMAT_ONNX,
        filename="lin.onnx",
        variant_kind="tflite-int8",
    )
    requests = iter([operator_pb2.UploadModelRequest(header=header)])

    error = rpc_error(lambda: catalog.operator.UploadModel(requests, timeout=30))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lin.onnx is ONNX" in (error.details() or "")


def test_every_kind_accepted(catalog: OrchestratorThread) -> None:
    tflite = tflite_linear().read_bytes()

    for kind in UPLOAD_VARIANT_KINDS["onnx"]:
        upload(catalog, linear_onnx(seed=2), "linear", "1", variant_kind=kind)
    for kind in UPLOAD_VARIANT_KINDS["tflite"]:
        upload(catalog, tflite, "linear", "1", variant_kind=kind, filename="linear.tflite")

    expected = sorted(["source", *UPLOAD_VARIANT_KINDS["onnx"], *UPLOAD_VARIANT_KINDS["tflite"]])
    assert variant_kinds(catalog) == expected


def test_custom_domain_rejected_stores_nothing(orchestrator: OrchestratorThread) -> None:
    graph = helper.make_graph(
        [helper.make_node("Mystery", ["x"], ["y"], name="mystery_1", domain="com.example.custom")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example.custom", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    before = stored_artifacts(orchestrator)

    error = rpc_error(lambda: upload(orchestrator, model.SerializeToString(), "custom", "1", filename="custom.onnx"))

    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model custom.onnx: node 'mystery_1'" in details
    assert "operator domain 'com.example.custom'" in details
    assert stored_artifacts(orchestrator) == before
    assert not orchestrator.operator.ListModels(operator_pb2.ListModelsRequest(), timeout=30).models


def test_error_names_not_a_model(orchestrator: OrchestratorThread) -> None:
    error = rpc_error(lambda: upload(orchestrator, JPEG_BYTES, "photo", "1", filename="cat.jpg"))

    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model cat.jpg is not a model file" in details
    assert "upload-" not in details
    assert str(orchestrator.config.data_dir) not in details


def test_error_names_truncated_onnx(orchestrator: OrchestratorThread) -> None:
    data = linear_onnx()

    error = rpc_error(lambda: upload(orchestrator, data[: len(data) // 2], "linear", "1", filename="half.onnx"))

    details = error.details() or ""
    assert "ONNX model half.onnx is truncated" in details
    assert str(orchestrator.config.data_dir) not in details


def test_error_names_truncated_tflite(orchestrator: OrchestratorThread) -> None:
    data = tflite_linear().read_bytes()

    error = rpc_error(lambda: upload(orchestrator, data[: len(data) // 2], "linear", "1", filename="half.tflite"))

    details = error.details() or ""
    assert "TFLite model half.tflite is truncated or corrupt" in details
    assert str(orchestrator.config.data_dir) not in details


def test_error_names_checker_failure(orchestrator: OrchestratorThread) -> None:
    model = onnx.load_from_string(linear_onnx())
    model.graph.node[0].op_type = "NoSuchOp"

    error = rpc_error(lambda: upload(orchestrator, model.SerializeToString(), "linear", "1", filename="bad.onnx"))

    details = error.details() or ""
    assert "ONNX model bad.onnx failed onnx.checker" in details
    assert str(orchestrator.config.data_dir) not in details


def test_error_without_filename(orchestrator: OrchestratorThread) -> None:
    error = rpc_error(lambda: upload(orchestrator, JPEG_BYTES, "photo", "1", filename=""))

    assert "model <upload of photo:1> is not a model file" in (error.details() or "")


def test_error_filename_unprintable(orchestrator: OrchestratorThread) -> None:
    error = rpc_error(lambda: upload(orchestrator, JPEG_BYTES, "photo", "1", filename="cat\n.jpg"))

    assert "model 'cat\\n.jpg' is not a model file" in (error.details() or "")
