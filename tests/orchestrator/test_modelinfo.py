"""Tests for reading metadata and cost from ONNX and TFLite model files."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import math
import subprocess
import sys
import tempfile
import textwrap
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.common.models import ModelMetadata
from edgefleet.orchestrator.modelinfo import ModelFileError, inspect_model
from edgefleet.orchestrator.modelinfo_onnx import supported_opset_range

REPOSITORY = Path(__file__).resolve().parents[2]
MEDIAPIPE_VERSION = "0.10.21"
MEDIAPIPE_CACHE = REPOSITORY / ".cache" / f"mediapipe-{MEDIAPIPE_VERSION}"
FACE_DETECTOR_MEMBER = "mediapipe/modules/face_detection/face_detection_short_range.tflite"


def _weight(name: str, shape: tuple[int, ...], dtype: type[np.generic] = np.float32) -> onnx.TensorProto:
    values = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    return numpy_helper.from_array(values, name)


def _model_bytes(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    opset: int = 17,
) -> bytes:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return model.SerializeToString()


def _float_tensor(name: str, shape: Sequence[int | str | None]) -> onnx.ValueInfoProto:
    """Declare a float32 tensor; None marks an axis of unknown size and no name."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _conv_model(weight_shape: tuple[int, ...], input_shape: list[int | str], **attributes: Any) -> bytes:
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attributes)
    return _model_bytes(
        [node], [_float_tensor("x", input_shape)], [_float_tensor("y", [None] * 4)], [_weight("w", weight_shape)]
    )


# ONNX graphs whose MACs are computed by hand.


def test_conv_groups_macs() -> None:
    # Output (1, 16, 16, 16); each output reads C_in / groups = 2 channels over a 3x3 kernel.
    metadata = inspect_model(_conv_model((16, 2, 3, 3), [1, 8, 16, 16], group=4, pads=[1, 1, 1, 1]))
    assert metadata.macs == 16 * 16 * 16 * 2 * 3 * 3
    assert metadata.macs_by_op_type == {"Conv": 73728}
    assert metadata.parameters == 16 * 2 * 3 * 3


def test_depthwise_conv_macs() -> None:
    # Stride 2 halves 16x16 to 8x8; each output reads one channel over a 3x3 kernel.
    data = _conv_model((8, 1, 3, 3), [1, 8, 16, 16], group=8, strides=[2, 2], pads=[1, 1, 1, 1])
    assert inspect_model(data).macs == 8 * 8 * 8 * 3 * 3


def test_conv_transpose_macs() -> None:
    # Each of the 4 * 5 * 5 input elements is scattered to C_out * 3 * 3 = 2 * 9 outputs.
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2])
    data = _model_bytes(
        [node], [_float_tensor("x", [1, 4, 5, 5])], [_float_tensor("y", [None] * 4)], [_weight("w", (4, 2, 3, 3))]
    )
    assert inspect_model(data).macs == 4 * 5 * 5 * 2 * 3 * 3


def test_gemm_transposed_macs() -> None:
    # A is stored as (K, M) = (32, 4) and transposed, B is (K, N) = (32, 10).
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], transA=1)
    data = _model_bytes(
        [node],
        [_float_tensor("a", [32, 4])],
        [_float_tensor("y", [4, 10])],
        [_weight("b", (32, 10)), _weight("c", (10,))],
    )
    metadata = inspect_model(data)
    assert metadata.macs == 4 * 10 * 32
    assert metadata.parameters == 32 * 10 + 10


def test_matmul_batch_macs() -> None:
    # (2, 3, 5, 7) @ (7, 4) broadcasts to (2, 3, 5, 4), each output a dot product of length 7.
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    data = _model_bytes(
        [node], [_float_tensor("a", [2, 3, 5, 7])], [_float_tensor("y", [None] * 4)], [_weight("b", (7, 4))]
    )
    assert inspect_model(data).macs == 2 * 3 * 5 * 4 * 7


def test_dynamic_batch_axis() -> None:
    data = _conv_model((4, 3, 1, 1), ["batch", 3, 8, 8])
    metadata = inspect_model(data)
    # The dynamic batch counts as 1.
    assert metadata.macs == 4 * 8 * 8 * 3
    assert metadata.inputs[0].shape == (-1, 3, 8, 8)
    assert metadata.inputs[0].dim_names == ("batch", "", "", "")
    assert metadata.inputs[0].dtype == "float32"


def test_output_spec_dynamic() -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    data = _model_bytes([node], [_float_tensor("x", ["n", 4])], [_float_tensor("y", ["n", 4])])
    output = inspect_model(data).outputs[0]
    assert output.name == "y"
    assert output.shape == (-1, 4)
    assert output.dim_names == ("n", "")


def test_macs_grouped_by_op_type() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("MatMul", ["f", "m"], ["y"]),
    ]
    data = _model_bytes(
        nodes,
        [_float_tensor("x", [1, 3, 4, 4])],
        [_float_tensor("y", [1, 5])],
        [_weight("w", (2, 3, 1, 1)), _weight("m", (32, 5))],
    )
    metadata = inspect_model(data)
    assert metadata.macs_by_op_type == {"Conv": 2 * 4 * 4 * 3, "MatMul": 5 * 32}
    assert metadata.macs == 96 + 160
    assert metadata.layers == 4
    assert metadata.opset == 17
    assert metadata.format == "onnx"
    assert metadata.precision == "fp32"


def test_peak_activation_chain() -> None:
    # x (8 KiB) -> Conv -> c (16 KiB) -> Relu -> y (16 KiB): x is freed after the Conv, so the peak
    # is c and y alive together during the Relu.
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    data = _model_bytes(
        nodes, [_float_tensor("x", [1, 8, 16, 16])], [_float_tensor("y", [None] * 4)], [_weight("w", (16, 8, 3, 3))]
    )
    assert inspect_model(data).peak_activation_bytes == 2 * 16 * 16 * 16 * 4


def test_qlinear_conv_counts_like_conv() -> None:
    inputs = ["x", "x_scale", "x_zero", "w", "w_scale", "w_zero", "y_scale", "y_zero"]
    node = helper.make_node("QLinearConv", inputs, ["y"], pads=[1, 1, 1, 1])
    initializers = [
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
        _weight("w", (16, 8, 3, 3), np.int8),
        numpy_helper.from_array(np.full(16, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(16, np.int8), "w_zero"),
        numpy_helper.from_array(np.array(0.05, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "y_zero"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 8, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, [None] * 4)
    metadata = inspect_model(_model_bytes([node], [x], [y], initializers))
    assert metadata.macs_by_op_type == {"QLinearConv": 16 * 16 * 16 * 8 * 3 * 3}
    assert metadata.precision == "int8"
    # Scales and zero points are not parameters.
    assert metadata.parameters == 16 * 8 * 3 * 3
    assert metadata.inputs[0].dtype == "uint8"


def test_fp16_precision() -> None:
    node = helper.make_node("Conv", ["x", "w"], ["y"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [None] * 4)
    metadata = inspect_model(_model_bytes([node], [x], [y], [_weight("w", (4, 3, 3, 3), np.float16)]))
    assert metadata.precision == "fp16"
    assert metadata.inputs[0].dtype == "float16"


def test_constant_node_counts_as_parameters() -> None:
    nodes = [
        helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(np.ones(6, np.float32))),
        helper.make_node("Add", ["x", "b"], ["y"]),
    ]
    data = _model_bytes(nodes, [_float_tensor("x", [1, 6])], [_float_tensor("y", [1, 6])])
    assert inspect_model(data).parameters == 6


def test_initializer_input_is_parameter() -> None:
    # Old exporters list weights as graph inputs too; they are parameters, not model inputs.
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    graph = helper.make_graph(
        [node],
        "test",
        [_float_tensor("a", [1, 3]), _float_tensor("b", [3, 2])],
        [_float_tensor("y", [1, 2])],
        initializer=[_weight("b", (3, 2))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    metadata = inspect_model(model.SerializeToString())
    assert [spec.name for spec in metadata.inputs] == ["a"]
    assert metadata.parameters == 6


def test_path_input(tmp_path: Path) -> None:
    path = tmp_path / "conv.onnx"
    path.write_bytes(_conv_model((4, 3, 1, 1), [1, 3, 8, 8]))
    assert inspect_model(path).macs == 4 * 8 * 8 * 3


# Bad ONNX input.


def _large_onnx() -> bytes:
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    return _model_bytes(
        [node], [_float_tensor("a", [1, 256])], [_float_tensor("y", [1, 64])], [_weight("b", (256, 64))]
    )


def test_string_input_rejected() -> None:
    text = helper.make_tensor_value_info("text", TensorProto.STRING, [1])
    data = _model_bytes([helper.make_node("Identity", ["text"], ["copy"])], [text], [_float_tensor("copy", [1])])

    with pytest.raises(ModelFileError, match="input 'text' has dtype string; agents serve only tensors of float16"):
        inspect_model(data)


def test_sequence_output_rejected() -> None:
    parts = helper.make_tensor_sequence_value_info("parts", TensorProto.FLOAT, None)
    node = helper.make_node("SplitToSequence", ["x"], ["parts"], axis=0)
    data = _model_bytes([node], [_float_tensor("x", [4, 2])], [parts])

    with pytest.raises(ModelFileError, match="output 'parts' is a sequence, not a tensor; agents serve only"):
        inspect_model(data)


def test_map_output_rejected() -> None:
    probabilities = helper.make_value_info(
        "probabilities",
        helper.make_sequence_type_proto(
            helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
        ),
    )
    node = helper.make_node("ZipMap", ["x"], ["probabilities"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2])
    graph = helper.make_graph([node], "test", [_float_tensor("x", [1, 3])], [probabilities])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])

    with pytest.raises(ModelFileError, match="output 'probabilities' is a sequence, not a tensor"):
        inspect_model(model.SerializeToString())


def _domain_model(nodes: list[onnx.NodeProto], domains: dict[str, int], functions: Sequence[Any] = ()) -> bytes:
    """Return a model from x float32[1, 4] to y float32[1, 4] that imports the given operator domains."""
    graph = helper.make_graph(nodes, "domains", [_float_tensor("x", [1, 4])], [_float_tensor("y", [1, 4])])
    opsets = [helper.make_opsetid(domain, version) for domain, version in domains.items()]
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = 8
    return model.SerializeToString()


def test_custom_domain_rejected() -> None:
    node = helper.make_node("Mystery", ["x"], ["y"], name="mystery_1", domain="com.example.custom")
    content = _domain_model([node], {"": 17, "com.example.custom": 1})

    with pytest.raises(ModelFileError) as caught:
        inspect_model(content, "custom.onnx")

    message = str(caught.value)
    assert "ONNX model custom.onnx: node 'mystery_1' (op_type Mystery, in the main graph)" in message
    assert "uses operator domain 'com.example.custom'" in message
    assert "com.microsoft" in message


def test_custom_domain_in_subgraph_rejected() -> None:
    inner = helper.make_graph(
        [helper.make_node("Mystery", ["x"], ["z"], domain="com.example")], "then", [], [_float_tensor("z", [1, 4])]
    )
    otherwise = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["w"])], "else", [], [_float_tensor("w", [1, 4])]
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Cast", ["total"], ["flag"], to=TensorProto.BOOL),
        helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=inner, else_branch=otherwise),
    ]

    with pytest.raises(
        ModelFileError, match=r"node with output 'z' \(op_type Mystery, in subgraph then_branch of node 'branch'\)"
    ):
        inspect_model(_domain_model(nodes, {"": 17, "com.example": 1}))


def test_unknown_operator_of_runtime_domain_rejected() -> None:
    """A domain that onnxruntime ships does not make every op_type in it loadable."""
    node = helper.make_node("NotAnOp", ["x"], ["y"], name="typo_1", domain="com.microsoft")
    content = _domain_model([node], {"": 17, "com.microsoft": 1})

    with pytest.raises(ModelFileError) as caught:
        inspect_model(content, "typo.onnx")

    message = str(caught.value)
    assert "ONNX model typo.onnx: node 'typo_1' (in the main graph) uses operator com.microsoft:NotAnOp" in message
    assert "devices cannot load the model" in message
    assert "check the op_type's spelling" in message


def test_runtime_domains_accepted() -> None:
    """Operators of the domains onnxruntime ships, and calls of the model's own functions, load on devices."""
    gelu = helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")
    double = helper.make_function(
        "local.functions",
        "Double",
        ["a"],
        ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    call = helper.make_node("Double", ["x"], ["y"], domain="local.functions")

    assert inspect_model(_domain_model([gelu], {"": 17, "com.microsoft": 1})).layers == 1
    assert inspect_model(_domain_model([call], {"": 17, "local.functions": 1}, [double])).layers == 1


@pytest.mark.parametrize("domains", [{"": 17}, {"ai.onnx": 17}, {"": 17, "ai.onnx": 17}])
def test_explicit_ai_onnx_domain_accepted(domains: dict[str, int]) -> None:
    """Nodes and opset imports may name the default domain "ai.onnx" instead of "", as onnxruntime accepts."""
    import onnxruntime

    nodes = [
        helper.make_node("Relu", ["x"], ["hidden"], domain="ai.onnx"),
        helper.make_node("Sigmoid", ["hidden"], ["y"]),
    ]
    content = _domain_model(nodes, domains)
    session = onnxruntime.InferenceSession(content, providers=["CPUExecutionProvider"])
    samples = np.array([[-1.0, 0.0, 1.0, 2.0]], np.float32)

    metadata = inspect_model(content, "explicit.onnx")

    assert session.run(None, {"x": samples})[0].shape == (1, 4)
    assert metadata.layers == 2
    assert metadata.opset == 17


def test_int64_and_bool_accepted() -> None:
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])
    mask = helper.make_tensor_value_info("mask", TensorProto.BOOL, ["n"])
    inverted = helper.make_tensor_value_info("inverted", TensorProto.BOOL, ["n"])
    nodes = [helper.make_node("Not", ["mask"], ["inverted"]), helper.make_node("Identity", ["ids"], ["copy"])]
    copy = helper.make_tensor_value_info("copy", TensorProto.INT64, ["n"])

    metadata = inspect_model(_model_bytes(nodes, [ids, mask], [inverted, copy]))

    assert [spec.dtype for spec in metadata.inputs] == ["int64", "bool"]
    assert [spec.dtype for spec in metadata.outputs] == ["bool", "int64"]


def test_random_bytes_rejected() -> None:
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ModelFileError, match="is not a model file"):
        inspect_model(data)


def test_text_rejected() -> None:
    with pytest.raises(ModelFileError, match="is not a model file"):
        inspect_model(b"name,latency_ms\nresnet,12.5\n")


def test_empty_rejected() -> None:
    with pytest.raises(ModelFileError, match="is empty"):
        inspect_model(b"")


def test_truncated_onnx_rejected() -> None:
    data = _large_onnx()
    with pytest.raises(ModelFileError, match=r"ONNX model .* is truncated"):
        inspect_model(data[: len(data) // 2])


def test_onnx_without_graph_rejected() -> None:
    with pytest.raises(ModelFileError, match="is not a model file"):
        inspect_model(onnx.ModelProto(ir_version=8).SerializeToString())


@pytest.mark.parametrize("opset", [3, 99])
def test_unsupported_opset_rejected(opset: int) -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    data = _model_bytes([node], [_float_tensor("x", [1, 4])], [_float_tensor("y", [1, 4])], opset=opset)
    low, high = supported_opset_range()
    with pytest.raises(ModelFileError, match=rf"opset {opset}, outside the range {low} to {high}"):
        inspect_model(data)


def test_supported_opset_range() -> None:
    low, high = supported_opset_range()
    assert low == 7
    assert high >= 21
    assert high <= onnx.defs.onnx_opset_version()


def test_checker_failure_rejected() -> None:
    # The Relu reads a tensor that nothing defines.
    node = helper.make_node("Relu", ["missing"], ["y"])
    data = _model_bytes([node], [_float_tensor("x", [1, 4])], [_float_tensor("y", [1, 4])])
    with pytest.raises(ModelFileError, match=r"failed onnx\.checker"):
        inspect_model(data)


def test_missing_file_raises() -> None:
    with pytest.raises(FileNotFoundError):
        inspect_model(Path("/nonexistent/model.onnx"))


# A PyTorch MobileNet-style block exported to ONNX and quantized to int8.

# Input (1, 3, 32, 32). Stem conv 3->16, 3x3, stride 2 -> (16, 16, 16); depthwise 3x3; pointwise
# 16->32 -> (32, 16, 16); global average pool; linear 32->10.
BLOCK_MACS = {
    "Conv": 16 * 16 * 16 * 3 * 9 + 16 * 16 * 16 * 9 + 32 * 16 * 16 * 16,
    "Gemm": 32 * 10,
}
# Batch norm folds into the convolutions on export, giving each a bias.
BLOCK_PARAMETERS = (16 * 27 + 16) + (16 * 9 + 16) + (32 * 16 + 32) + (32 * 10 + 10)


@pytest.fixture(scope="module")
def block_onnx(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    torch = pytest.importorskip("torch")
    nn = torch.nn

    torch.manual_seed(0)
    block = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    # Random running statistics give every folded bias distinct values, so the exporter cannot
    # share one constant between two layers.
    for module in block.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch 2.13 deprecates the TorchScript exporter that dynamo=False selects.
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
        torch.onnx.export(
            block.eval(),
            (torch.randn(1, 3, 32, 32),),
            buffer,
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
        )
    return buffer.getvalue()


@pytest.mark.slow
def test_torch_block_metadata(block_onnx: bytes) -> None:
    metadata = inspect_model(block_onnx)
    assert metadata.macs_by_op_type == BLOCK_MACS
    assert metadata.macs == sum(BLOCK_MACS.values())
    assert metadata.parameters == BLOCK_PARAMETERS
    assert metadata.precision == "fp32"
    assert metadata.inputs[0].shape == (-1, 3, 32, 32)
    assert metadata.inputs[0].dim_names == ("batch", "", "", "")
    assert metadata.outputs[0].shape == (-1, 10)
    # The pointwise conv output and its ReLU output, (32, 16, 16) float32 each, are alive together.
    assert metadata.peak_activation_bytes == 2 * 32 * 16 * 16 * 4


@pytest.mark.slow
def test_qdq_block_metadata(block_onnx: bytes, tmp_path: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class RandomImages(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self._batches = iter([{"image": rng.standard_normal((1, 3, 32, 32), dtype=np.float32)} for _ in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    float_path = tmp_path / "block.onnx"
    float_path.write_bytes(block_onnx)
    int8_path = tmp_path / "block_int8.onnx"
    quantize_static(float_path, int8_path, RandomImages(), quant_format=QuantFormat.QDQ)

    metadata = inspect_model(int8_path)
    assert metadata.precision == "int8"
    assert metadata.macs_by_op_type == BLOCK_MACS
    assert metadata.parameters == BLOCK_PARAMETERS
    assert "DequantizeLinear" not in metadata.macs_by_op_type


# TFLite models.


def _shape_of(metadata: ModelMetadata, name: str) -> tuple[int, ...]:
    specs = {spec.name: spec for spec in (*metadata.inputs, *metadata.outputs)}
    return specs[name].shape


@pytest.fixture(scope="session")
def face_detector() -> bytes:
    """Return MediaPipe's short-range face detector, extracted once from the mediapipe wheel."""
    target = MEDIAPIPE_CACHE / Path(FACE_DETECTOR_MEMBER).name
    if not target.exists():
        MEDIAPIPE_CACHE.mkdir(parents=True, exist_ok=True)
        wheels = sorted(MEDIAPIPE_CACHE.glob("mediapipe-*.whl"))
        if not wheels:
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
            command += [f"mediapipe=={MEDIAPIPE_VERSION}", "-d", str(MEDIAPIPE_CACHE)]
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
            except subprocess.TimeoutExpired:
                pytest.skip(f"pip timed out fetching mediapipe=={MEDIAPIPE_VERSION} from the package registry")
            if result.returncode != 0:
                pytest.skip(f"pip could not fetch mediapipe=={MEDIAPIPE_VERSION}: {result.stderr.strip()[-400:]}")
            wheels = sorted(MEDIAPIPE_CACHE.glob("mediapipe-*.whl"))
        with zipfile.ZipFile(wheels[0]) as wheel:
            partial = target.with_suffix(".partial")
            partial.write_bytes(wheel.read(FACE_DETECTOR_MEMBER))
            partial.replace(target)
    return target.read_bytes()


def _flatbuffer_parameters(content: bytes) -> int:
    """Count the elements of main-subgraph tensors that have data in a buffer, read with the schema."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(content, 0)
    subgraph = model.Subgraphs(0)
    total = 0
    for position in range(subgraph.TensorsLength()):
        tensor = subgraph.Tensors(position)
        buffer = model.Buffers(tensor.Buffer())
        if buffer.DataLength() or buffer.Size():
            total += math.prod(tensor.ShapeAsNumpy().tolist()) if tensor.ShapeLength() else 1
    return total


def test_face_detector_metadata(face_detector: bytes) -> None:
    metadata = inspect_model(face_detector)
    assert metadata.format == "tflite"
    assert metadata.opset == 3
    assert metadata.inputs[0].name == "input"
    assert metadata.inputs[0].shape == (1, 128, 128, 3)
    assert metadata.inputs[0].dtype == "float32"
    assert metadata.inputs[0].scale == 0.0
    assert _shape_of(metadata, "regressors") == (1, 896, 16)
    assert _shape_of(metadata, "classificators") == (1, 896, 1)
    # The weights are stored as float16 and dequantized at load time.
    assert metadata.precision == "fp16"
    assert metadata.parameters == _flatbuffer_parameters(face_detector)
    assert set(metadata.macs_by_op_type) == {"CONV_2D", "DEPTHWISE_CONV_2D"}
    assert metadata.macs == sum(metadata.macs_by_op_type.values())
    assert metadata.layers == 164
    # The first convolution alone, 24 filters of 5x5x3 over a 64x64 output, is a lower bound.
    assert metadata.macs > 64 * 64 * 24 * 5 * 5 * 3
    # At least the float32 input image is alive at the start.
    assert metadata.peak_activation_bytes >= 128 * 128 * 3 * 4


def test_truncated_tflite_rejected(face_detector: bytes) -> None:
    with pytest.raises(ModelFileError, match=r"TFLite model .* is truncated or corrupt"):
        inspect_model(face_detector[: len(face_detector) // 2])


def test_tflite_header_only_rejected() -> None:
    with pytest.raises(ModelFileError, match=r"TFLite model .* is truncated or corrupt"):
        inspect_model(b"\x1c\x00\x00\x00TFL3" + bytes(8))


# Converting with litert-torch imports torch and JAX and takes tens of seconds. So it runs once, in
# a subprocess that leaves this process's warning filters alone, and the result is cached under a
# hash of the script and the converter versions.
_CONVERT_SCRIPT = textwrap.dedent(
    """
    import sys
    import warnings
    from pathlib import Path

    import numpy as np
    import torch
    import litert_torch
    from ai_edge_quantizer import quantizer, recipe

    warnings.simplefilter("ignore")


    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.grouped = torch.nn.Conv2d(8, 16, 1, groups=2)
            self.linear = torch.nn.Linear(16, 10)

        def forward(self, x):
            x = self.grouped(self.depthwise(torch.relu(self.conv(x))))
            return self.linear(x.mean(dim=(2, 3)))


    class Upsample(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transposed = torch.nn.ConvTranspose2d(4, 6, 3, stride=2)
            self.b = torch.nn.Parameter(torch.randn(2, 7, 5))

        def forward(self, x, a):
            return self.transposed(x), torch.matmul(a, self.b)


    torch.manual_seed(0)
    directory = Path(sys.argv[1])
    float_path = str(directory / "block-float32.tflite")
    litert_torch.convert(Block().eval(), (torch.randn(1, 3, 16, 16),)).export(float_path)
    tool = quantizer.Quantizer(float_path)
    tool.load_quantization_recipe(recipe.static_wi8_ai8())
    rng = np.random.default_rng(0)
    samples = [{"args_0": rng.standard_normal((1, 3, 16, 16), dtype=np.float32)} for _ in range(4)]
    calibration = tool.calibrate({"serving_default": samples})
    result = tool.quantize(calibration, enable_progress_report=False)
    result.export_model(str(directory / "block-int8.tflite"), overwrite=True)
    example = (torch.randn(1, 4, 5, 5), torch.randn(2, 3, 7))
    litert_torch.convert(Upsample().eval(), example).export(str(directory / "upsample.tflite"))
    """
)
CONVERTED_NAMES = ("block-float32", "block-int8", "upsample")
# Outputs are 16x16: the 3x3 conv gives 8 channels x 27 MACs, the depthwise conv 8 x 9 and the
# grouped 1x1 conv 16 x (8 / 2); then a 16 -> 10 fully connected layer.
BLOCK_TFLITE_MACS = {
    "CONV_2D": 16 * 16 * 8 * 27 + 16 * 16 * 16 * 4,
    "DEPTHWISE_CONV_2D": 16 * 16 * 8 * 9,
    "FULLY_CONNECTED": 16 * 10,
}
BLOCK_TFLITE_WEIGHTS = (8 * 27 + 8) + (8 * 9 + 8) + (16 * 4 + 16) + (16 * 10 + 10)


@pytest.fixture(scope="session")
def converted_tflite() -> dict[str, bytes]:
    """Return TFLite models converted by litert-torch and quantized by ai-edge-quantizer, by name."""
    for module in ("litert_torch", "ai_edge_quantizer"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed; install the compress extra to convert TFLite models")
    versions = [importlib.metadata.version(name) for name in ("litert-torch", "ai-edge-quantizer", "torch")]
    key = hashlib.sha256("\n".join([_CONVERT_SCRIPT, *versions]).encode()).hexdigest()[:16]
    cache = REPOSITORY / ".cache" / "modelinfo-tests" / key
    if not all((cache / f"{name}.tflite").exists() for name in CONVERTED_NAMES):
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache.parent) as scratch:
            command = [sys.executable, "-c", _CONVERT_SCRIPT, scratch]
            result = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
            assert result.returncode == 0, result.stderr[-2000:]
            cache.mkdir(exist_ok=True)
            for name in CONVERTED_NAMES:
                (Path(scratch) / f"{name}.tflite").replace(cache / f"{name}.tflite")
    return {name: (cache / f"{name}.tflite").read_bytes() for name in CONVERTED_NAMES}


@pytest.mark.slow
def test_converted_tflite_float(converted_tflite: dict[str, bytes]) -> None:
    content = converted_tflite["block-float32"]
    metadata = inspect_model(content)
    assert metadata.macs_by_op_type == BLOCK_TFLITE_MACS
    assert metadata.precision == "fp32"
    assert metadata.inputs[0].shape == (1, 3, 16, 16)
    assert metadata.inputs[0].dtype == "float32"
    assert metadata.outputs[0].shape == (1, 10)
    assert metadata.parameters == _flatbuffer_parameters(content)
    # The converter adds small int32 constants (transpose permutations, mean axes) to the weights.
    assert BLOCK_TFLITE_WEIGHTS <= metadata.parameters <= BLOCK_TFLITE_WEIGHTS + 16
    # The converter moves the grouped conv output (1, 16, 16, 16) back to NCHW with a TRANSPOSE,
    # and both float32 tensors are alive during it.
    assert metadata.peak_activation_bytes == 2 * 16 * 16 * 16 * 4


@pytest.mark.slow
def test_converted_tflite_int8(converted_tflite: dict[str, bytes]) -> None:
    float_metadata = inspect_model(converted_tflite["block-float32"])
    metadata = inspect_model(converted_tflite["block-int8"])
    assert metadata.precision == "int8"
    assert metadata.macs_by_op_type == BLOCK_TFLITE_MACS
    assert metadata.parameters == float_metadata.parameters
    assert metadata.inputs[0].dtype == "int8"
    assert metadata.inputs[0].scale > 0.0
    assert metadata.outputs[0].scale > 0.0
    # Every activation is int8, a quarter of the float32 bytes.
    assert metadata.peak_activation_bytes == float_metadata.peak_activation_bytes // 4


@pytest.mark.slow
def test_converted_transpose_conv_matmul(converted_tflite: dict[str, bytes]) -> None:
    metadata = inspect_model(converted_tflite["upsample"])
    # Each of the 4 * 5 * 5 input elements reaches C_out * 3 * 3 = 6 * 9 outputs, and the batched
    # (2, 3, 7) @ (2, 7, 5) product has 2 * 3 * 5 outputs of 7 MACs each.
    assert metadata.macs_by_op_type == {"TRANSPOSE_CONV": 4 * 5 * 5 * 6 * 9, "BATCH_MATMUL": 2 * 3 * 5 * 7}
    assert [spec.shape for spec in metadata.inputs] == [(1, 4, 5, 5), (2, 3, 7)]
