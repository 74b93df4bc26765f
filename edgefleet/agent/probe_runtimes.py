"""Inference runtimes installed on the device, with the execution providers and delegates that load."""

from __future__ import annotations

import base64
import ctypes
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgefleet.agent.runtime.native_stderr import capture_native_stderr
from edgefleet.common.hardware import RuntimeInfo

logger = logging.getLogger(__name__)

# y = x + x on float32[1], opset 13, IR version 7 (loads in onnxruntime 1.8 and later). The agent
# cannot import the onnx package, so the bytes are embedded; tests/agent/fakes/tiny_models.py
# rebuilds them with onnx.helper.
TINY_ONNX_MODEL = base64.b64decode(
    "CAcSCWVkZ2VmbGVldDo5Cg4KAXgKAXgSAXkiA0FkZBIFcHJvYmVaDwoBeBIKCggIARIECgIIAWIPCgF5EgoKCAgBEgQKAggBQgQKABAN"
)

# y = x + x on float32[1] as a TFLite flatbuffer (schema version 3, one ADD operator), built by
# tests/agent/fakes/tiny_models.py with the schema bindings that ship with ai-edge-litert.
TINY_TFLITE_MODEL = base64.b64decode(
    "CAAAAFRGTDPC////FAAAABwAAAAoAAAABAEAAAMAAAABAAAABAAAAAT///8JAAAAZWRnZWZsZWV0AAAAAQAAABQAAAAAAA4AGAAU"
    "ABAADAAIAAQADgAAABQAAAAcAAAAXAAAAGAAAABkAAAABAAAAG1haW4AAAAAAQAAABQAAAAAAA4AFAAAABAADAALAAQADgAAABAA"
    "AAAAAAALDAAAABAAAACA////AQAAAAEAAAACAAAAAAAAAAAAAAABAAAAAQAAAAEAAAAAAAAAAgAAADAAAAAEAAAA5P///wgAAAAM"
    "AAAAAQAAAHkAAAABAAAAAQAAAAwADAAIAAAAAAAEAAwAAAAIAAAADAAAAAEAAAB4AAAAAQAAAAEAAAABAAAACAAAAAQABAAEAAAA"
)

# Providers that run nothing on local hardware: the Azure provider forwards requests to a cloud
# endpoint, so listing it would only split hardware classes.
IGNORED_ONNXRUNTIME_PROVIDERS = frozenset({"AzureExecutionProvider"})

# The XNNPACK CPU delegate is compiled into every LiteRT build that this probe supports.
LITERT_BUILTIN_DELEGATES = ("XNNPACK",)


@dataclass(frozen=True)
class DelegateLibrary:
    name: str  # The name reported in RuntimeInfo.providers.
    library: str  # Shared library that implements the TFLite external delegate interface.
    options: dict[str, str] = field(default_factory=dict)


# GPU and NPU delegates that export tflite_plugin_create_delegate, tried in this order.
LITERT_DELEGATES = (
    DelegateLibrary("GPU", "libtensorflowlite_gpu_delegate.so"),
    DelegateLibrary("ArmNN-GpuAcc", "libarmnnDelegate.so", {"backends": "GpuAcc"}),
    DelegateLibrary("QNN-GPU", "libQnnTFLiteDelegate.so", {"backend_type": "gpu"}),
    DelegateLibrary("QNN-HTP", "libQnnTFLiteDelegate.so", {"backend_type": "htp"}),
    DelegateLibrary("EdgeTPU", "libedgetpu.so.1"),
    DelegateLibrary("VX", "libvx_delegate.so"),
)


def onnxruntime_available_providers() -> list[str]:
    """Return the execution providers compiled into onnxruntime; they may still fail to load."""
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def onnxruntime_provider_loads(provider: str) -> bool:
    """Create a session with provider on TINY_ONNX_MODEL and report whether the session uses it.

    onnxruntime falls back to the CPU with a warning or a logged error when a provider's libraries
    (CUDA, cuDNN, TensorRT) are missing, so only `session.get_providers()` shows whether it loaded.
    """
    import numpy as np
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # Errors still reach stderr, so a broken CUDA install shows why.
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            session = onnxruntime.InferenceSession(TINY_ONNX_MODEL, options, providers=providers)
            outputs = session.run(None, {"x": np.array([1.5], dtype=np.float32)})
        except Exception as exc:  # onnxruntime raises pybind11 types that share no narrower base.
            logger.debug("onnxruntime provider %s failed: %s", provider, exc)
            return False
    for warning in caught:
        logger.debug("onnxruntime provider %s: %s", provider, warning.message)
    loaded = provider in session.get_providers() and float(outputs[0][0]) == 3.0
    logger.debug("onnxruntime provider %s %s", provider, "loads" if loaded else "does not load")
    return loaded


def probe_onnxruntime(
    available: Callable[[], Sequence[str]] = onnxruntime_available_providers,
    loads: Callable[[str], bool] = onnxruntime_provider_loads,
) -> RuntimeInfo | None:
    """Describe the installed onnxruntime with the providers that load, or None when it is missing.

    available lists the compiled-in providers and loads verifies one; tests replace either.
    """
    try:
        import onnxruntime
    except ImportError as exc:
        logger.debug("onnxruntime not installed: %s", exc)
        return None
    providers = tuple(
        provider for provider in available() if provider not in IGNORED_ONNXRUNTIME_PROVIDERS and loads(provider)
    )
    if "CPUExecutionProvider" not in providers:
        logger.warning("onnxruntime %s cannot run a one-node model on the CPU", onnxruntime.__version__)
    return RuntimeInfo(name="onnxruntime", version=str(onnxruntime.__version__), providers=providers)


def _import_litert() -> tuple[str, str, Any, Callable[..., Any]] | None:
    """Return (package, version, Interpreter, load_delegate) from ai_edge_litert or tflite_runtime, or None.

    package names the distribution, because the two number their releases differently.
    """
    try:
        import ai_edge_litert
        from ai_edge_litert.interpreter import Interpreter, load_delegate

        return "ai-edge-litert", str(ai_edge_litert.__version__), Interpreter, load_delegate
    except ImportError as exc:
        logger.debug("ai_edge_litert not installed: %s", exc)
    try:
        import tflite_runtime
        from tflite_runtime.interpreter import Interpreter, load_delegate

        return "tflite-runtime", str(tflite_runtime.__version__), Interpreter, load_delegate
    except ImportError as exc:
        logger.debug("tflite_runtime not installed: %s", exc)
    return None


def _runs_tiny_model(interpreter_class: Any, delegates: Sequence[Any] = ()) -> bool:
    """Run TINY_TFLITE_MODEL with the given delegates and check that 1.5 + 1.5 gives 3."""
    import numpy as np

    try:
        interpreter = interpreter_class(model_content=TINY_TFLITE_MODEL, experimental_delegates=list(delegates))
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], np.array([1.5], dtype=np.float32))
        interpreter.invoke()
        output = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    except (ValueError, RuntimeError) as exc:
        logger.debug("LiteRT cannot run the one-node model: %s", exc)
        return False
    return float(output[0]) == 3.0


def litert_delegate_loads(delegate: DelegateLibrary) -> bool:
    """Load a delegate library and run TINY_TFLITE_MODEL through it; False when any step fails.

    The library is opened with ctypes first: LiteRT's Delegate object raises from its finalizer
    when the library is missing or lacks the plugin functions.
    """
    litert = _import_litert()
    if litert is None:
        return False
    _, _, interpreter_class, load_delegate = litert
    try:
        library = ctypes.CDLL(delegate.library)
    except OSError as exc:
        logger.debug("LiteRT delegate %s not available: %s", delegate.name, exc)
        return False
    plugin_functions = ("tflite_plugin_create_delegate", "tflite_plugin_destroy_delegate")
    if not all(hasattr(library, function) for function in plugin_functions):
        logger.debug("%s does not implement the TFLite external delegate interface", delegate.library)
        return False
    try:
        loaded = load_delegate(delegate.library, delegate.options)
    except (ValueError, RuntimeError, OSError) as exc:
        logger.debug("LiteRT delegate %s failed to load: %s", delegate.name, exc)
        return False
    return _runs_tiny_model(interpreter_class, [loaded])


def probe_litert(
    delegates: Sequence[DelegateLibrary] = LITERT_DELEGATES,
    loads: Callable[[DelegateLibrary], bool] = litert_delegate_loads,
) -> RuntimeInfo | None:
    """Describe the installed LiteRT (or tflite_runtime) with its delegates, or None when missing.

    XNNPACK is listed when the interpreter runs a one-node model; each entry of delegates is
    listed only when loads returns True for it. Tests replace loads to fake a GPU delegate.
    """
    litert = _import_litert()
    if litert is None:
        return None
    package, version, interpreter_class, _ = litert
    providers: list[str] = []
    # LiteRT prints to fd 2 when the first interpreter applies XNNPACK, which would break a JSON log.
    with capture_native_stderr("probing LiteRT"):
        if _runs_tiny_model(interpreter_class):
            providers.extend(LITERT_BUILTIN_DELEGATES)
        else:
            logger.warning("LiteRT %s cannot run a one-node model on the CPU", version)
        providers.extend(delegate.name for delegate in delegates if loads(delegate))
    return RuntimeInfo(name="litert", version=version, providers=tuple(providers), package=package)


def probe_runtimes() -> tuple[RuntimeInfo, ...]:
    """Probe onnxruntime and LiteRT with their real provider and delegate checks."""
    found = (probe_onnxruntime(), probe_litert())
    return tuple(runtime for runtime in found if runtime is not None)
