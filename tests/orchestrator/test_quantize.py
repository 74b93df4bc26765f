"""Tests for static and dynamic int8 quantization and the calibration data readers."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from edgefleet.common.models import ModelMetadata
from edgefleet.orchestrator.compress.calibration import (
    CalibrationError,
    PreprocessSpec,
    load_image_folder,
    reader_from_array,
    reader_from_images,
    reader_from_npz,
)
from edgefleet.orchestrator.compress.quantize import (
    QuantizationError,
    default_opset,
    quantize_dynamic_int8,
    quantize_static_qdq,
    recommend_quantization,
)

SIZE = 32


def export_conv_net(path: Path, *, opset: int = 17, seed: int = 0) -> Path:
    """Export a small conv classifier with a dynamic batch axis through the TorchScript exporter."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(1, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=opset,
            input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}},
        )
    return path


def samples(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, SIZE, SIZE)).astype(np.float32)


def run(path: Path, inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": inputs})[0])


@pytest.fixture(scope="module")
def conv_net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_conv_net(tmp_path_factory.mktemp("conv") / "conv.onnx")


@pytest.fixture(scope="module")
def quantized(conv_net: Path) -> Path:
    return quantize_static_qdq(conv_net, conv_net.with_name("conv.int8.onnx"), samples(32, seed=1))


def test_static_qdq_inserts_qdq(quantized: Path) -> None:
    op_types = {node.op_type for node in onnx.load(str(quantized)).graph.node}
    assert "QuantizeLinear" in op_types
    assert "DequantizeLinear" in op_types


def test_static_qdq_agrees_with_source(conv_net: Path, quantized: Path) -> None:
    inputs = samples(64, seed=2)
    expected = run(conv_net, inputs)
    actual = run(quantized, inputs)
    agreement = float(np.mean(expected.argmax(axis=1) == actual.argmax(axis=1)))
    assert agreement >= 0.9
    assert float(np.abs(expected - actual).mean()) < 0.1 * float(expected.std())


def test_static_qdq_per_channel_weights(quantized: Path) -> None:
    model = onnx.load(str(quantized))
    initializers = {init.name: init for init in model.graph.initializer}
    conv_weight_scales = [
        initializers[node.input[1]]
        for node in model.graph.node
        if node.op_type == "DequantizeLinear" and node.input[1] in initializers
        and any(a.name == "axis" for a in node.attribute)
    ]
    assert conv_weight_scales
    assert all(int(np.prod(scale.dims)) > 1 for scale in conv_weight_scales)


def test_static_qdq_smaller(conv_net: Path, quantized: Path) -> None:
    assert quantized.stat().st_size < conv_net.stat().st_size


def test_static_qdq_upgrades_opset11(tmp_path: Path) -> None:
    source = export_conv_net(tmp_path / "opset11.onnx", opset=11)
    assert default_opset(onnx.load(str(source))) == 11
    output = quantize_static_qdq(source, tmp_path / "opset11.int8.onnx", samples(8, seed=3))
    assert default_opset(onnx.load(str(output))) >= 13
    assert run(output, samples(2, seed=4)).shape == (2, 10)


def test_static_qdq_int8_activations(conv_net: Path, tmp_path: Path) -> None:
    output = quantize_static_qdq(
        conv_net, tmp_path / "act-int8.onnx", samples(16, seed=5), activation_type="int8",
        calibration_method="percentile",
    )
    zero_points = [
        init for init in onnx.load(str(output)).graph.initializer if init.data_type == TensorProto.INT8
    ]
    assert zero_points
    assert run(output, samples(2, seed=6)).shape == (2, 10)


def test_static_qdq_invalid_activation(conv_net: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="activation_type 'int4'"):
        quantize_static_qdq(conv_net, tmp_path / "x.onnx", samples(4, seed=0), activation_type="int4")


def test_calibration_wrong_shape(conv_net: Path, tmp_path: Path) -> None:
    wrong = np.zeros((4, 3, 16, 16), dtype=np.float32)
    with pytest.raises(CalibrationError) as caught:
        quantize_static_qdq(conv_net, tmp_path / "x.onnx", wrong)
    assert "(4, 3, 16, 16)" in str(caught.value)
    assert "(N, 3, 32, 32)" in str(caught.value)


def test_calibration_wrong_rank(conv_net: Path) -> None:
    with pytest.raises(CalibrationError, match=r"shape \(3, 32, 32\), expected \(N, 3, 32, 32\)"):
        reader_from_array(conv_net, np.zeros((3, SIZE, SIZE), dtype=np.float32))


def test_calibration_wrong_dtype(conv_net: Path) -> None:
    with pytest.raises(CalibrationError, match="dtype float64, expected float32"):
        reader_from_array(conv_net, np.zeros((2, 3, SIZE, SIZE), dtype=np.float64))


def test_calibration_reader_batches(conv_net: Path) -> None:
    reader = reader_from_array(conv_net, samples(5, seed=0), batch_size=2)
    shapes = []
    while (batch := reader.get_next()) is not None:
        shapes.append(batch["input"].shape[0])
    assert shapes == [2, 2, 1]
    reader.rewind()
    assert reader.get_next() is not None


def test_calibration_empty_folder(conv_net: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")
    with pytest.raises(CalibrationError, match="contains no images"):
        reader_from_images(conv_net, tmp_path, PreprocessSpec(height=SIZE, width=SIZE))


def test_calibration_missing_folder(conv_net: Path, tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="not found"):
        reader_from_images(conv_net, tmp_path / "absent", PreprocessSpec(height=SIZE, width=SIZE))


def write_images(folder: Path, count: int) -> None:
    rng = np.random.default_rng(7)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(48 + i, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{i}.png")


def test_calibration_images_quantize(conv_net: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    write_images(folder, 6)
    reader = reader_from_images(conv_net, folder, PreprocessSpec(height=SIZE, width=SIZE))
    assert len(reader) == 6
    output = quantize_static_qdq(conv_net, tmp_path / "images.int8.onnx", reader)
    assert run(output, samples(1, seed=0)).shape == (1, 10)


def test_calibration_images_wrong_size(conv_net: Path, tmp_path: Path) -> None:
    write_images(tmp_path, 2)
    with pytest.raises(CalibrationError, match=r"shape \(2, 3, 24, 24\)"):
        reader_from_images(conv_net, tmp_path, PreprocessSpec(height=24, width=24))


def test_preprocess_nhwc_bgr(tmp_path: Path) -> None:
    pixels = np.zeros((10, 10, 3), dtype=np.uint8)
    pixels[..., 0] = 255  # Pure red.
    Image.fromarray(pixels).save(tmp_path / "red.png")
    spec = PreprocessSpec(
        height=8, width=8, mean=(0, 0, 0), std=(1, 1, 1), layout="NHWC", channel_order="BGR"
    )
    loaded = load_image_folder(tmp_path, spec)
    assert loaded.shape == (1, 8, 8, 3)
    assert float(loaded[0, 0, 0, 2]) == pytest.approx(1.0)
    assert float(loaded[0, 0, 0, 0]) == pytest.approx(0.0)


def test_calibration_npz(conv_net: Path, tmp_path: Path) -> None:
    path = tmp_path / "calibration.npz"
    np.savez(path, input=samples(3, seed=0))
    assert len(reader_from_npz(conv_net, path)) == 3


def test_calibration_npz_missing_key(conv_net: Path, tmp_path: Path) -> None:
    path = tmp_path / "calibration.npz"
    np.savez(path, images=samples(3, seed=0))
    with pytest.raises(CalibrationError, match="no array named 'input'"):
        reader_from_npz(conv_net, path)


def save_graph(path: Path, nodes: list[onnx.NodeProto], domains: dict[str, int]) -> Path:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])],
    )
    opsets = [helper.make_opsetid(domain, version) for domain, version in domains.items()]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def test_static_qdq_custom_op(tmp_path: Path) -> None:
    node = helper.make_node("FancyActivation", ["input"], ["output"], domain="com.example")
    source = save_graph(tmp_path / "custom.onnx", [node], {"": 17, "com.example": 1})
    with pytest.raises(QuantizationError, match=r"custom domains.*com\.example::FancyActivation"):
        quantize_static_qdq(source, tmp_path / "out.onnx", np.zeros((1, 4), dtype=np.float32))


def test_static_qdq_nothing_quantizable(tmp_path: Path) -> None:
    node = helper.make_node("Exp", ["input"], ["output"])
    source = save_graph(tmp_path / "exp.onnx", [node], {"": 17})
    with pytest.raises(QuantizationError, match=r"can quantize \(found \['Exp'\]"):
        quantize_static_qdq(source, tmp_path / "out.onnx", np.zeros((1, 4), dtype=np.float32))


def test_static_qdq_unloadable(tmp_path: Path) -> None:
    source = tmp_path / "garbage.onnx"
    source.write_bytes(b"\x08\x07not a model")
    with pytest.raises(QuantizationError, match=r"garbage\.onnx"):
        quantize_static_qdq(source, tmp_path / "out.onnx", np.zeros((1, 4), dtype=np.float32))


def test_dynamic_rejects_conv_net(conv_net: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match=r"dynamic quantization rejected.*convolutions"):
        quantize_dynamic_int8(conv_net, tmp_path / "dynamic.onnx")


def test_dynamic_forced_conv_net(conv_net: Path, tmp_path: Path) -> None:
    output = quantize_dynamic_int8(conv_net, tmp_path / "dynamic.onnx", force=True)
    assert run(output, samples(1, seed=0)).shape == (1, 10)


def test_dynamic_matmul_model(tmp_path: Path) -> None:
    weight = helper.make_tensor(
        "weight", TensorProto.FLOAT, [4, 4], np.random.default_rng(0).standard_normal(16).astype(np.float32)
    )
    node = helper.make_node("MatMul", ["input", "weight"], ["output"])
    graph = helper.make_graph(
        [node], "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])],
        initializer=[weight],
    )
    source = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    output = quantize_dynamic_int8(source, tmp_path / "mlp.int8.onnx")
    op_types = {node.op_type for node in onnx.load(str(output)).graph.node}
    assert "MatMulInteger" in op_types


def metadata(macs_by_op_type: dict[str, int]) -> ModelMetadata:
    return ModelMetadata(
        format="onnx", inputs=(), outputs=(), opset=17, parameters=0, macs=sum(macs_by_op_type.values()),
        peak_activation_bytes=0, macs_by_op_type=macs_by_op_type,
    )


def test_recommend_conv_static() -> None:
    assert recommend_quantization(metadata({"Conv": 900, "Gemm": 100})) == "static"


def test_recommend_matmul_dynamic() -> None:
    assert recommend_quantization(metadata({"MatMul": 900, "Conv": 100})) == "dynamic"


def test_recommend_unknown_static() -> None:
    assert recommend_quantization(metadata({})) == "static"
