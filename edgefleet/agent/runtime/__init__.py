"""Model execution in the agent: onnxruntime and LiteRT runners and the in-process ModelHost."""

from edgefleet.agent.runtime.base import (
    InvalidInputError,
    LoadedModel,
    ModelClosedError,
    ModelLoadError,
    Runner,
    check_feeds,
    choose_threads,
)
from edgefleet.agent.runtime.host import (
    InferenceResult,
    LatencyCallback,
    ModelHost,
    ModelNotFoundError,
    ServedModel,
)

__all__ = [
    "InferenceResult",
    "InvalidInputError",
    "LatencyCallback",
    "LoadedModel",
    "ModelClosedError",
    "ModelHost",
    "ModelLoadError",
    "ModelNotFoundError",
    "Runner",
    "ServedModel",
    "check_feeds",
    "choose_threads",
]
