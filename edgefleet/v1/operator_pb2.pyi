import datetime

from edgefleet.v1 import agent_pb2 as _agent_pb2
from edgefleet.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class RolloutState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLLOUT_STATE_UNSPECIFIED: _ClassVar[RolloutState]
    ROLLOUT_STATE_PENDING: _ClassVar[RolloutState]
    ROLLOUT_STATE_RUNNING: _ClassVar[RolloutState]
    ROLLOUT_STATE_PAUSED: _ClassVar[RolloutState]
    ROLLOUT_STATE_SUCCEEDED: _ClassVar[RolloutState]
    ROLLOUT_STATE_ROLLING_BACK: _ClassVar[RolloutState]
    ROLLOUT_STATE_ROLLED_BACK: _ClassVar[RolloutState]
    ROLLOUT_STATE_ABORTED: _ClassVar[RolloutState]
    ROLLOUT_STATE_SUPERSEDED: _ClassVar[RolloutState]

class WaveDecision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WAVE_DECISION_UNSPECIFIED: _ClassVar[WaveDecision]
    WAVE_DECISION_WAITING: _ClassVar[WaveDecision]
    WAVE_DECISION_PROCEED: _ClassVar[WaveDecision]
    WAVE_DECISION_PAUSE: _ClassVar[WaveDecision]
    WAVE_DECISION_ROLLBACK: _ClassVar[WaveDecision]

class RolloutAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLLOUT_ACTION_UNSPECIFIED: _ClassVar[RolloutAction]
    ROLLOUT_ACTION_PAUSE: _ClassVar[RolloutAction]
    ROLLOUT_ACTION_RESUME: _ClassVar[RolloutAction]
    ROLLOUT_ACTION_ABORT: _ClassVar[RolloutAction]
    ROLLOUT_ACTION_ROLLBACK: _ClassVar[RolloutAction]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
ROLLOUT_STATE_UNSPECIFIED: RolloutState
ROLLOUT_STATE_PENDING: RolloutState
ROLLOUT_STATE_RUNNING: RolloutState
ROLLOUT_STATE_PAUSED: RolloutState
ROLLOUT_STATE_SUCCEEDED: RolloutState
ROLLOUT_STATE_ROLLING_BACK: RolloutState
ROLLOUT_STATE_ROLLED_BACK: RolloutState
ROLLOUT_STATE_ABORTED: RolloutState
ROLLOUT_STATE_SUPERSEDED: RolloutState
WAVE_DECISION_UNSPECIFIED: WaveDecision
WAVE_DECISION_WAITING: WaveDecision
WAVE_DECISION_PROCEED: WaveDecision
WAVE_DECISION_PAUSE: WaveDecision
WAVE_DECISION_ROLLBACK: WaveDecision
ROLLOUT_ACTION_UNSPECIFIED: RolloutAction
ROLLOUT_ACTION_PAUSE: RolloutAction
ROLLOUT_ACTION_RESUME: RolloutAction
ROLLOUT_ACTION_ABORT: RolloutAction
ROLLOUT_ACTION_ROLLBACK: RolloutAction

class IdentityConflict(_message.Message):
    __slots__ = ("instance_key_fingerprint", "peer", "seen_at")
    INSTANCE_KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    SEEN_AT_FIELD_NUMBER: _ClassVar[int]
    instance_key_fingerprint: str
    peer: str
    seen_at: _timestamp_pb2.Timestamp
    def __init__(self, instance_key_fingerprint: _Optional[str] = ..., peer: _Optional[str] = ..., seen_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("device_id", "status", "hardware", "labels", "agent_version", "registered_at", "last_seen", "models", "desired", "desired_generation", "reported_generation", "identity_conflicts", "profile_revisions", "clock_skew_seconds", "clock_skewed", "drift", "revoked", "trusted_key_set_version", "trusted_key_ids")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    DESIRED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    REPORTED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_CONFLICTS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_REVISIONS_FIELD_NUMBER: _ClassVar[int]
    CLOCK_SKEW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLOCK_SKEWED_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    TRUSTED_KEY_SET_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRUSTED_KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    status: _common_pb2.DeviceStatus
    hardware: _common_pb2.HardwareProfile
    labels: _containers.ScalarMap[str, str]
    agent_version: str
    registered_at: _timestamp_pb2.Timestamp
    last_seen: _timestamp_pb2.Timestamp
    models: _containers.RepeatedCompositeFieldContainer[_agent_pb2.ModelStatus]
    desired: _containers.RepeatedCompositeFieldContainer[_agent_pb2.ModelAssignment]
    desired_generation: int
    reported_generation: int
    identity_conflicts: _containers.RepeatedCompositeFieldContainer[IdentityConflict]
    profile_revisions: int
    clock_skew_seconds: float
    clock_skewed: bool
    drift: _containers.RepeatedCompositeFieldContainer[Drift]
    revoked: bool
    trusted_key_set_version: int
    trusted_key_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, device_id: _Optional[str] = ..., status: _Optional[_Union[_common_pb2.DeviceStatus, str]] = ..., hardware: _Optional[_Union[_common_pb2.HardwareProfile, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., agent_version: _Optional[str] = ..., registered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., models: _Optional[_Iterable[_Union[_agent_pb2.ModelStatus, _Mapping]]] = ..., desired: _Optional[_Iterable[_Union[_agent_pb2.ModelAssignment, _Mapping]]] = ..., desired_generation: _Optional[int] = ..., reported_generation: _Optional[int] = ..., identity_conflicts: _Optional[_Iterable[_Union[IdentityConflict, _Mapping]]] = ..., profile_revisions: _Optional[int] = ..., clock_skew_seconds: _Optional[float] = ..., clock_skewed: _Optional[bool] = ..., drift: _Optional[_Iterable[_Union[Drift, _Mapping]]] = ..., revoked: _Optional[bool] = ..., trusted_key_set_version: _Optional[int] = ..., trusted_key_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Drift(_message.Message):
    __slots__ = ("kind", "model_name", "desired_variant_id", "reported_variant_id", "detail")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DESIRED_VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    REPORTED_VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    kind: str
    model_name: str
    desired_variant_id: str
    reported_variant_id: str
    detail: str
    def __init__(self, kind: _Optional[str] = ..., model_name: _Optional[str] = ..., desired_variant_id: _Optional[str] = ..., reported_variant_id: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ("status", "label_selector", "hardware_class", "drift_only", "page_size", "page_token")
    class LabelSelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LABEL_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_CLASS_FIELD_NUMBER: _ClassVar[int]
    DRIFT_ONLY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    status: _common_pb2.DeviceStatus
    label_selector: _containers.ScalarMap[str, str]
    hardware_class: str
    drift_only: bool
    page_size: int
    page_token: str
    def __init__(self, status: _Optional[_Union[_common_pb2.DeviceStatus, str]] = ..., label_selector: _Optional[_Mapping[str, str]] = ..., hardware_class: _Optional[str] = ..., drift_only: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDevicesResponse(_message.Message):
    __slots__ = ("devices", "next_page_token")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    next_page_token: str
    def __init__(self, devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetDeviceRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class UploadModelHeader(_message.Message):
    __slots__ = ("name", "version", "format", "size_bytes", "sha256", "filename", "variant_kind")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    VARIANT_KIND_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    format: _common_pb2.ModelFormat
    size_bytes: int
    sha256: str
    filename: str
    variant_kind: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., format: _Optional[_Union[_common_pb2.ModelFormat, str]] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., filename: _Optional[str] = ..., variant_kind: _Optional[str] = ...) -> None: ...

class UploadModelRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadModelHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UploadModelHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class Variant(_message.Message):
    __slots__ = ("variant_id", "model_name", "model_version", "kind", "format", "precision", "digest", "size_bytes", "metadata", "status", "rejection_reason", "accuracy", "accuracy_metric", "latency_ms", "parent_variant_id", "created_at", "accuracy_drop", "source_latency_ms", "evaluation_samples", "evaluation_digest")
    class LatencyMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class SourceLatencyMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REJECTION_REASON_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_METRIC_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    PARENT_VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_DROP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_DIGEST_FIELD_NUMBER: _ClassVar[int]
    variant_id: str
    model_name: str
    model_version: str
    kind: str
    format: _common_pb2.ModelFormat
    precision: _common_pb2.Precision
    digest: str
    size_bytes: int
    metadata: _common_pb2.ModelMetadata
    status: str
    rejection_reason: str
    accuracy: float
    accuracy_metric: str
    latency_ms: _containers.ScalarMap[str, float]
    parent_variant_id: str
    created_at: _timestamp_pb2.Timestamp
    accuracy_drop: float
    source_latency_ms: _containers.ScalarMap[str, float]
    evaluation_samples: int
    evaluation_digest: str
    def __init__(self, variant_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., kind: _Optional[str] = ..., format: _Optional[_Union[_common_pb2.ModelFormat, str]] = ..., precision: _Optional[_Union[_common_pb2.Precision, str]] = ..., digest: _Optional[str] = ..., size_bytes: _Optional[int] = ..., metadata: _Optional[_Union[_common_pb2.ModelMetadata, _Mapping]] = ..., status: _Optional[str] = ..., rejection_reason: _Optional[str] = ..., accuracy: _Optional[float] = ..., accuracy_metric: _Optional[str] = ..., latency_ms: _Optional[_Mapping[str, float]] = ..., parent_variant_id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., accuracy_drop: _Optional[float] = ..., source_latency_ms: _Optional[_Mapping[str, float]] = ..., evaluation_samples: _Optional[int] = ..., evaluation_digest: _Optional[str] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "version", "digest", "size_bytes", "metadata", "created_at", "variants")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    digest: str
    size_bytes: int
    metadata: _common_pb2.ModelMetadata
    created_at: _timestamp_pb2.Timestamp
    variants: _containers.RepeatedCompositeFieldContainer[Variant]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., digest: _Optional[str] = ..., size_bytes: _Optional[int] = ..., metadata: _Optional[_Union[_common_pb2.ModelMetadata, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., variants: _Optional[_Iterable[_Union[Variant, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ListVariantsRequest(_message.Message):
    __slots__ = ("model_name", "model_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ListVariantsResponse(_message.Message):
    __slots__ = ("variants",)
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    variants: _containers.RepeatedCompositeFieldContainer[Variant]
    def __init__(self, variants: _Optional[_Iterable[_Union[Variant, _Mapping]]] = ...) -> None: ...

class CompressionJob(_message.Message):
    __slots__ = ("job_id", "model_name", "model_version", "recipe_json", "state", "progress", "stage", "error", "variant_ids", "created_at", "updated_at")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECIPE_JSON_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    VARIANT_IDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model_name: str
    model_version: str
    recipe_json: str
    state: JobState
    progress: float
    stage: str
    error: str
    variant_ids: _containers.RepeatedScalarFieldContainer[str]
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, job_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., recipe_json: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., progress: _Optional[float] = ..., stage: _Optional[str] = ..., error: _Optional[str] = ..., variant_ids: _Optional[_Iterable[str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateCompressionJobRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "recipe_json")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECIPE_JSON_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    recipe_json: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., recipe_json: _Optional[str] = ...) -> None: ...

class GetCompressionJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListCompressionJobsRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class ListCompressionJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[CompressionJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[CompressionJob, _Mapping]]] = ...) -> None: ...

class CancelCompressionJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class DeployRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "device_id", "variant_id", "threads", "rollback")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    device_id: str
    variant_id: str
    threads: int
    rollback: bool
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., device_id: _Optional[str] = ..., variant_id: _Optional[str] = ..., threads: _Optional[int] = ..., rollback: _Optional[bool] = ...) -> None: ...

class DeployResponse(_message.Message):
    __slots__ = ("device", "assignment")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    device: Device
    assignment: _agent_pb2.ModelAssignment
    def __init__(self, device: _Optional[_Union[Device, _Mapping]] = ..., assignment: _Optional[_Union[_agent_pb2.ModelAssignment, _Mapping]] = ...) -> None: ...

class ExplainSelectionRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "device_id", "budget_ms")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    device_id: str
    budget_ms: float
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., device_id: _Optional[str] = ..., budget_ms: _Optional[float] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("variant", "predicted_p50_ms", "predicted_p95_ms", "predicted_memory_bytes", "threads", "chosen", "reason", "basis", "ranked_accuracy")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_P50_MS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_P95_MS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BASIS_FIELD_NUMBER: _ClassVar[int]
    RANKED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    variant: Variant
    predicted_p50_ms: float
    predicted_p95_ms: float
    predicted_memory_bytes: int
    threads: int
    chosen: bool
    reason: str
    basis: str
    ranked_accuracy: float
    def __init__(self, variant: _Optional[_Union[Variant, _Mapping]] = ..., predicted_p50_ms: _Optional[float] = ..., predicted_p95_ms: _Optional[float] = ..., predicted_memory_bytes: _Optional[int] = ..., threads: _Optional[int] = ..., chosen: _Optional[bool] = ..., reason: _Optional[str] = ..., basis: _Optional[str] = ..., ranked_accuracy: _Optional[float] = ...) -> None: ...

class ExplainSelectionResponse(_message.Message):
    __slots__ = ("candidates", "hardware_class", "chosen_variant_id", "threads")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_CLASS_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    hardware_class: str
    chosen_variant_id: str
    threads: int
    def __init__(self, candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., hardware_class: _Optional[str] = ..., chosen_variant_id: _Optional[str] = ..., threads: _Optional[int] = ...) -> None: ...

class WaveDevice(_message.Message):
    __slots__ = ("device_id", "variant_id", "hardware_class", "state", "samples", "p95_ms", "error_rate", "errors", "baseline_p95_ms", "verdict", "note", "late", "previous_variant_id", "threads", "restored")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_CLASS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_P95_MS_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    variant_id: str
    hardware_class: str
    state: _common_pb2.ModelState
    samples: int
    p95_ms: float
    error_rate: float
    errors: int
    baseline_p95_ms: float
    verdict: str
    note: str
    late: bool
    previous_variant_id: str
    threads: int
    restored: bool
    def __init__(self, device_id: _Optional[str] = ..., variant_id: _Optional[str] = ..., hardware_class: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.ModelState, str]] = ..., samples: _Optional[int] = ..., p95_ms: _Optional[float] = ..., error_rate: _Optional[float] = ..., errors: _Optional[int] = ..., baseline_p95_ms: _Optional[float] = ..., verdict: _Optional[str] = ..., note: _Optional[str] = ..., late: _Optional[bool] = ..., previous_variant_id: _Optional[str] = ..., threads: _Optional[int] = ..., restored: _Optional[bool] = ...) -> None: ...

class Wave(_message.Message):
    __slots__ = ("index", "percent", "devices", "decision", "reason", "attempt", "started_at", "decided_at")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    index: int
    percent: int
    devices: _containers.RepeatedCompositeFieldContainer[WaveDevice]
    decision: WaveDecision
    reason: str
    attempt: int
    started_at: _timestamp_pb2.Timestamp
    decided_at: _timestamp_pb2.Timestamp
    def __init__(self, index: _Optional[int] = ..., percent: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[WaveDevice, _Mapping]]] = ..., decision: _Optional[_Union[WaveDecision, str]] = ..., reason: _Optional[str] = ..., attempt: _Optional[int] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("rollout_id", "model_name", "model_version", "target_labels", "target_hardware_class", "wave_percents", "budget_ms", "max_p95_regression_pct", "max_error_rate_pct", "state", "waves", "reason", "created_at", "updated_at", "min_samples", "max_rollbacks", "sample_timeout_seconds", "rollbacks", "stuck", "superseded_by", "current_wave", "started_at")
    class TargetLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_LABELS_FIELD_NUMBER: _ClassVar[int]
    TARGET_HARDWARE_CLASS_FIELD_NUMBER: _ClassVar[int]
    WAVE_PERCENTS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_P95_REGRESSION_PCT_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_PCT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WAVES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    MIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    STUCK_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_BY_FIELD_NUMBER: _ClassVar[int]
    CURRENT_WAVE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    model_name: str
    model_version: str
    target_labels: _containers.ScalarMap[str, str]
    target_hardware_class: str
    wave_percents: _containers.RepeatedScalarFieldContainer[int]
    budget_ms: float
    max_p95_regression_pct: float
    max_error_rate_pct: float
    state: RolloutState
    waves: _containers.RepeatedCompositeFieldContainer[Wave]
    reason: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    min_samples: int
    max_rollbacks: int
    sample_timeout_seconds: float
    rollbacks: int
    stuck: bool
    superseded_by: str
    current_wave: int
    started_at: _timestamp_pb2.Timestamp
    def __init__(self, rollout_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., target_labels: _Optional[_Mapping[str, str]] = ..., target_hardware_class: _Optional[str] = ..., wave_percents: _Optional[_Iterable[int]] = ..., budget_ms: _Optional[float] = ..., max_p95_regression_pct: _Optional[float] = ..., max_error_rate_pct: _Optional[float] = ..., state: _Optional[_Union[RolloutState, str]] = ..., waves: _Optional[_Iterable[_Union[Wave, _Mapping]]] = ..., reason: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., min_samples: _Optional[int] = ..., max_rollbacks: _Optional[int] = ..., sample_timeout_seconds: _Optional[float] = ..., rollbacks: _Optional[int] = ..., stuck: _Optional[bool] = ..., superseded_by: _Optional[str] = ..., current_wave: _Optional[int] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateRolloutRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "target_labels", "target_hardware_class", "wave_percents", "budget_ms", "max_p95_regression_pct", "max_error_rate_pct", "min_samples", "max_rollbacks", "sample_timeout_seconds")
    class TargetLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_LABELS_FIELD_NUMBER: _ClassVar[int]
    TARGET_HARDWARE_CLASS_FIELD_NUMBER: _ClassVar[int]
    WAVE_PERCENTS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_P95_REGRESSION_PCT_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_PCT_FIELD_NUMBER: _ClassVar[int]
    MIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    target_labels: _containers.ScalarMap[str, str]
    target_hardware_class: str
    wave_percents: _containers.RepeatedScalarFieldContainer[int]
    budget_ms: float
    max_p95_regression_pct: float
    max_error_rate_pct: float
    min_samples: int
    max_rollbacks: int
    sample_timeout_seconds: float
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., target_labels: _Optional[_Mapping[str, str]] = ..., target_hardware_class: _Optional[str] = ..., wave_percents: _Optional[_Iterable[int]] = ..., budget_ms: _Optional[float] = ..., max_p95_regression_pct: _Optional[float] = ..., max_error_rate_pct: _Optional[float] = ..., min_samples: _Optional[int] = ..., max_rollbacks: _Optional[int] = ..., sample_timeout_seconds: _Optional[float] = ...) -> None: ...

class GetRolloutRequest(_message.Message):
    __slots__ = ("rollout_id",)
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    def __init__(self, rollout_id: _Optional[str] = ...) -> None: ...

class ListRolloutsRequest(_message.Message):
    __slots__ = ("model_name", "states")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    states: _containers.RepeatedScalarFieldContainer[RolloutState]
    def __init__(self, model_name: _Optional[str] = ..., states: _Optional[_Iterable[_Union[RolloutState, str]]] = ...) -> None: ...

class ListRolloutsResponse(_message.Message):
    __slots__ = ("rollouts",)
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    rollouts: _containers.RepeatedCompositeFieldContainer[Rollout]
    def __init__(self, rollouts: _Optional[_Iterable[_Union[Rollout, _Mapping]]] = ...) -> None: ...

class UpdateRolloutRequest(_message.Message):
    __slots__ = ("rollout_id", "action")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    action: RolloutAction
    def __init__(self, rollout_id: _Optional[str] = ..., action: _Optional[_Union[RolloutAction, str]] = ...) -> None: ...

class QueryMetricsRequest(_message.Message):
    __slots__ = ("device_id", "model_name", "variant_id", "hardware_class", "start", "end", "group_by", "bucket_seconds", "include_sketch")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_CLASS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    BUCKET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SKETCH_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    model_name: str
    variant_id: str
    hardware_class: str
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    group_by: _containers.RepeatedScalarFieldContainer[str]
    bucket_seconds: int
    include_sketch: bool
    def __init__(self, device_id: _Optional[str] = ..., model_name: _Optional[str] = ..., variant_id: _Optional[str] = ..., hardware_class: _Optional[str] = ..., start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., group_by: _Optional[_Iterable[str]] = ..., bucket_seconds: _Optional[int] = ..., include_sketch: _Optional[bool] = ...) -> None: ...

class MetricRow(_message.Message):
    __slots__ = ("group", "inference_count", "error_count", "throughput_per_s", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "first_window", "last_window", "latency")
    class GroupEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    GROUP_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    ERROR_COUNT_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_PER_S_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    MEAN_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_WINDOW_FIELD_NUMBER: _ClassVar[int]
    LAST_WINDOW_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    group: _containers.ScalarMap[str, str]
    inference_count: int
    error_count: int
    throughput_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    first_window: _timestamp_pb2.Timestamp
    last_window: _timestamp_pb2.Timestamp
    latency: _common_pb2.LatencySketch
    def __init__(self, group: _Optional[_Mapping[str, str]] = ..., inference_count: _Optional[int] = ..., error_count: _Optional[int] = ..., throughput_per_s: _Optional[float] = ..., p50_ms: _Optional[float] = ..., p95_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., mean_ms: _Optional[float] = ..., first_window: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_window: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., latency: _Optional[_Union[_common_pb2.LatencySketch, _Mapping]] = ...) -> None: ...

class QueryMetricsResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[MetricRow]
    def __init__(self, rows: _Optional[_Iterable[_Union[MetricRow, _Mapping]]] = ...) -> None: ...

class CreateEnrollmentTokenRequest(_message.Message):
    __slots__ = ("device_id", "ttl_seconds")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    ttl_seconds: int
    def __init__(self, device_id: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class CreateEnrollmentTokenResponse(_message.Message):
    __slots__ = ("token", "device_id", "expires_at", "token_id", "created_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    token: str
    device_id: str
    expires_at: _timestamp_pb2.Timestamp
    token_id: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, token: _Optional[str] = ..., device_id: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., token_id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class EnrollmentToken(_message.Message):
    __slots__ = ("token_id", "device_id", "created_at", "expires_at", "used_at")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    USED_AT_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    device_id: str
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    used_at: _timestamp_pb2.Timestamp
    def __init__(self, token_id: _Optional[str] = ..., device_id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., used_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListEnrollmentTokensRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class ListEnrollmentTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[EnrollmentToken]
    def __init__(self, tokens: _Optional[_Iterable[_Union[EnrollmentToken, _Mapping]]] = ...) -> None: ...

class RevokeEnrollmentTokenRequest(_message.Message):
    __slots__ = ("token_id",)
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    def __init__(self, token_id: _Optional[str] = ...) -> None: ...

class RevokeDeviceRequest(_message.Message):
    __slots__ = ("device_id", "reason")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    reason: str
    def __init__(self, device_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeDeviceResponse(_message.Message):
    __slots__ = ("device_id", "stream_closed")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_CLOSED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    stream_closed: bool
    def __init__(self, device_id: _Optional[str] = ..., stream_closed: _Optional[bool] = ...) -> None: ...

class ApiToken(_message.Message):
    __slots__ = ("token_id", "name", "role", "created_at", "revoked_at")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    name: str
    role: str
    created_at: _timestamp_pb2.Timestamp
    revoked_at: _timestamp_pb2.Timestamp
    def __init__(self, token_id: _Optional[str] = ..., name: _Optional[str] = ..., role: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateApiTokenRequest(_message.Message):
    __slots__ = ("name", "role")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class CreateApiTokenResponse(_message.Message):
    __slots__ = ("token", "secret")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    token: ApiToken
    secret: str
    def __init__(self, token: _Optional[_Union[ApiToken, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class ListApiTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListApiTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[ApiToken]
    def __init__(self, tokens: _Optional[_Iterable[_Union[ApiToken, _Mapping]]] = ...) -> None: ...

class RevokeApiTokenRequest(_message.Message):
    __slots__ = ("token_id",)
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    def __init__(self, token_id: _Optional[str] = ...) -> None: ...

class SigningKeyInfo(_message.Message):
    __slots__ = ("key_id", "public_key", "created_at", "active", "trusted_by")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    TRUSTED_BY_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    public_key: bytes
    created_at: _timestamp_pb2.Timestamp
    active: bool
    trusted_by: int
    def __init__(self, key_id: _Optional[str] = ..., public_key: _Optional[bytes] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active: _Optional[bool] = ..., trusted_by: _Optional[int] = ...) -> None: ...

class ListSigningKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSigningKeysResponse(_message.Message):
    __slots__ = ("keys", "key_set_version", "devices", "behind")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    KEY_SET_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    BEHIND_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[SigningKeyInfo]
    key_set_version: int
    devices: int
    behind: _containers.RepeatedCompositeFieldContainer[DeviceKeys]
    def __init__(self, keys: _Optional[_Iterable[_Union[SigningKeyInfo, _Mapping]]] = ..., key_set_version: _Optional[int] = ..., devices: _Optional[int] = ..., behind: _Optional[_Iterable[_Union[DeviceKeys, _Mapping]]] = ...) -> None: ...

class DeviceKeys(_message.Message):
    __slots__ = ("device_id", "trusted_key_set_version", "trusted_key_ids", "last_seen")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TRUSTED_KEY_SET_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRUSTED_KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    trusted_key_set_version: int
    trusted_key_ids: _containers.RepeatedScalarFieldContainer[str]
    last_seen: _timestamp_pb2.Timestamp
    def __init__(self, device_id: _Optional[str] = ..., trusted_key_set_version: _Optional[int] = ..., trusted_key_ids: _Optional[_Iterable[str]] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RotateSigningKeyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RetireSigningKeyRequest(_message.Message):
    __slots__ = ("key_id", "force")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    force: bool
    def __init__(self, key_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("name", "version", "variant_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    variant_id: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., variant_id: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ("deleted_variant_ids", "removed_digests")
    DELETED_VARIANT_IDS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    deleted_variant_ids: _containers.RepeatedScalarFieldContainer[str]
    removed_digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted_variant_ids: _Optional[_Iterable[str]] = ..., removed_digests: _Optional[_Iterable[str]] = ...) -> None: ...

class RemoveDeviceRequest(_message.Message):
    __slots__ = ("device_id", "force")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    force: bool
    def __init__(self, device_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class RemoveDeviceResponse(_message.Message):
    __slots__ = ("device_id", "stream_closed", "rollout_ids", "removed_at")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_CLOSED_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_IDS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_AT_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    stream_closed: bool
    rollout_ids: _containers.RepeatedScalarFieldContainer[str]
    removed_at: _timestamp_pb2.Timestamp
    def __init__(self, device_id: _Optional[str] = ..., stream_closed: _Optional[bool] = ..., rollout_ids: _Optional[_Iterable[str]] = ..., removed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
