"""Post-training int8 quantization of ONNX models with onnxruntime: static QDQ and dynamic."""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper, version_converter
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.quant_utils import quantize_data
from onnxruntime.quantization.registry import QDQRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process

from edgefleet.common.models import ModelMetadata
from edgefleet.orchestrator.compress.calibration import ArrayCalibrationReader, model_input_spec
from edgefleet.orchestrator.compress.kernels import default_reduce_range

if TYPE_CHECKING:
    from edgefleet.orchestrator.compress.adaround import AdaRoundConfig
    from edgefleet.orchestrator.compress.qat import FineTuneConfig

logger = logging.getLogger(__name__)

# Per-channel QuantizeLinear/DequantizeLinear (the axis attribute) exists from ONNX opset 13.
PER_CHANNEL_MIN_OPSET = 13
ACTIVATION_TYPES = ("uint8", "int8")
WEIGHT_ROUNDINGS = ("nearest", "adaround")
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
    "distribution": CalibrationMethod.Distribution,
}
CONV_OP_TYPES = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv"})
MATMUL_OP_TYPES = frozenset(
    {"MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "Attention", "Einsum"}
)
_QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


class QuantizationError(RuntimeError):
    """A model that cannot be quantized as requested; the message names the cause and the fix."""


def quantize_static_qdq(
    model_path: Path,
    output_path: Path,
    calibration: CalibrationDataReader | np.ndarray,
    *,
    per_channel: bool = True,
    activation_type: str = "uint8",
    calibration_method: str = "minmax",
    reduce_range: bool | None = None,
    preprocess: bool = True,
    op_types_to_quantize: tuple[str, ...] | None = None,
    nodes_to_exclude: tuple[str, ...] = (),
    input_name: str | None = None,
    calibration_batch_size: int = 1,
    extra_options: dict[str, object] | None = None,
    bias_correction: bool = False,
    weight_rounding: str = "nearest",
    adaround_config: AdaRoundConfig | None = None,
    fine_tune: FineTuneConfig | None = None,
    fine_tune_inputs: np.ndarray | None = None,
    fine_tune_progress: Callable[[int, int, float], None] | None = None,
    stage_progress: Callable[[float, str], None] | None = None,
) -> Path:
    """Quantize an fp32 ONNX model to int8 weights and activations in the QDQ format.

    Weights are int8 (per output channel when per_channel, 7-bit when reduce_range; None sets it
    where 8-bit weights saturate this CPU's kernels, see kernels.py). Activations use activation_type, with
    ranges measured by running calibration (a reader, or an array with the batch axis first) through
    the model. A model below opset 13 is upgraded for per-channel weights. Unless preprocess is False,
    `quant_pre_process` (symbolic shape inference and graph optimization) runs first; when it fails the
    original graph is quantized and a warning is logged. With bias_correction, the biases of the Conv and
    Gemm nodes to be quantized are first corrected for the mean output error of their int8 weights on the
    calibration data (see correct_bias); this needs one extra fp32 pass over the calibration data.

    weight_rounding "nearest" leaves the rounding to onnxruntime. "adaround" first learns the rounding of
    each Conv weight on the calibration data, layer by layer (see adaround.adaround_weights). It needs
    torch and runs the model once per Conv node. With adaround_config.quantized_inputs, a first
    quantization with nearest rounding supplies the activation ranges, so each layer's input also carries
    the activation quantization error. With bias_correction the Conv biases are corrected in the same
    pass, against inputs from the already rounded layers, and correct_bias handles the Gemm nodes.

    With fine_tune, the int8 weights and biases of the quantized model are then trained to reproduce the
    fp32 model's outputs on fine_tune_inputs (an array with the batch axis first; the calibration data
    when None), with the calibrated scales kept (see qat.fine_tune_qdq). This needs torch. The result is
    kept only when it lowers the output error on held-out samples. fine_tune_progress(step, steps, loss)
    is called every 10 steps, and an exception it raises stops the fine-tuning.

    stage_progress(fraction, stage) is called as each step before fine-tuning starts, with the
    fraction of those steps done: preprocessing, AdaRound, bias correction, each calibration batch
    that onnxruntime reads, and the quantization that follows the last one. An exception it raises
    stops the quantization.

    Returns output_path. Raises QuantizationError when the model does not load in onnxruntime, contains
    operators from a custom domain, has nothing to quantize, or cannot be upgraded to opset 13 for
    per-channel weights; raises CalibrationError when the calibration array does not match the input.
    """
    if reduce_range is None:
        reduce_range = default_reduce_range()
    if activation_type not in ACTIVATION_TYPES:
        raise QuantizationError(
            f"invalid activation_type {activation_type!r}: expected one of {ACTIVATION_TYPES}"
        )
    if weight_rounding not in WEIGHT_ROUNDINGS:
        raise QuantizationError(
            f"invalid weight_rounding {weight_rounding!r}: expected one of {WEIGHT_ROUNDINGS}"
        )
    if calibration_method not in CALIBRATION_METHODS:
        raise QuantizationError(
            f"invalid calibration_method {calibration_method!r}: "
            f"expected one of {sorted(CALIBRATION_METHODS)}"
        )
    model = _load_checked(model_path)
    if per_channel:
        model = ensure_opset(model, PER_CHANNEL_MIN_OPSET, model_path)

    if isinstance(calibration, np.ndarray):
        reader: CalibrationDataReader = ArrayCalibrationReader(
            model_input_spec(model_path, input_name), calibration, batch_size=calibration_batch_size
        )
    else:
        reader = calibration
    batches: list[dict[str, np.ndarray]] = []
    if (
        bias_correction
        or weight_rounding == "adaround"
        or (fine_tune is not None and fine_tune_inputs is None)
        or stage_progress is not None
    ):
        # Both the correction and onnxruntime's calibrator read the data, and a reader may not rewind.
        # A progress report needs the batch count before the calibrator starts.
        batches = _read_batches(reader)
        reader = _BatchListReader(batches)

    def stage(fraction: float, text: str) -> None:
        if stage_progress is not None:
            stage_progress(fraction, text)

    output_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as scratch:
        staged = Path(scratch) / "source.onnx"
        onnx.save(model, str(staged))
        if preprocess:
            stage(0.0, "preparing the graph for int8 quantization (shape inference, graph optimization)")
            staged = _preprocess(staged, Path(scratch) / "preprocessed.onnx")
        # onnxruntime's defaults (asymmetric activations, symmetric weights) apply unless overridden.
        options: dict[str, object] = dict(extra_options or {})

        def quantize(source: Path, destination: Path, data: CalibrationDataReader) -> None:
            _quantize_static(
                source, destination, data, model_path, per_channel=per_channel, reduce_range=reduce_range,
                activation_type=activation_type, calibration_method=calibration_method,
                op_types_to_quantize=op_types_to_quantize, nodes_to_exclude=nodes_to_exclude, options=options,
            )

        rounded_nodes: tuple[str, ...] = ()
        if weight_rounding == "adaround" and (op_types_to_quantize is None or "Conv" in op_types_to_quantize):
            from edgefleet.orchestrator.compress.adaround import AdaRoundConfig, activation_quantization_params

            settings = adaround_config or AdaRoundConfig()
            stage(0.05, f"learning the weight rounding of each Conv (AdaRound) on {len(batches)} batches")
            activations = None
            if settings.quantized_inputs:
                # A first quantization with nearest rounding gives the activation ranges to simulate.
                quantize(staged, Path(scratch) / "nearest.onnx", _BatchListReader(batches))
                activations = activation_quantization_params(onnx.load(str(Path(scratch) / "nearest.onnx")))
            rounded_nodes = _adaround(
                staged, Path(scratch) / "adarounded.onnx", batches, per_channel=per_channel,
                reduce_range=reduce_range, nodes_to_exclude=nodes_to_exclude, correct_biases=bias_correction,
                config=settings, activations=activations,
            )
            staged = Path(scratch) / "adarounded.onnx"
        if bias_correction:
            stage(0.1, f"correcting biases for the int8 weights' error on {len(batches)} batches")
            corrected = correct_bias(
                onnx.load(str(staged)), batches, per_channel=per_channel, reduce_range=reduce_range,
                op_types=op_types_to_quantize, nodes_to_exclude=(*nodes_to_exclude, *rounded_nodes),
            )
            staged = Path(scratch) / "bias_corrected.onnx"
            onnx.save(corrected, str(staged))
        if stage_progress is not None:
            reader = _StageReader(batches, stage, start=0.2, end=0.9)
        quantize(staged, output_path, reader)
    if fine_tune is not None:
        if fine_tune_inputs is not None:
            samples = {model_input_spec(model_path, input_name).name: fine_tune_inputs}
        elif batches:
            samples = {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}
        else:
            raise QuantizationError(f"fine-tuning {model_path} needs samples: the calibration reader returned none")
        _fine_tune(output_path, model, samples, fine_tune, fine_tune_progress)

    quantized = onnx.load(str(output_path))
    counts = Counter(node.op_type for node in quantized.graph.node)
    if counts["QuantizeLinear"] == 0 and counts["DequantizeLinear"] == 0:
        raise QuantizationError(
            f"static quantization of {model_path} inserted no QuantizeLinear/DequantizeLinear nodes: "
            f"op_types_to_quantize={op_types_to_quantize} matched none of {sorted(counts)}"
        )
    _check_loads(output_path, "the quantized model")
    requantized = requantized_exclusions(quantized, nodes_to_exclude)
    if requantized:
        logger.warning(
            "excluded nodes %s sit between DequantizeLinear and QuantizeLinear, so onnxruntime's "
            "WeightBiasQuantization optimization turns their fp32 weights into per-tensor int8 when a session "
            "loads %s; also exclude the nodes that produce their input, back to the graph input",
            requantized, output_path,
        )
    logger.info(
        "quantized %s to %s: %d QuantizeLinear, %d DequantizeLinear, per_channel=%s, activations=%s, "
        "bias_correction=%s, weight_rounding=%s, fine_tune_steps=%d",
        model_path, output_path, counts["QuantizeLinear"], counts["DequantizeLinear"], per_channel,
        activation_type, bias_correction, weight_rounding, fine_tune.steps if fine_tune else 0,
    )
    return output_path


def _quantize_static(
    source: Path,
    destination: Path,
    reader: CalibrationDataReader,
    model_path: Path,
    *,
    per_channel: bool,
    reduce_range: bool,
    activation_type: str,
    calibration_method: str,
    op_types_to_quantize: tuple[str, ...] | None,
    nodes_to_exclude: tuple[str, ...],
    options: dict[str, object],
) -> None:
    try:
        quantize_static(
            str(source),
            str(destination),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types_to_quantize) if op_types_to_quantize else None,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=_QUANT_TYPES[activation_type],
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(nodes_to_exclude) or None,
            calibrate_method=CALIBRATION_METHODS[calibration_method],
            extra_options=options,
        )
    except (ValueError, RuntimeError, KeyError, onnx.checker.ValidationError) as error:
        raise QuantizationError(f"onnxruntime static quantization of {model_path} failed: {error}") from error


def _adaround(
    source: Path,
    output: Path,
    batches: list[dict[str, np.ndarray]],
    *,
    per_channel: bool,
    reduce_range: bool,
    nodes_to_exclude: tuple[str, ...],
    correct_biases: bool,
    config: AdaRoundConfig,
    activations: dict[str, tuple[onnx.TensorProto, onnx.TensorProto]] | None,
) -> tuple[str, ...]:
    """Save source with AdaRound-rounded Conv weights to output; return the names of the rounded nodes."""
    # Imported here because torch is only needed for this option.
    from edgefleet.orchestrator.compress.adaround import adaround_weights

    try:
        result = adaround_weights(
            onnx.load(str(source)), batches, per_channel=per_channel, reduce_range=reduce_range,
            nodes_to_exclude=nodes_to_exclude, correct_biases=correct_biases, config=config,
            activation_quantization=activations,
        )
    except Exception as error:  # onnxruntime raises several private exception types.
        raise QuantizationError(f"AdaRound failed to run the model on the calibration data: {error}") from error
    onnx.save(result.model, str(output))
    return result.rounded_nodes


def _fine_tune(
    path: Path,
    source: onnx.ModelProto,
    samples: dict[str, np.ndarray],
    config: FineTuneConfig,
    progress: Callable[[int, int, float], None] | None,
) -> None:
    """Replace the QDQ model at path with its fine-tuned version when fine-tuning lowered the held-out error."""
    # Imported here because torch is only needed for this option.
    from edgefleet.orchestrator.compress.qat import fine_tune_qdq

    try:
        result = fine_tune_qdq(onnx.load(str(path)), source, samples, config, progress=progress)
    except ValueError as error:
        raise QuantizationError(f"fine-tuning {path} failed: {error}") from error
    if result.kept:
        onnx.save(result.model, str(path))


def correct_bias(
    model: onnx.ModelProto,
    batches: list[dict[str, np.ndarray]],
    *,
    per_channel: bool = True,
    reduce_range: bool = False,
    op_types: tuple[str, ...] | None = None,
    nodes_to_exclude: tuple[str, ...] = (),
) -> onnx.ModelProto:
    """Return a copy of model whose Conv and Gemm biases cancel the mean error of int8 weights.

    For each Conv and Gemm node with a float32 weight initializer (skipping nodes_to_exclude and op types
    outside op_types when given), the weight is rounded the way onnxruntime's QDQ quantizer rounds it
    (symmetric int8, per output channel when per_channel, 7-bit when reduce_range) and the node is run on
    the calibration batches with the rounding error `W_int8 - W` as its weight. The mean of that output
    over the batch and spatial axes, per output channel, is subtracted from the bias (a zero bias is added
    where there is none). Inputs are the fp32 model's activations, so errors from upstream activation
    quantization are not corrected. Without batches the model is returned unchanged.

    Raises QuantizationError when onnxruntime cannot run the model on the batches.
    """
    corrected = onnx.ModelProto()
    corrected.CopyFrom(model)
    if not batches:
        return corrected
    targets = _bias_correction_targets(corrected, op_types, nodes_to_exclude)
    if not targets:
        logger.info("bias correction found no Conv or Gemm node with a float32 weight initializer")
        return corrected
    errors = _mean_weight_errors(corrected, targets, batches, per_channel, reduce_range)

    initializers = {init.name: init for init in corrected.graph.initializer}
    uses = Counter(name for node in corrected.graph.node for name in node.input)
    for node, error in zip(targets, errors, strict=True):
        # Gemm adds beta * C, so C moves by error / beta.
        beta = _attribute(node, "beta", 1.0) if node.op_type == "Gemm" else 1.0
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        bias = numpy_helper.to_array(initializers[bias_name]) if bias_name else np.zeros_like(error)
        new_bias = (bias.astype(np.float64) - error / beta).astype(np.float32)
        set_initializer_input(corrected, node, 2, new_bias, "corrected_bias", initializers, uses)
    shifts = [float(np.abs(error).max()) for error in errors]
    logger.info(
        "bias correction adjusted %d nodes on %d calibration batches (largest shift %.4g)",
        len(targets), len(batches), max(shifts),
    )
    return corrected


def quantize_dynamic_int8(
    model_path: Path,
    output_path: Path,
    *,
    metadata: ModelMetadata | None = None,
    per_channel: bool = False,
    force: bool = False,
) -> Path:
    """Quantize MatMul/Gemm weights to int8 with activations quantized at run time (no calibration).

    Meant for transformer and MLP models. A model whose MACs are mostly convolutions is rejected unless
    force is set, because onnxruntime's dynamic ConvInteger kernels make conv nets slower on CPUs and
    lose accuracy. Use quantize_static_qdq for those. metadata gives the MACs by operator type; without
    it the weight elements consumed by Conv versus MatMul/Gemm decide.

    Returns output_path. Raises QuantizationError for a conv-dominated model without force, or when the
    model does not load or cannot be quantized.
    """
    model = _load_checked(model_path)
    recommendation, reason = _recommend(metadata, model)
    if recommendation != "dynamic" and not force:
        raise QuantizationError(
            f"dynamic quantization rejected for {model_path}: {reason}; on CPUs dynamic quantization makes "
            f"conv nets slower or less accurate, so use quantize_static_qdq with calibration data "
            f"(or pass force=True)"
        )
    output_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        quantize_dynamic(
            str(model_path), str(output_path), per_channel=per_channel, weight_type=QuantType.QInt8
        )
    except (ValueError, RuntimeError, KeyError) as error:
        raise QuantizationError(
            f"onnxruntime dynamic quantization of {model_path} failed: {error}"
        ) from error
    _check_loads(output_path, "the quantized model")
    logger.info("dynamically quantized %s to %s (%s)", model_path, output_path, reason)
    return output_path


def recommend_quantization(metadata: ModelMetadata) -> str:
    """Return "static" for models whose MACs are mostly convolutions (or unknown), "dynamic" when
    MatMul/Gemm carry most of them."""
    return _recommend(metadata, None)[0]


def quantization_recommendation(metadata: ModelMetadata) -> tuple[str, str]:
    """Return recommend_quantization's result and its reason ("100% of the Conv+MatMul MACs are in convolutions")."""
    return _recommend(metadata, None)


def ensure_opset(model: onnx.ModelProto, minimum: int, source: Path | str = "model") -> onnx.ModelProto:
    """Return model converted to the default-domain opset minimum when it is older; otherwise model.

    Raises QuantizationError naming the opsets and the converter's error when the conversion fails.
    """
    current = default_opset(model)
    if current >= minimum:
        return model
    try:
        converted = version_converter.convert_version(model, minimum)
        onnx.checker.check_model(converted)
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as error:
        raise QuantizationError(
            f"{source} uses opset {current}, but per-channel QDQ needs opset >= {minimum}, and the onnx "
            f"version converter failed: {error}; re-export the model with opset >= {minimum} "
            f"or quantize with per_channel=False"
        ) from error
    logger.info("upgraded %s from opset %d to %d for per-channel quantization", source, current, minimum)
    return converted


def default_opset(model: onnx.ModelProto) -> int:
    """Return the version of the default ONNX domain that model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def requantized_exclusions(model: onnx.ModelProto, nodes_to_exclude: tuple[str, ...]) -> list[str]:
    """Return the excluded Conv/ConvTranspose/Gemm nodes that onnxruntime re-quantizes when it loads model.

    onnxruntime's WeightBiasQuantization graph optimization (present in 1.32) quantizes the float weight of
    such a node to symmetric per-tensor int8 when its input comes from DequantizeLinear and its output
    reaches QuantizeLinear through at most Relu or Clip nodes. A per-tensor weight can be far worse than the
    per-channel weight the quantizer would have written, so the exclusion backfires.
    """
    producers = {output: node for node in model.graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    float_initializers = {
        init.name for init in model.graph.initializer if init.data_type == TensorProto.FLOAT
    }
    found = []
    for node in model.graph.node:
        if node.name not in nodes_to_exclude or node.op_type not in ("Conv", "ConvTranspose", "Gemm"):
            continue
        producer = producers.get(node.input[0])
        if producer is None or producer.op_type != "DequantizeLinear":
            continue
        if len(node.input) < 2 or node.input[1] not in float_initializers:
            continue
        current = node
        while len(current.output) == 1 and len(consumers.get(current.output[0], [])) == 1:
            current = consumers[current.output[0]][0]
            if current.op_type == "QuantizeLinear":
                found.append(node.name)
                break
            if current.op_type not in ("Relu", "Clip"):
                break
    return found


class _BatchListReader(CalibrationDataReader):
    """Replay batches that were already read from another reader."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = batches
        self._index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._index >= len(self._batches):
            return None
        self._index += 1
        return self._batches[self._index - 1]

    def rewind(self) -> None:
        self._index = 0


class _StageReader(_BatchListReader):
    """Replays batches to onnxruntime's calibrator and reports each, then the quantization that follows."""

    def __init__(
        self, batches: list[dict[str, np.ndarray]], stage: Callable[[float, str], None], start: float, end: float
    ) -> None:
        super().__init__(batches)
        self._stage = stage
        self._start = start
        self._end = end

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = super().get_next()
        total = len(self._batches)
        if batch is not None:
            done = (self._index - 1) / total
            self._stage(
                self._start + (self._end - self._start) * done,
                f"calibrating activation ranges: batch {self._index}/{total}",
            )
        elif self._index == total:
            self._index += 1  # Report once, although the calibrator may ask again.
            self._stage(self._end, "quantizing weights and activations with the calibrated ranges")
        return batch


def _read_batches(reader: CalibrationDataReader) -> list[dict[str, np.ndarray]]:
    batches = []
    while (batch := reader.get_next()) is not None:
        batches.append(batch)
    return batches


def set_initializer_input(
    model: onnx.ModelProto,
    node: onnx.NodeProto,
    position: int,
    value: np.ndarray,
    suffix: str,
    initializers: dict[str, onnx.TensorProto],
    uses: Counter[str],
) -> None:
    """Give node's input at position the value of value, in place when no other node reads that initializer.

    A shared or missing initializer gets a new one, named after the node and suffix, so that other nodes
    keep their values. initializers maps the model's initializer names to them; uses counts the node
    inputs of each name.
    """
    name = node.input[position] if len(node.input) > position else ""
    if name and uses[name] == 1:
        initializers[name].CopyFrom(numpy_helper.from_array(value, name))
        return
    new_name = f"{node.name or node.output[0]}_{suffix}"
    model.graph.initializer.append(numpy_helper.from_array(value, new_name))
    if len(node.input) > position:
        node.input[position] = new_name
    else:
        node.input.append(new_name)


def _attribute(node: onnx.NodeProto, name: str, default: float) -> float:
    for attribute in node.attribute:
        if attribute.name == name:
            return float(helper.get_attribute_value(attribute))
    return default


def _bias_correction_targets(
    model: onnx.ModelProto, op_types: tuple[str, ...] | None, nodes_to_exclude: tuple[str, ...]
) -> list[onnx.NodeProto]:
    floats = {
        init.name for init in model.graph.initializer if init.data_type == TensorProto.FLOAT
    }
    targets = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or node.name in nodes_to_exclude:
            continue
        if op_types is not None and node.op_type not in op_types:
            continue
        if len(node.input) < 2 or node.input[1] not in floats:
            continue
        bias = node.input[2] if len(node.input) > 2 else ""
        if bias and bias not in floats:
            continue
        if node.op_type == "Gemm" and (_attribute(node, "transA", 0) or _attribute(node, "beta", 1.0) == 0):
            continue
        targets.append(node)
    return targets


def _weight_rounding_error(weight: np.ndarray, axis: int | None, reduce_range: bool) -> np.ndarray:
    """Return W_int8 - W for onnxruntime's symmetric int8 weight quantization, per channel along axis."""
    def error(values: np.ndarray) -> np.ndarray:
        _zero_point, scale, quantized = quantize_data(values, TensorProto.INT8, True, reduce_range)
        return quantized.astype(np.float32) * np.float32(scale) - values

    if axis is None:
        return error(weight)
    moved = np.moveaxis(weight, axis, 0)
    return np.moveaxis(np.stack([error(channel) for channel in moved]), 0, axis)


def _mean_weight_errors(
    model: onnx.ModelProto,
    targets: list[onnx.NodeProto],
    batches: list[dict[str, np.ndarray]],
    per_channel: bool,
    reduce_range: bool,
) -> list[np.ndarray]:
    """Run each target node's weight rounding error on its fp32 input; return the mean per output channel."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    del augmented.graph.output[:]
    initializers = {init.name: init for init in model.graph.initializer}
    opset = default_opset(model)
    outputs = []
    for index, node in enumerate(targets):
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
        if node.op_type == "Gemm":
            output_axis = 0 if _attribute(node, "transB", 0) else 1
            reduce_axes = [0]
        else:
            output_axis = 0
            reduce_axes = [0, *range(2, weight.ndim)]
        error = _weight_rounding_error(weight, output_axis if per_channel else None, reduce_range)
        prefix = f"edgefleet_bias_correction_{index}"
        augmented.graph.initializer.append(numpy_helper.from_array(error, f"{prefix}_weight"))
        error_node = helper.make_node(
            node.op_type, [node.input[0], f"{prefix}_weight"], [f"{prefix}_output"], name=f"{prefix}_node",
            domain=node.domain,
        )
        error_node.attribute.extend(a for a in node.attribute if a.name != "beta")
        augmented.graph.node.append(error_node)
        if opset >= 18:
            axes_name = f"{prefix}_axes"
            augmented.graph.initializer.append(numpy_helper.from_array(np.asarray(reduce_axes, np.int64), axes_name))
            mean_node = helper.make_node(
                "ReduceMean", [f"{prefix}_output", axes_name], [f"{prefix}_mean"], keepdims=0
            )
        else:
            mean_node = helper.make_node(
                "ReduceMean", [f"{prefix}_output"], [f"{prefix}_mean"], axes=reduce_axes, keepdims=0
            )
        augmented.graph.node.append(mean_node)
        augmented.graph.output.append(
            helper.make_tensor_value_info(f"{prefix}_mean", TensorProto.FLOAT, None)
        )
        outputs.append(f"{prefix}_mean")

    try:
        session = ort.InferenceSession(augmented.SerializeToString(), providers=["CPUExecutionProvider"])
        sums = [np.zeros(0, dtype=np.float64) for _ in outputs]
        count = 0
        for batch in batches:
            size = int(next(iter(batch.values())).shape[0])
            for position, value in enumerate(session.run(outputs, batch)):
                weighted = np.asarray(value, dtype=np.float64) * size
                sums[position] = weighted if sums[position].size == 0 else sums[position] + weighted
            count += size
    except Exception as error:  # onnxruntime raises several private exception types.
        raise QuantizationError(f"bias correction failed to run the model on the calibration data: {error}") from error
    return [total / count for total in sums]


def _load_checked(model_path: Path) -> onnx.ModelProto:
    if not model_path.is_file():
        raise QuantizationError(f"model {model_path} not found")
    try:
        model = onnx.load(str(model_path))
    except (DecodeError, OSError, ValueError) as error:
        raise QuantizationError(f"cannot parse {model_path} as ONNX: {error}") from error
    custom = sorted(
        {f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in _STANDARD_DOMAINS}
    )
    if custom:
        raise QuantizationError(
            f"{model_path} contains operators from custom domains that onnxruntime's quantizer cannot "
            f"handle: {custom}; replace them with standard ONNX operators before quantizing"
        )
    quantizable = {n.op_type for n in model.graph.node} & set(QDQRegistry)
    if not quantizable:
        present = sorted({n.op_type for n in model.graph.node})
        raise QuantizationError(
            f"{model_path} has no operator that onnxruntime can quantize (found {present}; "
            f"quantizable ones include Conv, MatMul, Gemm)"
        )
    _check_loads(model_path, "the source model")
    return model


def _check_loads(path: Path, what: str) -> None:
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises several private exception types on load.
        raise QuantizationError(
            f"{what} {path} does not load in onnxruntime {ort.__version__}: {error}"
        ) from error


def _preprocess(model_path: Path, output_path: Path) -> Path:
    try:
        quant_pre_process(str(model_path), str(output_path), skip_symbolic_shape=False)
    except Exception as error:  # The shape inference and optimizer raise assorted errors on odd graphs.
        logger.warning("quant_pre_process failed on %s, quantizing the original graph: %s", model_path, error)
        return model_path
    return output_path


def _recommend(metadata: ModelMetadata | None, model: onnx.ModelProto | None) -> tuple[str, str]:
    if metadata is not None and metadata.macs_by_op_type:
        conv = sum(v for k, v in metadata.macs_by_op_type.items() if k in CONV_OP_TYPES)
        matmul = sum(v for k, v in metadata.macs_by_op_type.items() if k in MATMUL_OP_TYPES)
        unit = "MACs"
    elif model is not None:
        conv, matmul = _weight_elements(model)
        unit = "weight elements"
    else:
        return "static", "no MACs by operator type are known"
    total = conv + matmul
    if total == 0:
        return "static", f"no Conv or MatMul {unit} found"
    conv_share = conv / total
    if conv_share >= 0.5:
        return "static", f"{conv_share:.0%} of the Conv+MatMul {unit} are in convolutions"
    return "dynamic", f"{1 - conv_share:.0%} of the Conv+MatMul {unit} are in MatMul/Gemm"


def _weight_elements(model: onnx.ModelProto) -> tuple[int, int]:
    sizes = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}
    conv = matmul = 0
    for node in model.graph.node:
        elements = sum(sizes.get(name, 0) for name in node.input)
        if node.op_type in CONV_OP_TYPES:
            conv += elements
        elif node.op_type in MATMUL_OP_TYPES:
            matmul += elements
    return conv, matmul
