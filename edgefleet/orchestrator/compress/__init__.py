"""Model compression: int8 quantization, pruning, distillation, TFLite export and the variant gate."""

from edgefleet.orchestrator.compress.calibration import (
    ArrayCalibrationReader,
    CalibrationError,
    PreprocessSpec,
    reader_from_array,
    reader_from_images,
    reader_from_npz,
)
from edgefleet.orchestrator.compress.gate import GateError, GateResult, evaluate_variant
from edgefleet.orchestrator.compress.quantize import (
    QuantizationError,
    quantize_dynamic_int8,
    quantize_static_qdq,
    recommend_quantization,
)

__all__ = [
    "ArrayCalibrationReader",
    "CalibrationError",
    "GateError",
    "GateResult",
    "PreprocessSpec",
    "QuantizationError",
    "evaluate_variant",
    "quantize_dynamic_int8",
    "quantize_static_qdq",
    "reader_from_array",
    "reader_from_images",
    "reader_from_npz",
    "recommend_quantization",
]
