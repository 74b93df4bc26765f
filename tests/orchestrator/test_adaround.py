"""Tests for AdaRound weight rounding on small real ONNX conv models run with onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.orchestrator.compress.adaround import AdaRoundConfig, activation_quantization_params, adaround_weights
from edgefleet.orchestrator.compress.quantize import QuantizationError, quantize_static_qdq

SIZE = 12
FAST = AdaRoundConfig(iterations=150, max_samples=32, positions_per_sample=48)


def conv_model(path: Path) -> Path:
    """Save Conv 3x3 (4 -> 16) -> Clip(0, 6) -> depthwise Conv 3x3 (16) -> Conv 1x1 (16 -> 8).

    Each output channel of the first conv has one large weight, so its int8 step is coarse and the
    rounding error is large against the other weights.
    """
    rng = np.random.default_rng(5)
    first = rng.standard_normal((16, 4, 3, 3)).astype(np.float32) * 0.2
    first.reshape(16, -1)[:, 0] = 2.0
    initializers = [
        numpy_helper.from_array(first, "first_weight"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "first_bias"),
        numpy_helper.from_array(rng.standard_normal((16, 1, 3, 3)).astype(np.float32), "depthwise_weight"),
        numpy_helper.from_array(rng.standard_normal((8, 16, 1, 1)).astype(np.float32) * 0.3, "project_weight"),
        numpy_helper.from_array(np.zeros(8, np.float32), "project_bias"),
        numpy_helper.from_array(np.asarray(0.0, np.float32), "clip_min"),
        numpy_helper.from_array(np.asarray(6.0, np.float32), "clip_max"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "first_weight", "first_bias"], ["first"], name="first", pads=[1] * 4),
        helper.make_node("Clip", ["first", "clip_min", "clip_max"], ["first_clipped"], name="clip"),
        helper.make_node(
            "Conv", ["first_clipped", "depthwise_weight"], ["depthwise"], name="depthwise", pads=[1] * 4, group=16
        ),
        helper.make_node("Conv", ["depthwise", "project_weight", "project_bias"], ["output"], name="project"),
    ]
    graph = helper.make_graph(
        nodes,
        "adaround",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4, SIZE, SIZE])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 8, SIZE, SIZE])],
        initializer=initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def samples(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, (count, 4, SIZE, SIZE)).astype(np.float32)


def run(model: onnx.ModelProto | Path, inputs: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": inputs})[0])


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def nearest_rounded(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy with every Conv weight rounded to nearest on the per-channel symmetric int8 grid."""
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    for init in rounded.graph.initializer:
        if not init.name.endswith("_weight"):
            continue
        weight = numpy_helper.to_array(init)
        scale = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1) / 127
        scale = scale.astype(np.float32).reshape(-1, 1, 1, 1)
        init.CopyFrom(numpy_helper.from_array((np.round(weight / scale) * scale).astype(np.float32), init.name))
    return rounded


def quantized_conv_weights(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return each Conv node's int8 weight and scale from a QDQ model."""
    model = onnx.load(str(path))
    values = weights(model)
    producers = {node.output[0]: node for node in model.graph.node}
    found = {}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        dequantize = producers[node.input[1]]
        found[node.name] = (values[dequantize.input[0]], values[dequantize.input[1]])
    return found


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return conv_model(tmp_path_factory.mktemp("adaround") / "conv.onnx")


@pytest.fixture(scope="module")
def adarounded(source: Path) -> onnx.ModelProto:
    batches = [{"input": samples(32, seed=1)}]
    return adaround_weights(onnx.load(str(source)), batches, correct_biases=False, config=FAST).model


def output_error(model: onnx.ModelProto, source: Path, inputs: np.ndarray) -> float:
    return float(np.mean((run(model, inputs) - run(source, inputs)) ** 2))


def test_adaround_lowers_calibration_error(source: Path, adarounded: onnx.ModelProto) -> None:
    inputs = samples(32, seed=1)
    nearest = output_error(nearest_rounded(onnx.load(str(source))), source, inputs)
    assert output_error(adarounded, source, inputs) < 0.8 * nearest


def test_adaround_lowers_heldout_error(source: Path, adarounded: onnx.ModelProto) -> None:
    inputs = samples(32, seed=2)
    nearest = output_error(nearest_rounded(onnx.load(str(source))), source, inputs)
    assert output_error(adarounded, source, inputs) < 0.9 * nearest


def test_adaround_weights_on_grid(adarounded: onnx.ModelProto) -> None:
    for name, weight in weights(adarounded).items():
        if not name.endswith("_weight"):
            continue
        scale = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1).reshape(-1, 1, 1, 1) / 127
        steps = weight / scale
        assert np.abs(steps - np.round(steps)).max() < 1e-4, name


def test_adaround_keeps_channel_max(source: Path, adarounded: onnx.ModelProto) -> None:
    original = weights(onnx.load(str(source)))["first_weight"].reshape(16, -1)
    rounded = weights(adarounded)["first_weight"].reshape(16, -1)
    np.testing.assert_allclose(np.abs(rounded).max(axis=1), np.abs(original).max(axis=1), rtol=1e-6)


def test_adaround_changes_rounding(source: Path, adarounded: onnx.ModelProto) -> None:
    nearest = weights(nearest_rounded(onnx.load(str(source))))["project_weight"]
    assert not np.array_equal(weights(adarounded)["project_weight"], nearest)


def test_adaround_reports_nodes(source: Path) -> None:
    result = adaround_weights(onnx.load(str(source)), [{"input": samples(8, seed=1)}], config=FAST)
    assert result.rounded_nodes == ("first", "depthwise", "project")
    assert all(0.0 < ratio <= 1.0 for ratio in result.error_ratios.values())


def test_adaround_skips_excluded(source: Path) -> None:
    model = onnx.load(str(source))
    result = adaround_weights(model, [{"input": samples(8, seed=1)}], nodes_to_exclude=("first",), config=FAST)
    assert np.array_equal(weights(result.model)["first_weight"], weights(model)["first_weight"])


def test_adaround_corrects_bias(source: Path) -> None:
    model = onnx.load(str(source))
    result = adaround_weights(model, [{"input": samples(8, seed=1)}], config=FAST)
    assert not np.array_equal(weights(result.model)["project_bias"], weights(model)["project_bias"])


def test_adaround_empty_batches(source: Path) -> None:
    with pytest.raises(ValueError, match="at least one calibration batch"):
        adaround_weights(onnx.load(str(source)), [])


@pytest.mark.parametrize("per_channel", [True, False])
def test_static_qdq_adaround_grid(source: Path, tmp_path: Path, per_channel: bool) -> None:
    """onnxruntime's quantizer keeps each learned integer: int8 weight times scale equals the fp32 weight."""
    calibration = samples(16, seed=1)
    rounded = adaround_weights(
        onnx.load(str(source)), [{"input": calibration}], per_channel=per_channel, correct_biases=False, config=FAST
    ).model
    rounded_path = tmp_path / "rounded.onnx"
    onnx.save(rounded, str(rounded_path))
    # adaround_weights rounds to the 8-bit grid, so the quantizer must not choose 7 bits on this CPU.
    output = quantize_static_qdq(
        rounded_path,
        tmp_path / "rounded.int8.onnx",
        calibration,
        per_channel=per_channel,
        reduce_range=False,
        preprocess=False,
    )
    expected = weights(rounded)
    for name, (integers, scale) in quantized_conv_weights(output).items():
        weight = expected[f"{name}_weight"]
        dequantized = integers.astype(np.float32) * scale.reshape(-1, 1, 1, 1)
        np.testing.assert_array_equal(dequantized, weight, err_msg=name)


@pytest.mark.parametrize("quantized_inputs", [False, True])
def test_static_qdq_adaround_option(source: Path, tmp_path: Path, quantized_inputs: bool) -> None:
    calibration = samples(32, seed=1)
    plain = quantize_static_qdq(source, tmp_path / "nearest.onnx", calibration)
    config = AdaRoundConfig(iterations=150, max_samples=32, positions_per_sample=48, quantized_inputs=quantized_inputs)
    learned = quantize_static_qdq(
        source, tmp_path / "adaround.onnx", calibration, weight_rounding="adaround", adaround_config=config
    )
    inputs = samples(32, seed=2)
    reference = run(source, inputs)
    plain_error = float(np.mean((run(plain, inputs) - reference) ** 2))
    assert float(np.mean((run(learned, inputs) - reference) ** 2)) < plain_error


def test_static_qdq_invalid_rounding(source: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="invalid weight_rounding 'stochastic'"):
        quantize_static_qdq(source, tmp_path / "out.onnx", samples(4, seed=1), weight_rounding="stochastic")


def test_activation_params_from_qdq(source: Path, tmp_path: Path) -> None:
    output = quantize_static_qdq(source, tmp_path / "nearest.onnx", samples(8, seed=1))
    params = activation_quantization_params(onnx.load(str(output)))
    assert "input" in params
    assert "first_clipped" in params
    assert "first_weight" not in params


def test_adaround_quantized_inputs_grid(source: Path, tmp_path: Path) -> None:
    calibration = samples(16, seed=1)
    output = quantize_static_qdq(source, tmp_path / "nearest.onnx", calibration)
    result = adaround_weights(
        onnx.load(str(source)),
        [{"input": calibration}],
        config=FAST,
        activation_quantization=activation_quantization_params(onnx.load(str(output))),
    )
    for name, weight in weights(result.model).items():
        if not name.endswith("_weight"):
            continue
        scale = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1).reshape(-1, 1, 1, 1) / 127
        steps = weight / scale
        assert np.abs(steps - np.round(steps)).max() < 1e-4, name
