"""Tests for static and dynamic int8 quantization and the calibration data readers."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from edgefleet.agent.infer_cli import load_image
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
    correct_bias,
    default_opset,
    quantize_dynamic_int8,
    quantize_static_qdq,
    recommend_quantization,
    requantized_exclusions,
)
from tests.photos import corrupt_exif, write_sideways_photo

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
            model,
            (torch.zeros(1, 3, SIZE, SIZE),),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}},
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


def test_static_qdq_reports_stages(conv_net: Path, tmp_path: Path) -> None:
    """Each step before the quantization is reported, and calibration batches as onnxruntime reads them."""
    stages: list[tuple[float, str]] = []
    quantize_static_qdq(
        conv_net,
        tmp_path / "int8.onnx",
        samples(6, seed=1),
        calibration_batch_size=2,
        bias_correction=True,
        stage_progress=lambda fraction, text: stages.append((fraction, text)),
    )

    texts = [text.split(" (")[0].split(" on ")[0] for _, text in stages]
    assert texts == [
        "preparing the graph for int8 quantization",
        "correcting biases for the int8 weights' error",
        "calibrating activation ranges: batch 1/3",
        "calibrating activation ranges: batch 2/3",
        "calibrating activation ranges: batch 3/3",
        "quantizing weights and activations with the calibrated ranges",
    ]
    fractions = [fraction for fraction, _ in stages]
    assert fractions == sorted(fractions)
    assert fractions[0] == 0.0
    assert fractions[-1] <= 1.0


def test_static_qdq_per_channel_weights(quantized: Path) -> None:
    model = onnx.load(str(quantized))
    initializers = {init.name: init for init in model.graph.initializer}
    conv_weight_scales = [
        initializers[node.input[1]]
        for node in model.graph.node
        if node.op_type == "DequantizeLinear"
        and node.input[1] in initializers
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
        conv_net,
        tmp_path / "act-int8.onnx",
        samples(16, seed=5),
        activation_type="int8",
        calibration_method="percentile",
    )
    zero_points = [init for init in onnx.load(str(output)).graph.initializer if init.data_type == TensorProto.INT8]
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


def test_calibration_not_finite(conv_net: Path) -> None:
    data = np.zeros((3, 3, SIZE, SIZE), dtype=np.float32)
    data[1, 2, 0, 0] = np.inf
    with pytest.raises(CalibrationError, match="NaN or infinite values in 1 of 3 samples"):
        reader_from_array(conv_net, data)


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
    spec = PreprocessSpec(height=8, width=8, mean=(0, 0, 0), std=(1, 1, 1), layout="NHWC", channel_order="BGR")
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
        nodes,
        "g",
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
        [node],
        "mlp",
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
        format="onnx",
        inputs=(),
        outputs=(),
        opset=17,
        parameters=0,
        macs=sum(macs_by_op_type.values()),
        peak_activation_bytes=0,
        macs_by_op_type=macs_by_op_type,
    )


def test_recommend_conv_static() -> None:
    assert recommend_quantization(metadata({"Conv": 900, "Gemm": 100})) == "static"


def test_recommend_matmul_dynamic() -> None:
    assert recommend_quantization(metadata({"MatMul": 900, "Conv": 100})) == "dynamic"


def test_recommend_unknown_static() -> None:
    assert recommend_quantization(metadata({})) == "static"


def linear_model(path: Path, op_type: str, *, with_bias: bool = True) -> Path:
    """Save a one-node Conv (3x3, 4 -> 6 channels) or Gemm (transB, 4 -> 6) model with outlier weights.

    One large weight per output channel makes the int8 step coarse, so rounding shifts the output mean.
    """
    rng = np.random.default_rng(11)
    shape = [6, 4, 3, 3] if op_type == "Conv" else [6, 4]
    weight = rng.standard_normal(shape).astype(np.float32) * 0.1
    weight.reshape(6, -1)[:, 0] = 3.0
    initializers = [numpy_helper.from_array(weight, "weight")]
    inputs = ["input", "weight"]
    if with_bias:
        initializers.append(numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "bias"))
        inputs.append("bias")
    if op_type == "Conv":
        node = helper.make_node("Conv", inputs, ["output"], name="linear", pads=[1, 1, 1, 1])
        input_shape, output_shape = [None, 4, 8, 8], [None, 6, 8, 8]
    else:
        node = helper.make_node("Gemm", inputs, ["output"], name="linear", transB=1)
        input_shape, output_shape = [None, 4], [None, 6]
    graph = helper.make_graph(
        [node],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, output_shape)],
        initializer=initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def positive_samples(op_type: str, count: int = 64) -> np.ndarray:
    shape = (count, 4, 8, 8) if op_type == "Conv" else (count, 4)
    return np.random.default_rng(12).uniform(0.0, 1.0, shape).astype(np.float32)


def dequantized_weight(quantized: Path) -> np.ndarray:
    """Read the int8 weight of the one-node model back as float32, the way DequantizeLinear computes it."""
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(quantized)).graph.initializer}
    values = initializers["weight_quantized"].astype(np.float32)
    scale = initializers["weight_scale"].astype(np.float32)
    return values * scale.reshape((-1,) + (1,) * (values.ndim - 1))


def channel_means(path: Path, inputs: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    model = onnx.load(str(path))
    for index, init in enumerate(model.graph.initializer):
        replacement = weight if init.name == "weight" else bias
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(replacement, init.name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    output = np.asarray(session.run(None, {"input": inputs})[0])
    return output.mean(axis=(0, 2, 3)) if output.ndim == 4 else output.mean(axis=0)


@pytest.mark.parametrize("op_type", ["Conv", "Gemm"])
def test_correct_bias_cancels_mean_error(op_type: str, tmp_path: Path) -> None:
    source = linear_model(tmp_path / "linear.onnx", op_type)
    inputs = positive_samples(op_type)
    # correct_bias rounds to the 8-bit grid by default, so the quantizer must not choose 7 bits on this CPU.
    quantized = quantize_static_qdq(source, tmp_path / "linear.int8.onnx", inputs, reduce_range=False)
    corrected = correct_bias(onnx.load(str(source)), [{"input": inputs}])
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(source)).graph.initializer}
    corrected_bias = {i.name: numpy_helper.to_array(i) for i in corrected.graph.initializer}["bias"]
    weight_int8 = dequantized_weight(quantized)

    reference = channel_means(source, inputs, initializers["weight"], initializers["bias"])
    uncorrected = channel_means(source, inputs, weight_int8, initializers["bias"])
    fixed = channel_means(source, inputs, weight_int8, corrected_bias)
    assert float(np.abs(uncorrected - reference).max()) > 1e-3
    assert float(np.abs(fixed - reference).max()) < 1e-4


def test_correct_bias_adds_missing_bias(tmp_path: Path) -> None:
    source = linear_model(tmp_path / "nobias.onnx", "Conv", with_bias=False)
    corrected = correct_bias(onnx.load(str(source)), [{"input": positive_samples("Conv", 8)}])
    node = corrected.graph.node[0]
    assert len(node.input) == 3
    assert node.input[2] in {i.name for i in corrected.graph.initializer}


def test_correct_bias_skips_excluded(tmp_path: Path) -> None:
    source = onnx.load(str(linear_model(tmp_path / "linear.onnx", "Conv")))
    corrected = correct_bias(source, [{"input": positive_samples("Conv", 8)}], nodes_to_exclude=("linear",))
    assert corrected.graph.initializer == source.graph.initializer


def test_static_qdq_bias_correction_reader(conv_net: Path, tmp_path: Path) -> None:
    reader = reader_from_array(conv_net, samples(32, seed=1), batch_size=4)
    output = quantize_static_qdq(conv_net, tmp_path / "corrected.onnx", reader, bias_correction=True)
    inputs = samples(64, seed=2)
    agreement = float(np.mean(run(conv_net, inputs).argmax(axis=1) == run(output, inputs).argmax(axis=1)))
    assert agreement >= 0.9


def test_requantized_exclusions_middle_conv(conv_net: Path, tmp_path: Path) -> None:
    convs = tuple(n.name for n in onnx.load(str(conv_net)).graph.node if n.op_type == "Conv")
    output = quantize_static_qdq(conv_net, tmp_path / "middle.onnx", samples(8, seed=1), nodes_to_exclude=convs[1:2])
    assert requantized_exclusions(onnx.load(str(output)), convs[1:2]) == [convs[1]]


def test_requantized_exclusions_leading_conv(conv_net: Path, tmp_path: Path) -> None:
    convs = tuple(n.name for n in onnx.load(str(conv_net)).graph.node if n.op_type == "Conv")
    output = quantize_static_qdq(conv_net, tmp_path / "leading.onnx", samples(8, seed=1), nodes_to_exclude=convs[:1])
    assert requantized_exclusions(onnx.load(str(output)), convs[:1]) == []


def test_calibration_images_apply_exif_orientation(tmp_path: Path) -> None:
    write_sideways_photo(tmp_path / "portrait.jpg")
    spec = PreprocessSpec(height=16, width=8, mean=(0, 0, 0), std=(1, 1, 1), resize_shorter=8)

    loaded = load_image_folder(tmp_path, spec)

    assert loaded.shape == (1, 3, 16, 8)
    red, blue = loaded[0, 0], loaded[0, 2]
    assert red[1].mean() > 0.8
    assert blue[1].mean() < 0.2
    assert blue[-2].mean() > 0.8
    assert red[-2].mean() < 0.2


def test_calibration_images_ignore_corrupt_exif(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A photo with EXIF data cut short is read as stored, with one warning naming it."""
    path = tmp_path / "cut.jpg"
    write_sideways_photo(path, exif=corrupt_exif())
    spec = PreprocessSpec(height=8, width=16, mean=(0, 0, 0), std=(1, 1, 1), resize_shorter=8)

    loaded = load_image_folder(tmp_path, spec)

    assert loaded.shape == (1, 3, 8, 16)
    red, blue = loaded[0, 0], loaded[0, 2]
    assert red[:, 1].mean() > 0.8
    assert blue[:, -2].mean() > 0.8
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(messages) == 1, messages
    assert f"ignored the EXIF data of calibration image {path}" in messages[0]
    assert "Corrupt EXIF data" in messages[0]


def test_calibration_images_scale_16_bit_grayscale(tmp_path: Path) -> None:
    """A 16-bit grayscale PNG is read as edgefleet-agent infer reads it, not clipped to white at 255."""
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "depth.png")
    spec = PreprocessSpec(height=16, width=16, mean=(0, 0, 0), std=(1, 1, 1), layout="NHWC")

    loaded = load_image_folder(tmp_path, spec)

    pixels = np.rint(loaded[0] * 255)
    assert pixels.min() == 0
    assert pixels.max() == 255
    assert np.array_equal(pixels, load_image(tmp_path / "depth.png", 16, 16, crop_fraction=1.0)[0])
