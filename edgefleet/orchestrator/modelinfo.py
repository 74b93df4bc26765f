"""Read the interface, size and estimated cost of an ONNX or TFLite model file."""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Hashable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from edgefleet.common.models import TFLITE_IDENTIFIER, ModelMetadata, is_tflite

logger = logging.getLogger(__name__)

# Largest element count of one tensor that a model may declare or infer: 2^31 - 1, 8 GiB as
# float32, more than any edge device's memory. Larger shapes mark a broken or hostile file.
MAX_TENSOR_ELEMENTS = 2**31 - 1

Key = TypeVar("Key", bound=Hashable)


class ModelFileError(ValueError):
    """The bytes are not a usable model: not a model file, truncated, unsupported opset or invalid graph."""


def inspect_model(data: bytes | Path, source: str = "") -> ModelMetadata:
    """Detect the format of a model from its content and read its interface and estimated cost.

    A file whose bytes 4..8 are "TFL3" is read as TFLite, anything else as ONNX. Dynamic axes
    count as 1 in the MAC and memory estimates. Error messages name the model by source; without
    it they use the path, or the byte count for bytes.

    Raises ModelFileError when the content is not an ONNX or TFLite model, is truncated, uses an
    ONNX opset or operator domain that the installed onnxruntime does not support, or fails
    onnx.checker; OSError when a path cannot be read.
    """
    if isinstance(data, Path):
        content = data.read_bytes()
        source = source or str(data)
    else:
        content = bytes(data)
        source = source or f"<{len(content)} bytes>"
    if not content:
        raise ModelFileError(f"model {source} is empty; upload an .onnx or .tflite file")

    if is_tflite(content):
        from edgefleet.orchestrator.modelinfo_tflite import inspect_tflite

        metadata = inspect_tflite(content, source)
    else:
        from edgefleet.orchestrator.modelinfo_onnx import inspect_onnx

        metadata = inspect_onnx(content, source)
    logger.debug(
        "inspected %s: format=%s macs=%d parameters=%d precision=%s",
        source,
        metadata.format,
        metadata.macs,
        metadata.parameters,
        metadata.precision,
    )
    return metadata


def check_tensor_elements(name: str, shape: Sequence[int], source: str) -> None:
    """Raise ModelFileError naming the tensor when its shape has more than MAX_TENSOR_ELEMENTS elements.

    Dynamic axes (-1 or 0) count as 1.
    """
    elements = math.prod(max(int(d), 1) for d in shape)
    if elements > MAX_TENSOR_ELEMENTS:
        raise ModelFileError(
            f"model {source} tensor {name!r} has shape {tuple(int(d) for d in shape)}, which is {elements:.3g} "
            f"elements; at most {MAX_TENSOR_ELEMENTS} elements per tensor are supported, so no device could run it"
        )


def not_a_model_error(source: str) -> ModelFileError:
    """Return the error for content that is neither an ONNX protobuf nor a TFLite flatbuffer."""
    return ModelFileError(
        f"model {source} is not a model file: it is neither an ONNX protobuf nor a TFLite flatbuffer "
        f"(which has {TFLITE_IDENTIFIER.decode()!r} at bytes 4..8); upload an .onnx or .tflite file"
    )


def estimate_peak_activation_bytes(
    steps: Sequence[tuple[Sequence[Key], Sequence[Key]]],
    tensor_bytes: Mapping[Key, int],
    graph_inputs: Collection[Key],
    graph_outputs: Collection[Key],
    constants: Collection[Key],
) -> int:
    """Estimate the peak bytes of live activations when steps run in the given order.

    Each step is (input tensors, output tensors) of one operator, in execution order. A tensor is
    live from the step that produces it until its last consumer has run. Graph inputs are live
    from the start and graph outputs stay live to the end. Constants (weights and anything computed
    only from them) are not activations and are skipped. The peak is the maximum over steps of
    the live bytes while a step runs, its inputs and outputs included. Tensors missing from
    tensor_bytes count as 0 bytes. The estimate models neither in-place buffer reuse nor operator
    scratch memory, so a runtime's real peak can be lower or higher.
    """
    last_use: dict[Key, int] = {}
    for position, (inputs, _) in enumerate(steps):
        for key in inputs:
            if key not in constants:
                last_use[key] = position
    keep = set(graph_outputs)

    live: dict[Key, int] = {}
    for key in graph_inputs:
        if key not in constants:
            live[key] = tensor_bytes.get(key, 0)
    current = sum(live.values())
    peak = current
    for key in list(live):
        if key not in last_use and key not in keep:
            current -= live.pop(key)

    for position, (inputs, outputs) in enumerate(steps):
        for key in outputs:
            if key not in constants and key not in live:
                size = tensor_bytes.get(key, 0)
                live[key] = size
                current += size
        peak = max(peak, current)
        for key in (*inputs, *outputs):
            if key in live and key not in keep and last_use.get(key, -1) <= position:
                current -= live.pop(key)
    return peak


def propagate_constants(steps: Sequence[tuple[Sequence[Key], Sequence[Key]]], constants: Collection[Key]) -> set[Key]:
    """Return constants plus the outputs of every step whose inputs are all constant.

    The outputs of a step with no inputs (an ONNX Constant node) are constant too. This treats
    dequantized or cast weights as weights rather than as activations.
    """
    known = set(constants)
    for inputs, outputs in steps:
        if all(key in known for key in inputs):
            known.update(outputs)
    return known
