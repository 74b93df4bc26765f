"""The LiteRT back end: a pool of interpreters, XNNPACK or GPU delegates and (de)quantization."""

from __future__ import annotations

import ctypes
import logging
import queue
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.runtime.base import (
    InvalidInputError,
    LoadedModel,
    ModelClosedError,
    ModelLoadError,
    Runner,
    check_threads,
)
from edgefleet.agent.runtime.native_stderr import capture_native_stderr
from edgefleet.common.models import TensorSpec

try:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType, load_delegate
except ImportError:  # Older devices ship the standalone tflite_runtime wheel instead.
    from tflite_runtime.interpreter import (
        Interpreter,
        OpResolverType,
        load_delegate,
    )

logger = logging.getLogger(__name__)

# Delegate names as LiteRTModel.providers reports them, in preference order.
GPU = "gpu"
XNNPACK = "xnnpack"
CPU = "cpu"  # Built-in kernels without a delegate.
DELEGATE_PREFERENCE = (GPU, XNNPACK, CPU)

# Shared libraries of the TFLite GPU delegate as Linux and Android builds name them. Each must
# export the external delegate entry points (tflite_plugin_create_delegate).
GPU_DELEGATE_LIBRARIES = (
    "libtensorflowlite_gpu_delegate.so",
    "libtensorflowlite_gpu_gl.so",
    "libtensorflowlite_gpu_jni.so",
)
_PLUGIN_SYMBOL = "tflite_plugin_create_delegate"


def quantize(values: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Quantize float values for spec: q = round(x / scale) + zero_point, clipped to the dtype's range.

    Raises InvalidInputError naming the input for NaN, which no quantized value stands for. Infinities
    and values beyond the range clip to its ends.
    """
    dtype = np.dtype(spec.dtype)
    limits = np.iinfo(dtype)
    values = values.astype(np.float32, copy=False)
    if np.isnan(values).any():
        raise InvalidInputError(
            f"input {spec.name!r} contains NaN, which the model's quantized {dtype.name} input cannot hold; "
            "replace the NaN values"
        )
    # Dividing a huge value by a small scale overflows to inf, which the clip then takes to the range's end.
    with np.errstate(over="ignore"):
        scaled = np.round(values / np.float32(spec.scale)) + spec.zero_point
    return np.clip(scaled, limits.min, limits.max).astype(dtype)


def dequantize(values: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Return quantized values as float32: (q - zero_point) * scale."""
    return (values.astype(np.float32) - np.float32(spec.zero_point)) * np.float32(spec.scale)


def _tensor_spec(detail: dict[str, Any]) -> TensorSpec:
    scales = detail.get("quantization_parameters", {}).get("scales", ())
    if len(scales) > 1:
        raise ModelLoadError(
            f"tensor {detail['name']!r} is quantized per channel ({len(scales)} scales); the agent "
            "supports per-tensor quantization on model inputs and outputs only"
        )
    scale, zero_point = detail["quantization"]
    shape = detail.get("shape_signature", detail["shape"])
    return TensorSpec(
        name=detail["name"],
        dtype=np.dtype(detail["dtype"]).name,
        shape=tuple(int(dim) for dim in shape),
        scale=float(scale),
        zero_point=int(zero_point),
    )


def _open_gpu_delegate(libraries: Sequence[str]) -> tuple[Any | None, list[str]]:
    """Load the first GPU delegate library that works; return it (or None) and the errors met."""
    errors: list[str] = []
    for library in libraries:
        # Probe with ctypes first: load_delegate's Delegate object raises from its finalizer when
        # the library is missing or lacks the plugin symbol.
        try:
            handle = ctypes.CDLL(library)
        except OSError as error:
            errors.append(f"{library}: {error}")
            continue
        if not hasattr(handle, _PLUGIN_SYMBOL):
            errors.append(f"{library}: no {_PLUGIN_SYMBOL} symbol, so it is not a TFLite delegate")
            continue
        try:
            return load_delegate(library), errors
        except (ValueError, RuntimeError) as error:
            errors.append(f"{library}: {error}")
    return None, errors


class _Slot:
    """One interpreter and the input shapes it is currently allocated for."""

    def __init__(self, interpreter: Any) -> None:
        self.interpreter = interpreter
        self.input_details = interpreter.get_input_details()
        self.output_details = interpreter.get_output_details()
        self.shapes = {int(d["index"]): tuple(int(dim) for dim in d["shape"]) for d in self.input_details}


class LiteRTModel(LoadedModel):
    """A TFLite model served by a pool of interpreters, one per concurrent call.

    A LiteRT Interpreter is not thread-safe, so each call takes an interpreter from the pool and
    returns it when done. Calls beyond pool_size wait for a free interpreter.
    """

    def __init__(
        self,
        path: Path,
        slots: list[_Slot],
        requested: tuple[str, ...],
        providers: tuple[str, ...],
        threads: int,
        fallback_reason: str,
    ) -> None:
        self.path = path
        self.runtime = "litert"
        first = slots[0]
        self.inputs = tuple(_tensor_spec(detail) for detail in first.input_details)
        self.outputs = tuple(_tensor_spec(detail) for detail in first.output_details)
        self.requested_providers = requested
        self.providers = providers
        self.threads = threads
        self.fallback_reason = fallback_reason
        self.pool_size = len(slots)
        self._input_indices = [int(d["index"]) for d in first.input_details]
        self._output_indices = [int(d["index"]) for d in first.output_details]
        self._closed = False
        self._slots: queue.SimpleQueue[_Slot | None] = queue.SimpleQueue()
        for slot in slots:
            self._slots.put(slot)

    def _acquire(self) -> _Slot:
        if self._closed:
            raise ModelClosedError(f"model {self.path} is closed; install it again to run it")
        slot = self._slots.get()
        if slot is None:
            # close() left this marker; pass it on to the next waiting caller.
            self._slots.put(None)
            raise ModelClosedError(f"model {self.path} is closed; install it again to run it")
        return slot

    def _release(self, slot: _Slot) -> None:
        if not self._closed:
            self._slots.put(slot)

    def run_checked(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Quantize float feeds where needed, invoke a free interpreter and dequantize the outputs."""
        slot = self._acquire()
        try:
            interpreter = slot.interpreter
            arrays = []
            resized = False
            for spec, index in zip(self.inputs, self._input_indices, strict=True):
                array = feeds[spec.name]
                if spec.scale != 0.0 and array.dtype != np.dtype(spec.dtype):
                    array = quantize(array, spec)
                if slot.shapes[index] != array.shape:
                    interpreter.resize_tensor_input(index, array.shape, strict=True)
                    slot.shapes[index] = array.shape
                    resized = True
                arrays.append(array)
            if resized:
                interpreter.allocate_tensors()
            for index, array in zip(self._input_indices, arrays, strict=True):
                interpreter.set_tensor(index, array)
            interpreter.invoke()
            outputs: dict[str, np.ndarray] = {}
            for spec, index in zip(self.outputs, self._output_indices, strict=True):
                value = interpreter.get_tensor(index)
                outputs[spec.name] = dequantize(value, spec) if spec.scale != 0.0 else value
            return outputs
        finally:
            self._release(slot)

    def close(self) -> None:
        """Drop the interpreters; calls waiting for one raise ModelClosedError."""
        self._closed = True
        while True:
            try:
                self._slots.get_nowait()
            except queue.Empty:
                break
        self._slots.put(None)

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closed


class LiteRTRunner(Runner):
    """Loads TFLite files into pools of LiteRT interpreters.

    pool_size interpreters serve calls in parallel, each with threads threads. gpu_delegate_libraries
    lists the GPU delegate libraries tried, in order, when "gpu" is allowed.
    """

    runtime = "litert"
    format = "tflite"

    def __init__(self, *, pool_size: int = 1, gpu_delegate_libraries: Sequence[str] = GPU_DELEGATE_LIBRARIES):
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {pool_size}")
        self.pool_size = pool_size
        self._gpu_libraries = tuple(gpu_delegate_libraries)

    def available_providers(self) -> tuple[str, ...]:
        """Return the delegates this runner tries, in preference order; "gpu" only when libraries are listed.

        Whether a GPU delegate loads shows only at load time, in LiteRTModel.providers.
        """
        if self._gpu_libraries:
            return DELEGATE_PREFERENCE
        return (XNNPACK, CPU)

    def _select(self, allowed: Sequence[str] | None) -> tuple[str, ...]:
        permitted = {name.lower() for name in allowed} if allowed is not None else None
        selected = tuple(
            delegate
            for delegate in self.available_providers()
            if delegate != CPU and (permitted is None or delegate in permitted)
        )
        return (*selected, CPU)

    def _interpreter(self, path: Path, threads: int, requested: tuple[str, ...]) -> tuple[Any, str, str]:
        """Create one interpreter; return it, the delegate in effect and why GPU was not used ("")."""
        resolver = OpResolverType.AUTO
        if XNNPACK not in requested:
            resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        cpu_delegate = XNNPACK if XNNPACK in requested else CPU
        reason = ""
        if GPU in requested:
            delegate, errors = _open_gpu_delegate(self._gpu_libraries)
            if delegate is not None:
                try:
                    interpreter = Interpreter(
                        model_path=str(path),
                        num_threads=threads,
                        experimental_delegates=[delegate],
                        experimental_op_resolver_type=resolver,
                    )
                    interpreter.allocate_tensors()
                    return interpreter, GPU, ""
                except (ValueError, RuntimeError) as error:
                    errors.append(f"the GPU delegate failed on this model: {error}")
            reason = "GPU delegate not used: " + "; ".join(errors)
        try:
            interpreter = Interpreter(
                model_path=str(path), num_threads=threads, experimental_op_resolver_type=resolver
            )
            interpreter.allocate_tensors()
        except Exception as error:  # LiteRT raises ValueError or RuntimeError, depending on the step.
            raise ModelLoadError(f"LiteRT failed to load {path}: {error}") from error
        return interpreter, cpu_delegate, reason

    def load(
        self, path: Path | str, *, threads: int, allowed_providers: Sequence[str] | None = None
    ) -> LiteRTModel:
        """Create pool_size interpreters for the TFLite file at path, each with threads threads.

        allowed_providers names the delegates to try ("gpu", "xnnpack"; "cpu" is always allowed).
        XNNPACK is LiteRT's default CPU delegate and is reported as in effect whenever it is allowed.
        NOTE: LiteRT does not tell which nodes XNNPACK claimed, so "xnnpack" may cover a model
        that partly runs on built-in kernels.
        Raises ModelLoadError with LiteRT's message when the file cannot be loaded.
        """
        check_threads(threads)
        path = Path(path)
        requested = self._select(allowed_providers)
        attempt = requested
        slots: list[_Slot] = []
        delegates: set[str] = set()
        reasons: list[str] = []
        # LiteRT prints to fd 2 while it builds an interpreter, which would break a JSON log.
        with capture_native_stderr(f"loading {path}"):
            for _ in range(self.pool_size):
                interpreter, delegate, reason = self._interpreter(path, threads, attempt)
                slots.append(_Slot(interpreter))
                delegates.add(delegate)
                if reason:
                    reasons.append(reason)
                    # The remaining interpreters skip a GPU delegate that already failed.
                    attempt = tuple(name for name in attempt if name != GPU)
        providers = tuple(name for name in DELEGATE_PREFERENCE if name in delegates)
        fallback_reason = reasons[0] if reasons else ""
        if fallback_reason:
            logger.info("model %s runs on %s: %s", path, ", ".join(providers), fallback_reason)
        return LiteRTModel(path, slots, requested, providers, threads, fallback_reason)
