"""Builders of small ONNX and TFLite models for the runtime tests, cached under the repository's .cache."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

REPO_ROOT = Path(__file__).resolve().parents[2]
# Bump when a builder changes, so that stale cached models are rebuilt.
BUILDER_VERSION = 2


def cache_dir() -> Path:
    """Return the folder for built test models: $EDGEFLEET_CACHE_DIR/test-models or .cache/test-models."""
    root = Path(os.environ.get("EDGEFLEET_CACHE_DIR", REPO_ROOT / ".cache"))
    folder = root / "test-models"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Write a file through write(temporary path), ignoring its warnings, and rename it into place.

    The converters' progress lines go to stderr: a test that builds a model first while it reads a
    command's stdout (the cache is empty on a fresh clone) would read them too.
    """
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
    os.close(handle)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            # The converters warn about their own internals (debug options, deprecations).
            warnings.simplefilter("ignore")
            write(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def linear_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return the (4, 3) weight and (3,) bias of the linear test models for a seed."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((4, 3)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(3)).astype(np.float32)
    return weight, bias


def onnx_linear(path: Path, seed: int = 0) -> Path:
    """Write y = relu(x @ W + b) with x float32 of shape (batch, 4) and a dynamic batch axis."""
    weight, bias = linear_weights(seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "weight"], ["product"]),
            helper.make_node("Add", ["product", "bias"], ["sum"]),
            helper.make_node("Relu", ["sum"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [
            helper.make_tensor("weight", TensorProto.FLOAT, weight.shape, weight.ravel().tolist()),
            helper.make_tensor("bias", TensorProto.FLOAT, bias.shape, bias.ravel().tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def onnx_two_inputs(path: Path) -> Path:
    """Write total = sum(ids, axis 1) + offset with ids int64 (batch, 2) and offset float32 (1,)."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["ids"], ["ids_float"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["ids_float", "axes"], ["row_sum"], keepdims=0),
            helper.make_node("Add", ["row_sum", "offset"], ["total"]),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 2]),
            helper.make_tensor_value_info("offset", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def onnx_failing_reshape(path: Path) -> Path:
    """Write a model that loads but fails on every run: it reshapes x (batch, 4) to 5 elements."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "target_shape"], ["y"])],
        "failing_reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])],
        [helper.make_tensor("target_shape", TensorProto.INT64, [1], [5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def linear_reference(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Return relu(x @ W + b) computed with numpy for the linear models of a seed."""
    weight, bias = linear_weights(seed)
    return np.maximum(x.astype(np.float32) @ weight + bias, 0.0)


def _torch_linear(seed: int) -> object:
    import torch

    weight, bias = linear_weights(seed)

    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)
            with torch.no_grad():
                self.fc.weight.copy_(torch.from_numpy(weight.T.copy()))
                self.fc.bias.copy_(torch.from_numpy(bias))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x))

    return Linear().eval()


def tflite_linear(seed: int = 0) -> Path:
    """Return a float32 TFLite model of relu(x @ W + b) with x of shape (1, 4), converted by litert-torch."""
    path = cache_dir() / f"linear-fp32-s{seed}-v{BUILDER_VERSION}.tflite"
    if path.exists():
        return path
    import torch

    # Imported by name because litert-torch ships no type information.
    litert_torch = importlib.import_module("litert_torch")

    def write(target: Path) -> None:
        exported = litert_torch.convert(_torch_linear(seed), (torch.zeros(1, 4),))
        exported.export(str(target))

    return _write_atomically(path, write)


def calibration_inputs(count: int = 32) -> np.ndarray:
    """Return calibration samples for the int8 model: uniform in [-1, 1], shape (count, 1, 4)."""
    rng = np.random.default_rng(1)
    return rng.uniform(-1.0, 1.0, size=(count, 1, 4)).astype(np.float32)


def tflite_linear_int8(seed: int = 0) -> Path:
    """Return the linear model fully quantized to int8 (int8 input and output) by ai-edge-quantizer.

    Calibrated on inputs uniform in [-1, 1]; inputs outside that range are clipped.
    """
    path = cache_dir() / f"linear-int8-s{seed}-v{BUILDER_VERSION}.tflite"
    if path.exists():
        return path
    from ai_edge_litert.interpreter import Interpreter

    # Imported by name because ai-edge-quantizer ships no type information.
    quantizer = importlib.import_module("ai_edge_quantizer.quantizer")
    recipe = importlib.import_module("ai_edge_quantizer.recipe")

    source = tflite_linear(seed)
    input_name = Interpreter(model_path=str(source)).get_signature_list()["serving_default"]["inputs"][0]
    samples = [{input_name: sample} for sample in calibration_inputs()]

    def write(target: Path) -> None:
        quantizing = quantizer.Quantizer(str(source), recipe.static_wi8_ai8())
        # The quantizer merges per-sample ranges with a moving average, which shrinks them. Taking
        # the min and max over samples calibrated one at a time covers the whole calibration range.
        ranges: dict[str, Any] = {}
        for sample in samples:
            for tensor, qsv in quantizing.calibrate({"serving_default": [sample]}).items():
                if tensor in ranges:
                    qsv = {
                        "min": np.minimum(ranges[tensor]["min"], qsv["min"]),
                        "max": np.maximum(ranges[tensor]["max"], qsv["max"]),
                    }
                ranges[tensor] = qsv
        quantizing.quantize(ranges).export_model(str(target), overwrite=True)

    return _write_atomically(path, write)
