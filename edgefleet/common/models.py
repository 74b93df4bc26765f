"""Domain types that describe a model file: formats, tensors and the cost estimated from its graph."""

from __future__ import annotations

from dataclasses import dataclass, field

FORMATS = ("onnx", "tflite")
PRECISIONS = ("fp32", "fp16", "int8")
# numpy dtype names of the tensors that agents serve and the local APIs carry. Strings, sequences and
# maps have no fixed byte layout, so a model with such an input or output cannot be served.
SERVED_DTYPES = (
    "float16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
)
TFLITE_IDENTIFIER = b"TFL3"  # FlatBuffers file identifier of the TFLite schema, stored at bytes 4..8.


def is_tflite(content: bytes) -> bool:
    """Return whether content (the whole file or its first 8 bytes) carries the TFLite identifier."""
    return len(content) >= 8 and content[4:8] == TFLITE_IDENTIFIER


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, uint8, int8, int64.
    shape: tuple[int, ...]  # -1 marks a dynamic axis.
    dim_names: tuple[str, ...] = ()  # Symbolic names of dynamic axes, "" for fixed ones.
    scale: float = 0.0  # Quantization scale; 0 means the tensor is not quantized.
    zero_point: int = 0


@dataclass(frozen=True)
class ModelMetadata:
    format: str  # One of FORMATS.
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int  # ONNX default-domain opset, or the TFLite schema version.
    parameters: int
    macs: int  # Multiply-accumulates of one inference with dynamic axes set to 1.
    peak_activation_bytes: int
    macs_by_op_type: dict[str, int] = field(default_factory=dict)
    precision: str = "fp32"  # One of PRECISIONS: the narrowest type that most weights use.
    layers: int = 0
    # TFLite: the min_runtime_version entry of the flatbuffer's metadata ("2.3.0"). "" when absent.
    min_runtime_version: str = ""
