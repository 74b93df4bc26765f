"""Post-training int8 quantization of ONNX models with onnxruntime: static QDQ and dynamic."""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import version_converter
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.registry import QDQRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process

from edgefleet.common.models import ModelMetadata
from edgefleet.orchestrator.compress.calibration import ArrayCalibrationReader, model_input_spec

logger = logging.getLogger(__name__)

# Per-channel QuantizeLinear/DequantizeLinear (the axis attribute) exists from ONNX opset 13.
PER_CHANNEL_MIN_OPSET = 13
ACTIVATION_TYPES = ("uint8", "int8")
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
    reduce_range: bool = False,
    preprocess: bool = True,
    op_types_to_quantize: tuple[str, ...] | None = None,
    nodes_to_exclude: tuple[str, ...] = (),
    input_name: str | None = None,
    calibration_batch_size: int = 1,
    extra_options: dict[str, object] | None = None,
) -> Path:
    """Quantize an fp32 ONNX model to int8 weights and activations in the QDQ format.

    Weights are int8 (per output channel when per_channel); activations use activation_type, with
    ranges measured by running calibration (a reader, or an array with the batch axis first) through
    the model. A model below opset 13 is upgraded for per-channel weights. Unless preprocess is False,
    `quant_pre_process` (symbolic shape inference and graph optimization) runs first; when it fails the
    original graph is quantized and a warning is logged.

    Returns output_path. Raises QuantizationError when the model does not load in onnxruntime, contains
    operators from a custom domain, has nothing to quantize, or cannot be upgraded to opset 13 for
    per-channel weights; raises CalibrationError when the calibration array does not match the input.
    """
    if activation_type not in ACTIVATION_TYPES:
        raise QuantizationError(
            f"invalid activation_type {activation_type!r}: expected one of {ACTIVATION_TYPES}"
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

    output_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as scratch:
        staged = Path(scratch) / "source.onnx"
        onnx.save(model, str(staged))
        if preprocess:
            staged = _preprocess(staged, Path(scratch) / "preprocessed.onnx")
        # onnxruntime's defaults (asymmetric activations, symmetric weights) apply unless overridden.
        options: dict[str, object] = dict(extra_options or {})
        try:
            quantize_static(
                str(staged),
                str(output_path),
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
            raise QuantizationError(
                f"onnxruntime static quantization of {model_path} failed: {error}"
            ) from error

    quantized = onnx.load(str(output_path))
    counts = Counter(node.op_type for node in quantized.graph.node)
    if counts["QuantizeLinear"] == 0 and counts["DequantizeLinear"] == 0:
        raise QuantizationError(
            f"static quantization of {model_path} inserted no QuantizeLinear/DequantizeLinear nodes: "
            f"op_types_to_quantize={op_types_to_quantize} matched none of {sorted(counts)}"
        )
    _check_loads(output_path, "the quantized model")
    logger.info(
        "quantized %s to %s: %d QuantizeLinear, %d DequantizeLinear, per_channel=%s, activations=%s",
        model_path, output_path, counts["QuantizeLinear"], counts["DequantizeLinear"], per_channel,
        activation_type,
    )
    return output_path


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
