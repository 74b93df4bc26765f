"""The runner interface shared by the onnxruntime and LiteRT back ends, with input checking."""

from __future__ import annotations

import abc
import ctypes
import ctypes.util
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.models import TensorSpec

logger = logging.getLogger(__name__)


# glibc's malloc_trim, or None on a C library without it (musl, macOS). Looked up on first use.
_malloc_trim: Callable[[int], int] | None = None
_malloc_trim_looked_up = False


def release_freed_memory() -> None:
    """Return the memory that glibc's allocator keeps after frees to the operating system.

    A runtime session frees its weights and arenas when it closes, but glibc keeps most of these
    pages in its per-thread arenas for later allocations, so the agent's RSS grew by tens of MiB
    with each model swap until a memory cgroup killed it (bench/bench_agent_memory.py --swaps).
    malloc_trim(0) walks every arena and returns its free pages. It takes a few milliseconds, so
    the agent calls it after a model closes, not after each inference. Does nothing without glibc.
    """
    global _malloc_trim, _malloc_trim_looked_up
    if not _malloc_trim_looked_up:
        _malloc_trim_looked_up = True
        name = ctypes.util.find_library("c")
        try:
            _malloc_trim = ctypes.CDLL(name).malloc_trim if name else None
        except (OSError, AttributeError):
            _malloc_trim = None
    if _malloc_trim is not None:
        _malloc_trim(0)


class InvalidInputError(ValueError):
    """Raised when the feeds of a call do not match the model's declared inputs."""


class ModelLoadError(RuntimeError):
    """Raised when a runtime cannot load or warm up a model file; the message contains the runtime's error."""


class ModelClosedError(RuntimeError):
    """Raised when a model is called after close()."""


def choose_threads(profile: HardwareProfile | None, requested: int = 0) -> int:
    """Return the intra-op thread count for a model: requested when positive, else the usable cores.

    Usable cores come from the hardware profile (a cgroup quota may make them fractional) and are
    rounded down, with a minimum of 1. Raises ValueError for a negative request.
    """
    if requested < 0:
        raise ValueError(f"threads must be 0 (choose from the usable cores) or positive, got {requested}")
    if requested > 0:
        return requested
    if profile is None:
        return 1
    return max(1, math.floor(profile.usable_cores))


def check_threads(threads: int) -> None:
    """Raise ValueError unless threads is a positive thread count."""
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}; pass the count from choose_threads()")


def zeros_for(spec: TensorSpec) -> np.ndarray:
    """Return an array of zeros of the spec's dtype and shape, with each dynamic axis set to 1."""
    shape = tuple(1 if dim < 0 else dim for dim in spec.shape)
    return np.zeros(shape, dtype=np.dtype(spec.dtype))


def _describe(dtype: str, shape: Sequence[int]) -> str:
    return f"{dtype} with shape {tuple(shape)}"


def _shape_matches(expected: Sequence[int], received: Sequence[int]) -> bool:
    if len(expected) != len(received):
        return False
    return all(want < 0 or want == got for want, got in zip(expected, received, strict=True))


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _accepts_dtype(spec: TensorSpec, received: np.dtype) -> bool:
    """Return whether check_feeds takes received for the spec's input, as it is or converted."""
    expected = np.dtype(spec.dtype)
    if received == expected:
        return True
    if spec.scale != 0.0:
        # A quantized input takes float data, which the runner quantizes with the spec's scale.
        return received in (np.float32, np.float64)
    if expected == np.float32 and received == np.float64:
        return True
    return np.issubdtype(expected, np.integer) and np.issubdtype(received, np.integer)


def _to_float32(name: str, array: np.ndarray) -> np.ndarray:
    """Convert float64 values to float32; raise InvalidInputError naming the input when a finite one overflows.

    NaN and infinities stay as they are, and other values are rounded to the nearest float32.
    """
    if array.dtype == np.float32:
        return array
    with np.errstate(over="raise"):
        try:
            return array.astype(np.float32)
        except FloatingPointError:
            pass
    with np.errstate(over="ignore"):
        overflow = np.isinf(array.astype(np.float32)) & np.isfinite(array)
    count = int(overflow.sum())
    example = float(array[overflow].flat[0])
    values = f"the float64 value {example!r} is" if count == 1 else f"{count} float64 values, such as {example!r}, are"
    raise InvalidInputError(
        f"invalid input {name!r}: {values} finite but outside the float32 range of -{FLOAT32_MAX:.9g} to "
        f"{FLOAT32_MAX:.9g}, so converting them would give infinity; scale the values into that range"
    )


def _to_integer(name: str, array: np.ndarray, expected: np.dtype) -> np.ndarray:
    """Convert integers to the dtype expected; raise InvalidInputError naming the input when one does not fit."""
    if np.can_cast(array.dtype, expected, "safe") or array.size == 0:
        return array.astype(expected)
    low, high = int(array.min()), int(array.max())
    limits = np.iinfo(expected)
    if low < limits.min or high > limits.max:
        raise InvalidInputError(
            f"invalid input {name!r}: {array.dtype.name} values from {low} to {high} do not fit in {expected.name}, "
            f"whose range is {limits.min} to {limits.max}; pass values in that range"
        )
    return array.astype(expected)


def _convert_dtype(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """Return array in the dtype that the spec's input takes; the dtype must pass _accepts_dtype."""
    expected = np.dtype(spec.dtype)
    if array.dtype == expected:
        return array
    if np.issubdtype(array.dtype, np.floating):
        return _to_float32(spec.name, array)
    return _to_integer(spec.name, array, expected)


def check_feeds(specs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check feeds against the declared inputs and return them converted for the runtime.

    Converts float64 to float32, and, for a quantized input, float data to float32 (the runner
    quantizes it). A finite float64 value beyond the float32 range is rejected, not turned into inf.
    Converts integers to the integer dtype of an input that is not quantized when every value fits
    in it, such as int32 to int64 always and int64 to int32 for values within the int32 range.
    Dynamic axes (-1) accept any size. Returns C-contiguous arrays. Raises InvalidInputError naming
    the input for missing or unexpected names, another dtype, a shape mismatch or a value that the
    conversion cannot keep.
    """
    expected_names = [spec.name for spec in specs]
    missing = [name for name in expected_names if name not in feeds]
    unexpected = sorted(name for name in feeds if name not in expected_names)
    if missing or unexpected:
        raise InvalidInputError(
            f"invalid input names: missing {missing}, unexpected {unexpected}; "
            f"the model expects exactly {expected_names}"
        )

    checked: dict[str, np.ndarray] = {}
    for spec in specs:
        array = np.asarray(feeds[spec.name])
        if not _accepts_dtype(spec, array.dtype) or not _shape_matches(spec.shape, array.shape):
            accepted = spec.dtype if spec.scale == 0.0 else f"{spec.dtype} (or float32 to quantize)"
            raise InvalidInputError(
                f"invalid input {spec.name!r}: expected {_describe(accepted, spec.shape)} "
                f"(-1 is any size), received {_describe(array.dtype.name, array.shape)}; "
                "pass an array of the expected dtype and shape"
            )
        checked[spec.name] = np.ascontiguousarray(_convert_dtype(spec, array))
    return checked


class LoadedModel(abc.ABC):
    """A model loaded in a runtime, ready to run.

    Implementations set the attributes below in their constructor. providers lists the execution
    providers or delegates actually in effect, requested_providers the ones requested, and
    fallback_reason gives the reason a requested one is not in effect ("" when all are).
    """

    path: Path
    runtime: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    providers: tuple[str, ...]
    requested_providers: tuple[str, ...]
    fallback_reason: str
    threads: int

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check and convert feeds, run the model and return its outputs by name.

        Raises InvalidInputError for feeds that do not match the inputs, ModelClosedError after
        close(), and the runtime's own exception when it fails.
        """
        return self.run_checked(check_feeds(self.inputs, feeds))

    @abc.abstractmethod
    def run_checked(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on feeds already returned by check_feeds and return its outputs by name."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the runtime's resources; later calls raise ModelClosedError."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """Whether close() was called."""


class Runner(abc.ABC):
    """A runtime back end that loads model files of one format."""

    runtime: str  # "onnxruntime" or "litert".
    format: str  # "onnx" or "tflite", as in edgefleet.common.models.FORMATS.

    @abc.abstractmethod
    def available_providers(self) -> tuple[str, ...]:
        """Return the execution providers or delegates this runtime can use, in preference order."""

    @abc.abstractmethod
    def load(self, path: Path | str, *, threads: int, allowed_providers: Sequence[str] | None = None) -> LoadedModel:
        """Load the model file at path with threads intra-op threads.

        allowed_providers limits the providers or delegates tried (None allows all). Raises
        ModelLoadError with the runtime's message when the file cannot be loaded.
        """
