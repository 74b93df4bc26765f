"""Read the interface, parameters, MACs and activation memory of a TFLite model through LiteRT."""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from edgefleet.common.models import ModelMetadata, TensorSpec
from edgefleet.orchestrator.modelinfo import (
    ModelFileError,
    check_tensor_elements,
    estimate_peak_activation_bytes,
    propagate_constants,
)
from edgefleet.orchestrator.runtime_compat import parse_release

logger = logging.getLogger(__name__)

TFLITE_SCHEMA_VERSION = 3  # The schema version that the "TFL3" file identifier marks.

Shape = tuple[int, ...]
_INTEGER_WEIGHT_DTYPES = frozenset({"int8", "uint8", "int4"})
_FLOAT_WEIGHT_DTYPES = frozenset({"float32", "float16", "float64", "bfloat16"})


def inspect_tflite(content: bytes, source: str) -> ModelMetadata:
    """Load a TFLite model into a LiteRT interpreter and estimate its cost; raise ModelFileError if it fails.

    Only the main subgraph is read: the MACs of WHILE or IF bodies are not counted. Nothing is
    allocated or run, so no kernel has to be prepared.
    """
    interpreter = _load_interpreter(content, source)
    tensor_details = {int(detail["index"]): detail for detail in interpreter.get_tensor_details()}
    for detail in tensor_details.values():
        signature = detail.get("shape_signature")
        check_tensor_elements(str(detail["name"]), detail["shape"] if signature is None else signature, source)
    shapes = {index: _static_shape(detail) for index, detail in tensor_details.items()}
    input_details = interpreter.get_input_details()
    output_details = interpreter.get_output_details()
    ops = interpreter._get_ops_details()

    steps = [
        (
            [int(index) for index in op["inputs"] if index >= 0],
            [int(index) for index in op["outputs"] if index >= 0],
        )
        for op in ops
    ]
    input_indices = [int(detail["index"]) for detail in input_details]
    output_indices = [int(detail["index"]) for detail in output_details]
    produced = {index for _, outputs in steps for index in outputs}
    consumed = {index for inputs, _ in steps for index in inputs}
    # A tensor that an op reads but no op writes and that is not a model input must come from a
    # buffer in the file: a weight, a bias or a constant shape.
    # NOTE: variable tensors (the state of stateful ops) match this rule too and count as parameters.
    weights = consumed - produced - set(input_indices)

    macs_by_op_type: dict[str, int] = {}
    for op, (_, outputs) in zip(ops, steps, strict=True):
        op_name = str(op["op_name"])
        estimate = _MAC_ESTIMATORS.get(op_name)
        if estimate is None:
            continue
        operand_shapes = [shapes[int(i)] if i >= 0 else () for i in op["inputs"]]
        macs = estimate(operand_shapes, [shapes[i] for i in outputs], op_name)
        if macs:
            macs_by_op_type[op_name] = macs_by_op_type.get(op_name, 0) + macs

    sizes = {
        index: math.prod(shapes[index]) * np.dtype(detail["dtype"]).itemsize
        for index, detail in tensor_details.items()
    }
    return ModelMetadata(
        format="tflite",
        inputs=tuple(_tensor_spec(detail) for detail in input_details),
        outputs=tuple(_tensor_spec(detail) for detail in output_details),
        opset=TFLITE_SCHEMA_VERSION,
        parameters=sum(math.prod(shapes[index]) for index in weights),
        macs=sum(macs_by_op_type.values()),
        peak_activation_bytes=estimate_peak_activation_bytes(
            steps,
            sizes,
            graph_inputs=input_indices,
            graph_outputs=output_indices,
            constants=propagate_constants(steps, weights),
        ),
        macs_by_op_type=macs_by_op_type,
        precision=_precision({index: tensor_details[index] for index in weights}, shapes),
        layers=len(ops),
        min_runtime_version=min_runtime_version(content, source),
    )


class MetadataReadError(ValueError):
    """Metadata of a TFLite file that cannot be read, with the reason as the message."""


def min_runtime_version(content: bytes, source: str) -> str:
    """Return the min_runtime_version entry of a TFLite flatbuffer's metadata ("2.3.0"), or "" without one.

    Returns "" as well, with a warning naming source, when the entry cannot be read (see
    read_min_runtime_version).
    """
    try:
        return read_min_runtime_version(content, source)
    except MetadataReadError as error:
        logger.warning("cannot read min_runtime_version of %s: %s", source, error)
        return ""


def read_min_runtime_version(content: bytes, source: str) -> str:
    """Return the min_runtime_version entry of a TFLite flatbuffer's metadata ("2.3.0"), or "" without one.

    The TFLite converter stores it as a NUL-padded ASCII string in the buffer that the entry names.
    Reading it needs the schema bindings that ship with ai-edge-litert. Raises MetadataReadError
    without them, and for a flatbuffer that cannot be parsed or an entry that names a missing buffer.
    """
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        raise MetadataReadError("ai-edge-litert's schema bindings are missing") from None
    try:
        return _read_min_runtime_version(schema.Model.GetRootAs(content, 0), content, source)
    except MetadataReadError:
        raise
    except (struct.error, IndexError, ValueError) as error:
        # An upload runs this after LiteRT verified the flatbuffer, so there the error marks a bug in the reading.
        raise MetadataReadError(str(error) or type(error).__name__) from error


def _read_min_runtime_version(model: Any, content: bytes, source: str) -> str:
    for index in range(model.MetadataLength()):
        entry = model.Metadata(index)
        if entry is None or entry.Name() != b"min_runtime_version":
            continue
        if not 0 <= entry.Buffer() < model.BuffersLength():
            raise MetadataReadError(f"min_runtime_version names buffer {entry.Buffer()}, which does not exist")
        buffer = model.Buffers(entry.Buffer())
        data = bytes(buffer.DataAsNumpy()) if buffer.DataLength() else b""
        if not data and buffer.Offset() > 1:  # Models over 2 GiB keep buffers after the flatbuffer.
            data = content[buffer.Offset() : buffer.Offset() + buffer.Size()]
        text = data.split(b"\0", 1)[0].decode("ascii", errors="replace").strip()
        if parse_release(text) is None:
            logger.warning(
                "%s: min_runtime_version %r is not MAJOR.MINOR[.PATCH], so selection cannot check it", source, text
            )
        return text
    return ""


def _load_interpreter(content: bytes, source: str) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter, OpResolverType
        except ImportError as error:
            raise ModuleNotFoundError(
                "reading TFLite models needs LiteRT: pip install ai-edge-litert (or tflite-runtime)"
            ) from error
    try:
        # Without default delegates the op list is the model's own, not XNNPACK's fused partitions.
        return Interpreter(
            model_content=content,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
    except (ValueError, RuntimeError) as error:
        message = str(error)
        if "not a valid Flatbuffer" in message:
            raise ModelFileError(
                f"TFLite model {source} is truncated or corrupt: it failed FlatBuffers verification "
                f"({len(content)} bytes); upload the complete file"
            ) from error
        raise ModelFileError(f"TFLite model {source} could not be loaded by LiteRT: {message}") from error


def _static_shape(detail: Mapping[str, Any]) -> Shape:
    """Return the tensor's shape with dynamic axes set to 1."""
    return tuple(max(int(d), 1) for d in detail["shape"])


def _tensor_spec(detail: Mapping[str, Any]) -> TensorSpec:
    signature = detail.get("shape_signature")
    shape = tuple(int(d) for d in (signature if signature is not None else detail["shape"]))
    scale, zero_point = detail["quantization"]
    return TensorSpec(
        name=str(detail["name"]),
        dtype=np.dtype(detail["dtype"]).name,
        shape=shape,
        dim_names=("",) * len(shape),  # TFLite has no symbolic axis names.
        scale=float(scale),
        zero_point=int(zero_point),
    )


def _precision(weights: Mapping[int, Mapping[str, Any]], shapes: Mapping[int, Shape]) -> str:
    """Return the precision of the weight dtype with the most elements: int8, fp16 or fp32.

    Integer constants other than 8- and 4-bit ones (int32 biases, shape tensors) are ignored.
    """
    elements = {"int8": 0, "fp16": 0, "fp32": 0}
    for index, detail in weights.items():
        dtype = np.dtype(detail["dtype"]).name
        if dtype in _INTEGER_WEIGHT_DTYPES:
            elements["int8"] += math.prod(shapes[index])
        elif dtype == "float16":
            elements["fp16"] += math.prod(shapes[index])
        elif dtype in _FLOAT_WEIGHT_DTYPES:
            elements["fp32"] += math.prod(shapes[index])
    if elements["int8"] > max(elements["fp16"], elements["fp32"]):
        return "int8"
    if elements["fp16"] > elements["fp32"]:
        return "fp16"
    return "fp32"


Estimator = Callable[[Sequence[Shape], Sequence[Shape], str], int]


def _conv_2d(inputs: Sequence[Shape], outputs: Sequence[Shape], op_name: str) -> int:
    # Filter layout (C_out, kH, kW, C_in / groups).
    if len(inputs) < 2 or len(inputs[1]) != 4 or not outputs:
        return _unknown(op_name)
    return math.prod(outputs[0]) * math.prod(inputs[1][1:])


def _depthwise_conv_2d(inputs: Sequence[Shape], outputs: Sequence[Shape], op_name: str) -> int:
    # Filter layout (1, kH, kW, C_out): each output element reads one input channel.
    if len(inputs) < 2 or len(inputs[1]) != 4 or not outputs:
        return _unknown(op_name)
    return math.prod(outputs[0]) * inputs[1][1] * inputs[1][2]


def _conv_3d(inputs: Sequence[Shape], outputs: Sequence[Shape], op_name: str) -> int:
    # Filter layout (kD, kH, kW, C_in, C_out).
    if len(inputs) < 2 or len(inputs[1]) != 5 or not outputs:
        return _unknown(op_name)
    return math.prod(outputs[0]) * math.prod(inputs[1][:4])


def _fully_connected(inputs: Sequence[Shape], outputs: Sequence[Shape], op_name: str) -> int:
    # Weights layout (units, K).
    if len(inputs) < 2 or not inputs[1] or not outputs:
        return _unknown(op_name)
    return math.prod(outputs[0]) * inputs[1][-1]


def _transpose_conv(inputs: Sequence[Shape], outputs: Sequence[Shape], op_name: str) -> int:
    # Inputs (output_shape, weights (C_out, kH, kW, C_in), data): each input element reaches
    # C_out * kH * kW outputs.
    if len(inputs) < 3 or len(inputs[1]) != 4:
        return _unknown(op_name)
    return math.prod(inputs[2]) * math.prod(inputs[1][:3])


def _batch_matmul(inputs: Sequence[Shape], outputs: Sequence[Shape], op_name: str) -> int:
    if len(inputs) < 2 or len(inputs[0]) < 2 or not outputs or len(outputs[0]) < 2:
        return _unknown(op_name)
    # The adj_x option is not exposed by the interpreter, so K is the axis of A that is not M.
    # When both axes of A equal M, K equals M either way.
    rows = outputs[0][-2]
    a_last_two = inputs[0][-2:]
    k = a_last_two[0] if a_last_two[1] == rows and a_last_two[0] != rows else a_last_two[1]
    return math.prod(outputs[0]) * k


def _unknown(op_name: str) -> int:
    logger.debug("no MAC estimate for a %s op: unexpected tensor shapes", op_name)
    return 0


_MAC_ESTIMATORS: dict[str, Estimator] = {
    "CONV_2D": _conv_2d,
    "DEPTHWISE_CONV_2D": _depthwise_conv_2d,
    "CONV_3D": _conv_3d,
    "FULLY_CONNECTED": _fully_connected,
    "TRANSPOSE_CONV": _transpose_conv,
    "BATCH_MATMUL": _batch_matmul,
}
