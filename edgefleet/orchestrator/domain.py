"""Domain records that the orchestrator's handlers and stores exchange; no protobuf below this line."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.models import ModelMetadata

# Reported per-model states, matching edgefleet.v1.ModelState without the prefix.
MODEL_STATES = ("pending", "downloading", "verifying", "loading", "serving", "failed", "removed")


@dataclass(frozen=True)
class Device:
    device_id: str
    instance_key_hash: str  # SHA-256 hex of the agent's instance key; the key itself is never stored.
    hardware: HardwareProfile
    labels: dict[str, str]
    agent_version: str
    registered_at: datetime
    last_seen: datetime | None
    connected: bool  # A control stream is open on some orchestrator process.
    profile_revisions: int  # Distinct hardware profiles recorded for this device.
    desired_generation: int
    reported_generation: int
    # The signing key set the agent last reported trusting; None until it reports one.
    trusted_key_set_version: int | None = None
    trusted_key_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class IdentityConflict:
    device_id: str
    key_fingerprint: str  # First 12 hex digits of the SHA-256 of the rejected instance key.
    peer: str
    seen_at: datetime


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    digest: str  # "sha256:<hex>" of the uploaded file.
    size_bytes: int
    metadata: ModelMetadata
    created_at: datetime


@dataclass(frozen=True)
class Variant:
    variant_id: str
    model_name: str
    model_version: str
    kind: str  # "source", "int8", "pruned", "distilled", "tflite-fp16" and so on.
    format: str  # "onnx" or "tflite".
    precision: str
    digest: str
    size_bytes: int
    metadata: ModelMetadata
    status: str = "accepted"  # "accepted", "rejected" or "pending".
    rejection_reason: str = ""
    accuracy: float | None = None
    accuracy_metric: str = ""
    # Points lost against the source on the evaluation data of the variant's own gate; 0 for a source.
    accuracy_drop: float | None = None
    # The samples that accuracy and accuracy_drop were measured on; 0 when unknown or unmeasured.
    evaluation_samples: int = 0
    # "sha256:<hex>" of the evaluation inputs and labels that accuracy_drop was measured on, so that
    # drops from different data can be distinguished. Empty for a source and when unknown.
    evaluation_digest: str = ""
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50 by "threads=N".
    # The source's p50 by "threads=N", timed by the same gate run alternately with the variant. Empty
    # for a source, an ungated upload and a variant gated before this figure was kept.
    source_latency_ms: dict[str, float] = field(default_factory=dict)
    parent_variant_id: str = ""
    created_at: datetime | None = None


@dataclass(frozen=True)
class Assignment:
    """One model that a device should run: an entry of its desired state."""

    device_id: str
    model_name: str
    model_version: str
    variant_id: str
    digest: str
    size_bytes: int
    format: str
    threads: int = 0  # 0 lets the agent choose from its usable cores.
    rollout_id: str = ""


@dataclass(frozen=True)
class ModelStatus:
    """One model on one device as the agent last reported it."""

    device_id: str
    model_name: str
    model_version: str
    variant_id: str
    digest: str
    state: str  # One of MODEL_STATES.
    error: str = ""
    runtime: str = ""
    providers: tuple[str, ...] = ()
    threads: int = 0
    updated_at: datetime | None = None


@dataclass(frozen=True)
class MetricWindow:
    device_id: str
    model_name: str
    model_version: str
    variant_id: str
    hardware_class: str
    window_start: datetime  # Device clock.
    window_seconds: int
    received_at: datetime  # Orchestrator clock.
    inference_count: int
    error_count: int
    sketch: bytes  # A serialized edgefleet.v1.LatencySketch.
