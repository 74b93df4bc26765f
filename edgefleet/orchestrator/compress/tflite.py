"""TFLite variants (fp32, fp16, full int8) of PyTorch models through litert-torch and ai-edge-quantizer."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TFLITE_PRECISIONS = ("fp32", "fp16", "int8")
_LITERT_TORCH_HINT = "install litert-torch (pip install litert-torch==0.10.0) to export TFLite variants"
_QUANTIZER_HINT = "install ai-edge-quantizer (pip install ai-edge-quantizer==0.10.0) for fp16 and int8 TFLite"


class TfliteExportError(RuntimeError):
    """A TFLite variant that cannot be produced: a missing package, a failed conversion or bad data."""


def export_tflite(
    module: torch.nn.Module,
    sample_input: np.ndarray,
    output_path: Path | str,
    *,
    precision: str = "fp32",
    calibration: np.ndarray | None = None,
) -> Path:
    """Convert a PyTorch module to a TFLite model with the given weight and activation precision.

    The TFLite input keeps the module's layout and the shape of sample_input (batch axis first). fp32 is
    the plain conversion. fp16 stores weights as float16 and computes in float32. int8 quantizes weights
    per channel and all activations, including the model input and output. Its ranges come from
    calibration (samples with the batch axis first), which int8 requires.

    Returns output_path. Raises TfliteExportError naming the missing package, the invalid precision or
    missing calibration data, or the converter's error.
    """
    output_path = Path(output_path)
    if precision not in TFLITE_PRECISIONS:
        raise TfliteExportError(f"invalid precision {precision!r}: expected one of {TFLITE_PRECISIONS}")
    if precision == "int8" and (calibration is None or calibration.shape[0] == 0):
        raise TfliteExportError("int8 TFLite export needs calibration samples with the batch axis first")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    if precision == "fp32":
        return _convert_fp32(module, sample_input, output_path)
    with tempfile.TemporaryDirectory(prefix="edgefleet-tflite-") as scratch:
        float_path = _convert_fp32(module, sample_input, Path(scratch) / "fp32.tflite")
        return quantize_tflite(float_path, output_path, precision=precision, calibration=calibration)


def _convert_fp32(module: torch.nn.Module, sample_input: np.ndarray, output_path: Path) -> Path:
    try:
        import litert_torch  # type: ignore[import-untyped,unused-ignore]
        import torch
    except ImportError as error:
        raise TfliteExportError(f"{error}: {_LITERT_TORCH_HINT}") from error
    sample = torch.from_numpy(np.ascontiguousarray(sample_input))
    try:
        # litert-torch 0.10 calls torch APIs that torch 2.13 deprecates; under warnings-as-errors (as in
        # the test suite) those warnings would abort the conversion.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            edge_model = litert_torch.convert(module.eval(), (sample,))
            edge_model.export(str(output_path))
    except Exception as error:  # The converter raises assorted torch.export and MLIR errors.
        raise TfliteExportError(
            f"litert-torch conversion of {type(module).__name__} failed: {error}"
        ) from error
    logger.info("exported fp32 TFLite model %s (%d bytes)", output_path, output_path.stat().st_size)
    return output_path


def quantize_tflite(
    float_path: Path, output_path: Path, *, precision: str, calibration: np.ndarray | None = None
) -> Path:
    """Quantize an fp32 TFLite model with ai-edge-quantizer to "fp16" weights or full "int8".

    Returns output_path. Raises TfliteExportError when the package is missing, precision is not fp16 or
    int8, int8 lacks calibration samples, or the quantizer fails.
    """
    try:
        from ai_edge_quantizer import qtyping, quantizer, recipe  # type: ignore[import-untyped,unused-ignore]
        from ai_edge_quantizer.recipe_manager import RecipeManager  # type: ignore[import-untyped,unused-ignore]
    except ImportError as error:
        raise TfliteExportError(f"{error}: {_QUANTIZER_HINT}") from error
    if precision not in ("fp16", "int8"):
        raise TfliteExportError(f"invalid quantized precision {precision!r}: expected 'fp16' or 'int8'")

    if precision == "int8" and (calibration is None or calibration.shape[0] == 0):
        raise TfliteExportError("int8 TFLite quantization needs calibration samples, batch axis first")

    tool = quantizer.Quantizer(str(float_path))
    try:
        with warnings.catch_warnings():
            # Calibration runs the interpreter with experimental_preserve_all_tensors on purpose (it reads
            # every intermediate tensor), and ai-edge-litert 2.3 warns about that on each call.
            warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
            if precision == "fp16":
                tool.load_quantization_recipe(_fp16_recipe(qtyping, RecipeManager))
                result = tool.quantize(enable_progress_report=False)
            else:
                assert calibration is not None  # Checked above.
                tool.load_quantization_recipe(recipe.static_wi8_ai8())
                calibration_result = tool.calibrate(_calibration_set(float_path, calibration))
                result = tool.quantize(calibration_result, enable_progress_report=False)
            result.export_model(str(output_path), overwrite=True)
    except TfliteExportError:
        raise
    except Exception as error:  # ai-edge-quantizer raises plain and private errors.
        raise TfliteExportError(
            f"ai-edge-quantizer {precision} quantization of {float_path} failed: {error}"
        ) from error
    logger.info("quantized %s to %s TFLite %s (%d bytes)", float_path, precision, output_path,
                output_path.stat().st_size)
    return output_path


def _fp16_recipe(qtyping: Any, recipe_manager: Any) -> Any:
    """Build an ai-edge-quantizer recipe that stores every supported op's weights as float16."""
    manager = recipe_manager()
    manager.add_quantization_config(
        regex=".*",
        operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
        op_config=qtyping.OpQuantizationConfig(
            weight_tensor_config=qtyping.TensorQuantizationConfig(
                num_bits=16, dtype=qtyping.TensorDataType.FLOAT
            ),
            compute_precision=qtyping.ComputePrecision.FLOAT,
            explicit_dequantize=True,
        ),
        algorithm_key="float_casting",
    )
    return manager.get_quantization_recipe()


def _calibration_set(float_path: Path, calibration: np.ndarray) -> dict[str, list[dict[str, Any]]]:
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_path=str(float_path)).get_signature_list()
    if len(signatures) != 1:
        raise TfliteExportError(f"{float_path} has signatures {sorted(signatures)}: expected exactly one")
    (key, signature), = signatures.items()
    if len(signature["inputs"]) != 1:
        raise TfliteExportError(f"{float_path} has inputs {signature['inputs']}: expected exactly one")
    name = signature["inputs"][0]
    batches = [{name: calibration[i:i + 1].astype(np.float32)} for i in range(calibration.shape[0])]
    return {key: batches}
