"""Tests for quantization-aware fine-tuning of int8 QDQ models, on a CNN trained on the real digits data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.helper import make_node, make_tensor_value_info

from edgefleet.orchestrator.compress.digits import DigitsConfig, DigitsTeacher, export_onnx, load_digits_split
from edgefleet.orchestrator.compress.distill import train_classifier
from edgefleet.orchestrator.compress.qat import FineTuneConfig, FineTuneResult, fine_tune_qdq
from edgefleet.orchestrator.compress.qdq_graph import QdqModule
from edgefleet.orchestrator.compress.quantize import QuantizationError, quantize_static_qdq

# Weights start on the grid and move at most steps x learning rate grid steps: 0.02 lets them cross.
FAST = FineTuneConfig(steps=80, batch_size=32, weight_learning_rate=0.02)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    (train_x, _), (test_x, _) = load_digits_split(DigitsConfig())
    return train_x.numpy(), test_x.numpy()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A narrow digits CNN (residual block, depthwise conv, max pool, Linear) trained for two epochs."""
    torch.manual_seed(0)
    config = DigitsConfig()
    train, _ = load_digits_split(config)
    model = DigitsTeacher((16, 32, 48))
    train_classifier(model, train, epochs=2, lr=3e-3)
    return export_onnx(model, tmp_path_factory.mktemp("qat") / "digits.onnx", train[0][:1])


@pytest.fixture(scope="module")
def quantized(source: Path, digits: tuple[np.ndarray, np.ndarray]) -> Path:
    """Per-tensor int8 weights without bias correction: coarse enough that fine-tuning has work to do."""
    calibration = digits[0][:128]
    return quantize_static_qdq(source, source.with_name("digits.int8.onnx"), calibration, per_channel=False)


@pytest.fixture(scope="module")
def tuned(source: Path, quantized: Path, digits: tuple[np.ndarray, np.ndarray]) -> FineTuneResult:
    return fine_tune_qdq(onnx.load(str(quantized)), onnx.load(str(source)), {"input": digits[0]}, FAST)


def run(model: onnx.ModelProto | Path, inputs: np.ndarray, *, optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": inputs})[0])


def relative_error(reference: np.ndarray, values: np.ndarray) -> float:
    return float(np.mean((reference - values) ** 2) / np.mean(reference**2))


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def qdq_gemm(weight_type: Any = np.int8, *, inputs: int = 1) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """A QDQ Gemm from 8 to 4 features (uint8 activation, weight_type weights, int32 bias) and its fp32 source.

    With inputs=2 the Gemm reads the sum of inputs x0 and x1; otherwise its input is x.
    """
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((4, 8)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    names = ["x0", "x1"] if inputs == 2 else ["x"]
    graph_inputs = [make_tensor_value_info(name, TensorProto.FLOAT, ["N", 8]) for name in names]
    graph_output = [make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])]
    summed = [make_node("Add", names, ["x"])] if inputs == 2 else []
    source = helper.make_graph(
        [*summed, make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)],
        "source",
        graph_inputs,
        graph_output,
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    info = ml_dtypes.iinfo(weight_type)
    low, high = int(info.min), int(info.max)
    weight_scale = np.float32(np.abs(weight).max() / high)
    weight_zero = (low + high + 1) // 2 if low == 0 else 0
    quantized_weight = (np.round(weight / weight_scale) + weight_zero).clip(low, high).astype(weight_type)
    input_scale = np.float32(6.0 / 255)
    nodes = [
        *summed,
        make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
        make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
        make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"]),
        make_node("DequantizeLinear", ["b_q", "b_scale"], ["b_dq"]),
        make_node("Gemm", ["x_dq", "w_dq", "b_dq"], ["y"], transB=1),
    ]
    initializers = [
        numpy_helper.from_array(np.array(input_scale), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zero"),
        numpy_helper.from_array(quantized_weight, "w_q"),
        numpy_helper.from_array(np.array(weight_scale), "w_scale"),
        numpy_helper.from_array(np.array(weight_zero).astype(weight_type), "w_zero"),
        numpy_helper.from_array(np.round(bias / (input_scale * weight_scale)).astype(np.int32), "b_q"),
        numpy_helper.from_array(np.array(input_scale * weight_scale, np.float32), "b_scale"),
    ]
    qdq = helper.make_graph(nodes, "qdq", graph_inputs, graph_output, initializers)
    opset = [helper.make_opsetid("", 21)]
    return helper.make_model(qdq, opset_imports=opset), helper.make_model(source, opset_imports=opset)


def simulate(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        outputs = QdqModule(model)({name: torch.from_numpy(array) for name, array in feeds.items()})
    return [output.numpy() for output in outputs]


def run_per_sample(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run onnxruntime without graph optimizations one sample at a time, as fine-tuning measures targets."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    count = len(next(iter(feeds.values())))
    runs = [session.run(None, {name: array[i : i + 1] for name, array in feeds.items()}) for i in range(count)]
    return [np.concatenate([run[k] for run in runs]) for k in range(len(runs[0]))]


def test_module_matches_onnxruntime(quantized: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    inputs = digits[1][:64]
    with torch.no_grad():
        simulated = QdqModule(onnx.load(str(quantized)))({"input": torch.from_numpy(inputs)})[0].numpy()
    assert relative_error(run(quantized, inputs, optimize=False), simulated) < 1e-4


def test_module_trains_weights_and_biases(quantized: Path) -> None:
    module = QdqModule(onnx.load(str(quantized)))
    arrays = initializers(onnx.load(str(quantized)))
    dtypes = {str(arrays[name].dtype) for name in module.integer_params}
    assert dtypes == {"int8", "int32"}


def test_fine_tune_lowers_heldout_error(tuned: FineTuneResult) -> None:
    assert tuned.holdout_error_after < tuned.holdout_error_before


def test_fine_tune_kept(tuned: FineTuneResult) -> None:
    assert tuned.kept


def test_fine_tune_lowers_test_error(
    source: Path, quantized: Path, tuned: FineTuneResult, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """The test split was seen neither in calibration nor in fine-tuning."""
    reference = run(source, digits[1])
    assert relative_error(reference, run(tuned.model, digits[1])) < relative_error(reference, run(quantized, digits[1]))


def test_fine_tune_keeps_graph(quantized: Path, tuned: FineTuneResult) -> None:
    before = onnx.load(str(quantized))
    assert [n.op_type for n in tuned.model.graph.node] == [n.op_type for n in before.graph.node]


def test_fine_tune_keeps_scales(quantized: Path, tuned: FineTuneResult) -> None:
    before = initializers(onnx.load(str(quantized)))
    after = initializers(tuned.model)
    floats = [name for name, array in before.items() if array.dtype == np.float32]
    assert all(np.array_equal(before[name], after[name]) for name in floats)


def test_fine_tune_weights_on_grid(tuned: FineTuneResult) -> None:
    weights = [array for array in initializers(tuned.model).values() if array.dtype == np.int8]
    assert weights and all(int(np.abs(w.astype(np.int32)).max()) <= 127 for w in weights)


def test_fine_tune_changes_weights(quantized: Path, tuned: FineTuneResult) -> None:
    before = initializers(onnx.load(str(quantized)))
    after = initializers(tuned.model)
    assert any(not np.array_equal(before[name], after[name]) for name in before if before[name].dtype == np.int8)


def test_fine_tune_not_kept(source: Path, quantized: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    """A learning rate of 50 grid steps per update wrecks the weights; the input model comes back."""
    qdq = onnx.load(str(quantized))
    wild = FineTuneConfig(steps=5, batch_size=32, weight_learning_rate=50.0)
    result = fine_tune_qdq(qdq, onnx.load(str(source)), {"input": digits[0][:256]}, wild)
    assert (result.kept, result.model) == (False, qdq)


def test_fine_tune_too_few_samples(source: Path, quantized: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(ValueError, match="too few to fine-tune"):
        fine_tune_qdq(onnx.load(str(quantized)), onnx.load(str(source)), {"input": digits[0][:40]}, FAST)


def test_fine_tune_stated_minimum(source: Path, quantized: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    """The minimum that the error names is enough: 36 samples with batch_size 16 and a tenth held out."""
    settings = FineTuneConfig(steps=1, batch_size=16)
    qdq, fp32 = onnx.load(str(quantized)), onnx.load(str(source))

    with pytest.raises(ValueError, match=r"16 samples are too few .* need at least 36, 4 of them held out"):
        fine_tune_qdq(qdq, fp32, {"input": digits[0][:16]}, settings)
    with pytest.raises(ValueError, match=r"35 samples are too few .* need at least 36"):
        fine_tune_qdq(qdq, fp32, {"input": digits[0][:35]}, settings)
    fine_tune_qdq(qdq, fp32, {"input": digits[0][:36]}, settings)


def test_fine_tune_missing_input(source: Path, quantized: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(ValueError, match=r"no samples for model inputs \['input'\]"):
        fine_tune_qdq(onnx.load(str(quantized)), onnx.load(str(source)), {"image": digits[0]}, FAST)


def test_unsupported_operator() -> None:
    graph = helper.make_graph(
        [helper.make_node("Erf", ["input"], ["output"], name="erf")],
        "erf",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 4])],
    )
    with pytest.raises(QuantizationError, match="cannot simulate operator Erf \\(node 'erf'\\)"):
        QdqModule(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("steps", 0, "steps = 0"), ("batch_size", 0, "batch_size = 0"), ("holdout_fraction", 1.0, "holdout_fraction")],
)
def test_config_ranges(field: str, value: float, message: str) -> None:
    settings: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=message):
        FineTuneConfig(**settings)


def test_static_qdq_fine_tune_option(source: Path, digits: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    """quantize_static_qdq fine-tunes on the calibration data when no other samples are given."""
    plain = quantize_static_qdq(source, tmp_path / "plain.onnx", digits[0][:128], per_channel=False)
    tuned = quantize_static_qdq(
        source, tmp_path / "tuned.onnx", digits[0][:128], per_channel=False, fine_tune=FineTuneConfig(steps=40)
    )
    reference = run(source, digits[1])
    assert relative_error(reference, run(tuned, digits[1])) < relative_error(reference, run(plain, digits[1]))


def test_static_qdq_fine_tune_inputs(source: Path, digits: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="too few to fine-tune"):
        quantize_static_qdq(
            source,
            tmp_path / "tuned.onnx",
            digits[0][:128],
            fine_tune=FineTuneConfig(steps=10),
            fine_tune_inputs=digits[0][:20],
        )


def test_static_qdq_fine_tune_progress(source: Path, digits: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    steps: list[tuple[int, int]] = []
    quantize_static_qdq(
        source,
        tmp_path / "tuned.onnx",
        digits[0][:128],
        fine_tune=FineTuneConfig(steps=25),
        fine_tune_progress=lambda step, total, loss: steps.append((step, total)),
    )
    assert steps == [(10, 25), (20, 25), (25, 25)]


def test_static_qdq_fine_tune_stopped(source: Path, digits: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    """An exception from the progress callback (a cancelled job) stops fine-tuning and reaches the caller."""

    class Cancelled(Exception):
        pass

    def cancel(step: int, total: int, loss: float) -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        quantize_static_qdq(
            source,
            tmp_path / "tuned.onnx",
            digits[0][:128],
            fine_tune=FineTuneConfig(steps=25),
            fine_tune_progress=cancel,
        )


def test_fine_tune_nonfinite_samples(source: Path, quantized: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    samples = digits[0][:256].copy()
    samples[3, 0, 2, 2] = np.nan
    samples[7, 0, 1, 1] = np.inf
    with pytest.raises(ValueError, match="'input' contain 2 NaN or infinite values"):
        fine_tune_qdq(onnx.load(str(quantized)), onnx.load(str(source)), {"input": samples}, FAST)


@pytest.mark.parametrize("shape", [(256, 64), (256, 1, 8, 9)])
def test_fine_tune_sample_shape(
    source: Path, quantized: Path, digits: tuple[np.ndarray, np.ndarray], shape: tuple[int, ...]
) -> None:
    samples = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=r"expected \(N, 1, 8, 8\)"):
        fine_tune_qdq(onnx.load(str(quantized)), onnx.load(str(source)), {"input": samples}, FAST)


def test_fine_tune_sample_counts() -> None:
    qdq, fp32 = qdq_gemm(inputs=2)
    samples = {"x0": np.zeros((100, 8), np.float32), "x1": np.zeros((90, 8), np.float32)}
    with pytest.raises(ValueError, match="different sample counts"):
        fine_tune_qdq(qdq, fp32, samples, FAST)


def test_fine_tune_source_mismatch(quantized: Path) -> None:
    _, other = qdq_gemm()
    with pytest.raises(ValueError, match="does not match the QDQ model"):
        fine_tune_qdq(onnx.load(str(quantized)), other, {"input": np.zeros((256, 1, 8, 8), np.float32)}, FAST)


def test_fine_tune_nothing_to_train() -> None:
    graph = helper.make_graph(
        [
            make_node("QuantizeLinear", ["x", "scale"], ["x_q"]),
            make_node("DequantizeLinear", ["x_q", "scale"], ["y"]),
        ],
        "qdq",
        [make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.array(0.1, np.float32), "scale")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(QuantizationError, match="no Conv, Gemm or MatMul weight"):
        fine_tune_qdq(model, model, {"x": np.zeros((100, 4), np.float32)}, FAST)


def test_quantize_output_dtype() -> None:
    """Without a zero point, QuantizeLinear's output_dtype attribute (opset 21) sets the integer range."""
    graph = helper.make_graph(
        [
            make_node("QuantizeLinear", ["x", "scale"], ["x_q"], output_dtype=TensorProto.INT8),
            make_node("DequantizeLinear", ["x_q", "scale"], ["y"]),
        ],
        "qdq",
        [make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array(np.array(0.05, np.float32), "scale")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    feeds = {"x": np.random.default_rng(0).normal(0.0, 5.0, (8, 6)).astype(np.float32)}
    np.testing.assert_array_equal(simulate(model, feeds)[0], run_per_sample(model, feeds)[0])


@pytest.mark.parametrize("weight_type", [ml_dtypes.int4, np.uint8, np.int16], ids=["int4", "uint8", "int16"])
def test_fine_tune_weight_types(weight_type: Any) -> None:
    qdq, fp32 = qdq_gemm(weight_type)
    samples = {"x": np.random.default_rng(1).uniform(-3.0, 3.0, (100, 8)).astype(np.float32)}
    result = fine_tune_qdq(qdq, fp32, samples, FineTuneConfig(steps=40, batch_size=16, weight_learning_rate=0.05))
    assert relative_error(run_per_sample(qdq, samples)[0], simulate(qdq, samples)[0]) < 1e-10
    assert "w_q" in QdqModule(qdq).integer_params
    assert result.trained_tensors == 2
    assert np.isfinite(result.holdout_error_after)  # onnxruntime ran the weights written back.
    assert initializers(result.model)["w_q"].dtype == np.dtype(weight_type)


def graph_model(
    nodes: list[onnx.NodeProto], shape: list[Any], opset: int, constants: dict[str, np.ndarray] | None = None
) -> onnx.ModelProto:
    """A model from input x of shape to output y, with constants as initializers."""
    graph = helper.make_graph(
        nodes,
        "graph",
        [make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(array, name) for name, array in (constants or {}).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def operator_cases() -> dict[str, onnx.ModelProto]:
    rng = np.random.default_rng(2)
    weight = {"w_q": rng.integers(-127, 128, (8, 4)).astype(np.int8)}
    return {
        "softmax_opset11": graph_model([make_node("Softmax", ["x"], ["y"])], ["N", 3, 4], 11),
        "clip_opset10": graph_model([make_node("Clip", ["x"], ["y"], min=-0.5, max=0.5)], ["N", 3, 4], 10),
        "flatten_negative": graph_model([make_node("Flatten", ["x"], ["y"], axis=-1)], ["N", 3, 4], 17),
        "reduce_mean_noop": graph_model(
            [make_node("ReduceMean", ["x", "axes"], ["y"], noop_with_empty_axes=1)],
            ["N", 3, 4],
            18,
            {"axes": np.zeros(0, np.int64)},
        ),
        "hard_sigmoid": graph_model([make_node("HardSigmoid", ["x"], ["y"], alpha=0.3)], ["N", 3, 4], 17),
        "reshape_batch_1": graph_model(
            [
                make_node("Reshape", ["x", "rows"], ["rows_x"]),
                make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"]),
                make_node("MatMul", ["rows_x", "w"], ["rows_y"]),
                make_node("Reshape", ["rows_y", "shape"], ["y"]),
            ],
            [1, 5, 8],
            17,
            {
                **weight,
                "w_scale": np.array(0.01, np.float32),
                "rows": np.array([5, 8], np.int64),
                "shape": np.array([1, 5, 4], np.int64),
            },
        ),
        "blocked_weights": graph_model(
            [
                make_node("Reshape", ["x", "rows"], ["rows_x"]),
                make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=0, block_size=4),
                make_node("MatMul", ["rows_x", "w"], ["y"]),
            ],
            ["N", 5, 8],
            21,
            {**weight, "w_scale": rng.uniform(0.005, 0.02, (2, 4)).astype(np.float32), "rows": np.array([0, -1, 8])},
        ),
    }


@pytest.mark.parametrize("case", sorted(operator_cases()))
def test_module_operator_cases(case: str) -> None:
    model = operator_cases()[case]
    shape = [4, *(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])]
    feeds = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    assert relative_error(run_per_sample(model, feeds)[0], simulate(model, feeds)[0]) < 1e-10


def test_module_batch_axis_mean() -> None:
    model = graph_model([make_node("ReduceMean", ["x"], ["y"])], ["N", 4], 17)
    with pytest.raises(QuantizationError, match="averages over the batch axis 0"):
        simulate(model, {"x": np.zeros((2, 4), np.float32)})


def test_module_custom_domain() -> None:
    model = graph_model([make_node("Relu", ["x"], ["y"], domain="example.custom")], ["N", 4], 17)
    model.opset_import.append(helper.make_opsetid("example.custom", 1))
    with pytest.raises(QuantizationError, match=r"example\.custom::Relu"):
        QdqModule(model)


def test_module_keeps_reduced_range(source: Path, digits: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    """7-bit weights (reduce_range, +-64) stay 7-bit however far training pushes them."""
    reduced = quantize_static_qdq(source, tmp_path / "reduced.onnx", digits[0][:128], reduce_range=True)
    module = QdqModule(onnx.load(str(reduced)))
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(1000.0)
    weights = [array for array in module.integer_tensors().values() if array.dtype == np.int8]
    assert weights
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == 64


@pytest.mark.parametrize(
    ("op_type", "attributes", "inputs"),
    [
        ("Concat", {"axis": 0}, ["input", "input"]),
        ("Softmax", {"axis": 0}, ["input"]),
        ("Flatten", {"axis": 0}, ["input"]),
        ("Gemm", {"transA": 1}, ["input", "weight"]),
    ],
)
def test_module_rejects_batch_axis(op_type: str, attributes: dict[str, Any], inputs: list[str]) -> None:
    """Operators along axis 0 mix the samples that the simulation stacks there."""
    graph = helper.make_graph(
        [helper.make_node(op_type, inputs, ["output"], name="mixer", **attributes)],
        "mixer",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.ones((2, 4), np.float32), "weight")],
    )
    module = QdqModule(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    with pytest.raises(QuantizationError, match=f"along axis 0, so it cannot simulate {op_type} node 'mixer'"):
        module({"input": torch.ones(2, 4)})
