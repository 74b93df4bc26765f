"""The onnxruntime back end: session options, execution provider choice and fallback reporting."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgefleet.agent.runtime.base import (
    LoadedModel,
    ModelClosedError,
    ModelLoadError,
    Runner,
    check_threads,
)
from edgefleet.common.models import TensorSpec

logger = logging.getLogger(__name__)

# Execution providers in the order the agent prefers them: dedicated accelerators first, CPU last.
# Providers missing here (AzureExecutionProvider, for one) are never requested.
PROVIDER_PREFERENCE = (
    "TensorrtExecutionProvider",
    "NvTensorRTRTXExecutionProvider",
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "OpenVINOExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "QNNExecutionProvider",
    "NnapiExecutionProvider",
    "ACLExecutionProvider",
    "ArmNNExecutionProvider",
    "XnnpackExecutionProvider",
    "CPUExecutionProvider",
)
CPU_PROVIDER = "CPUExecutionProvider"
# Microseconds an idle intra-op worker spins before it blocks (onnxruntime 1.32 session config key
# session.intra_op.spin_duration_us). With the default, a worker kept spinning for tens of ms after a call (measured).
INTRA_OP_SPIN_DURATION_US = 50

# ONNX tensor element types, as onnxruntime's NodeArg.type spells them, and their numpy dtype names.
_ONNX_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def _provider_matches(provider: str, allowed: str) -> bool:
    """Tell whether allowed names provider, in full ("CUDAExecutionProvider") or short ("cuda")."""
    full = provider.lower()
    short = full.removesuffix("executionprovider")
    return allowed.lower() in (full, short)


def select_providers(available: Sequence[str], allowed: Sequence[str] | None) -> tuple[str, ...]:
    """Return the available providers that allowed permits, in PROVIDER_PREFERENCE order.

    CPUExecutionProvider is always last, because onnxruntime places the nodes that no other
    provider supports on it. allowed=None permits every provider.
    """
    selected = [
        provider
        for provider in PROVIDER_PREFERENCE
        if provider in available
        and provider != CPU_PROVIDER
        and (allowed is None or any(_provider_matches(provider, name) for name in allowed))
    ]
    selected.append(CPU_PROVIDER)
    return tuple(selected)


def _tensor_spec(node: Any) -> TensorSpec:
    dtype = _ONNX_DTYPES.get(node.type)
    if dtype is None:
        raise ModelLoadError(
            f"tensor {node.name!r} has type {node.type}, which the agent does not support; "
            f"use one of {sorted(_ONNX_DTYPES)}"
        )
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in node.shape)
    dim_names = tuple(dim if isinstance(dim, str) else "" for dim in node.shape)
    if not any(dim_names):
        dim_names = ()
    return TensorSpec(name=node.name, dtype=dtype, shape=shape, dim_names=dim_names)


class OnnxModel(LoadedModel):
    """A model running in an onnxruntime InferenceSession."""

    def __init__(
        self, path: Path, session: ort.InferenceSession, requested: tuple[str, ...], threads: int, notes: str
    ) -> None:
        self.path = path
        self.runtime = "onnxruntime"
        self._session: ort.InferenceSession | None = session
        self.inputs = tuple(_tensor_spec(node) for node in session.get_inputs())
        self.outputs = tuple(_tensor_spec(node) for node in session.get_outputs())
        self._output_names = [spec.name for spec in self.outputs]
        self.providers = tuple(session.get_providers())
        self.requested_providers = requested
        self.threads = threads
        dropped = [provider for provider in requested if provider not in self.providers]
        self.fallback_reason = ""
        if dropped:
            self.fallback_reason = f"onnxruntime did not enable {', '.join(dropped)}"
            if notes:
                self.fallback_reason += f": {notes}"
            logger.warning(
                "model %s runs on %s instead of %s: %s",
                path,
                ", ".join(self.providers),
                ", ".join(requested),
                self.fallback_reason,
            )

    @property
    def session(self) -> ort.InferenceSession:
        """The InferenceSession; raises ModelClosedError after close()."""
        session = self._session
        if session is None:
            raise ModelClosedError(f"model {self.path} is closed; install it again to run it")
        return session

    def run_checked(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session on checked feeds and return the outputs by name.

        InferenceSession.run is thread-safe, so concurrent calls share the session.
        """
        values = self.session.run(self._output_names, feeds)
        return dict(zip(self._output_names, values, strict=True))

    def close(self) -> None:
        """Drop the session; onnxruntime frees it when the last reference goes."""
        self._session = None

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._session is None


class OnnxRunner(Runner):
    """Loads ONNX files into onnxruntime sessions tuned for one model per process slot.

    provider_discovery returns the providers the onnxruntime build offers (by default
    onnxruntime.get_available_providers()); tests replace it to pretend an accelerator exists.
    """

    runtime = "onnxruntime"
    format = "onnx"

    def __init__(self, provider_discovery: Callable[[], Sequence[str]] | None = None) -> None:
        self._provider_discovery = provider_discovery or ort.get_available_providers

    def available_providers(self) -> tuple[str, ...]:
        """Return the providers of this onnxruntime build that the agent uses, in preference order."""
        available = set(self._provider_discovery())
        return tuple(provider for provider in PROVIDER_PREFERENCE if provider in available)

    def session_options(
        self, threads: int, *, spin_duration_us: int | None = INTRA_OP_SPIN_DURATION_US
    ) -> ort.SessionOptions:
        """Return session options with threads intra-op threads, one inter-op thread and all optimisations.

        spin_duration_us bounds how long an idle intra-op worker spins before it blocks; None keeps
        onnxruntime's default. Raises ValueError for threads below 1 or a negative spin_duration_us.
        """
        check_threads(threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if spin_duration_us is not None:
            if spin_duration_us < 0:
                raise ValueError(f"spin_duration_us must be at least 0, got {spin_duration_us}")
            # Bounded spinning: a worker that spins for tens of ms after each call takes a core from the
            # device's own work and from the next call of another loaded model (docs/benchmarks.md, cost model).
            options.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_duration_us))
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return options

    def load(
        self, path: Path | str, *, threads: int, allowed_providers: Sequence[str] | None = None
    ) -> OnnxModel:
        """Create an InferenceSession for the ONNX file at path and report the providers in effect.

        Raises ModelLoadError with onnxruntime's message when the session cannot be created.
        """
        path = Path(path)
        options = self.session_options(threads)
        requested = select_providers(self.available_providers(), allowed_providers)
        # onnxruntime warns (instead of raising) when a requested provider is missing from its
        # build; the warning text becomes the fallback reason.
        # NOTE: catch_warnings changes process-wide state, so a warning raised by another thread
        # during a load may be captured here as well.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                session = ort.InferenceSession(str(path), options, providers=list(requested))
            except Exception as error:  # onnxruntime raises several unrelated exception classes.
                raise ModelLoadError(f"onnxruntime failed to load {path}: {error}") from error
        notes = "; ".join(str(warning.message) for warning in caught)
        return OnnxModel(path, session, requested, threads, notes)
