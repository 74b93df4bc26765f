import datetime

from edgefleet.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("device_id", "instance_key", "hardware", "labels", "agent_version", "enrollment_token")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_KEY_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    instance_key: str
    hardware: _common_pb2.HardwareProfile
    labels: _containers.ScalarMap[str, str]
    agent_version: str
    enrollment_token: str
    def __init__(self, device_id: _Optional[str] = ..., instance_key: _Optional[str] = ..., hardware: _Optional[_Union[_common_pb2.HardwareProfile, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., agent_version: _Optional[str] = ..., enrollment_token: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("device_id", "heartbeat_interval_seconds", "server_time", "trusted_keys")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    TRUSTED_KEYS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    heartbeat_interval_seconds: int
    server_time: _timestamp_pb2.Timestamp
    trusted_keys: TrustedKeys
    def __init__(self, device_id: _Optional[str] = ..., heartbeat_interval_seconds: _Optional[int] = ..., server_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., trusted_keys: _Optional[_Union[TrustedKeys, _Mapping]] = ...) -> None: ...

class SigningKey(_message.Message):
    __slots__ = ("key_id", "public_key")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    public_key: bytes
    def __init__(self, key_id: _Optional[str] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class KeySignature(_message.Message):
    __slots__ = ("key_id", "signature")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    signature: bytes
    def __init__(self, key_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class TrustedKeys(_message.Message):
    __slots__ = ("version", "keys", "signatures")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    version: int
    keys: _containers.RepeatedCompositeFieldContainer[SigningKey]
    signatures: _containers.RepeatedCompositeFieldContainer[KeySignature]
    def __init__(self, version: _Optional[int] = ..., keys: _Optional[_Iterable[_Union[SigningKey, _Mapping]]] = ..., signatures: _Optional[_Iterable[_Union[KeySignature, _Mapping]]] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "reported_state", "ack", "benchmark")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    REPORTED_STATE_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    BENCHMARK_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    reported_state: ReportedState
    ack: CommandAck
    benchmark: BenchmarkReport
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., reported_state: _Optional[_Union[ReportedState, _Mapping]] = ..., ack: _Optional[_Union[CommandAck, _Mapping]] = ..., benchmark: _Optional[_Union[BenchmarkReport, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("device_id", "instance_key", "desired_generation")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_KEY_FIELD_NUMBER: _ClassVar[int]
    DESIRED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    instance_key: str
    desired_generation: int
    def __init__(self, device_id: _Optional[str] = ..., instance_key: _Optional[str] = ..., desired_generation: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sequence", "sent_at", "disk_free_bytes")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    sent_at: _timestamp_pb2.Timestamp
    disk_free_bytes: int
    def __init__(self, sequence: _Optional[int] = ..., sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., disk_free_bytes: _Optional[int] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("model_name", "model_version", "variant_id", "digest", "state", "error", "runtime", "providers", "threads", "bytes_downloaded", "size_bytes", "updated_at")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWNLOADED_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    variant_id: str
    digest: str
    state: _common_pb2.ModelState
    error: str
    runtime: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    threads: int
    bytes_downloaded: int
    size_bytes: int
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., variant_id: _Optional[str] = ..., digest: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.ModelState, str]] = ..., error: _Optional[str] = ..., runtime: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., threads: _Optional[int] = ..., bytes_downloaded: _Optional[int] = ..., size_bytes: _Optional[int] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReportedState(_message.Message):
    __slots__ = ("desired_generation", "models", "trusted_keys")
    DESIRED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    TRUSTED_KEYS_FIELD_NUMBER: _ClassVar[int]
    desired_generation: int
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    trusted_keys: TrustedKeysReport
    def __init__(self, desired_generation: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., trusted_keys: _Optional[_Union[TrustedKeysReport, _Mapping]] = ...) -> None: ...

class TrustedKeysReport(_message.Message):
    __slots__ = ("version", "key_ids")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., key_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class CommandAck(_message.Message):
    __slots__ = ("command_id", "ok", "error")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    ok: bool
    error: str
    def __init__(self, command_id: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class BenchmarkReport(_message.Message):
    __slots__ = ("variant_id", "runtime", "by_threads")
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    BY_THREADS_FIELD_NUMBER: _ClassVar[int]
    variant_id: str
    runtime: str
    by_threads: _containers.RepeatedCompositeFieldContainer[ThreadLatency]
    def __init__(self, variant_id: _Optional[str] = ..., runtime: _Optional[str] = ..., by_threads: _Optional[_Iterable[_Union[ThreadLatency, _Mapping]]] = ...) -> None: ...

class ThreadLatency(_message.Message):
    __slots__ = ("threads", "p50_ms", "p95_ms", "runs")
    THREADS_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    threads: int
    p50_ms: float
    p95_ms: float
    runs: int
    def __init__(self, threads: _Optional[int] = ..., p50_ms: _Optional[float] = ..., p95_ms: _Optional[float] = ..., runs: _Optional[int] = ...) -> None: ...

class ModelAssignment(_message.Message):
    __slots__ = ("model_name", "model_version", "variant_id", "digest", "size_bytes", "format", "threads", "signature", "version_counter", "signing_key_id", "rollback")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    VERSION_COUNTER_FIELD_NUMBER: _ClassVar[int]
    SIGNING_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    variant_id: str
    digest: str
    size_bytes: int
    format: _common_pb2.ModelFormat
    threads: int
    signature: bytes
    version_counter: int
    signing_key_id: str
    rollback: bool
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., variant_id: _Optional[str] = ..., digest: _Optional[str] = ..., size_bytes: _Optional[int] = ..., format: _Optional[_Union[_common_pb2.ModelFormat, str]] = ..., threads: _Optional[int] = ..., signature: _Optional[bytes] = ..., version_counter: _Optional[int] = ..., signing_key_id: _Optional[str] = ..., rollback: _Optional[bool] = ...) -> None: ...

class DesiredState(_message.Message):
    __slots__ = ("generation", "models", "trusted_keys")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    TRUSTED_KEYS_FIELD_NUMBER: _ClassVar[int]
    generation: int
    models: _containers.RepeatedCompositeFieldContainer[ModelAssignment]
    trusted_keys: TrustedKeys
    def __init__(self, generation: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelAssignment, _Mapping]]] = ..., trusted_keys: _Optional[_Union[TrustedKeys, _Mapping]] = ...) -> None: ...

class RunBenchmark(_message.Message):
    __slots__ = ("variant_id", "max_threads", "runs")
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_THREADS_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    variant_id: str
    max_threads: int
    runs: int
    def __init__(self, variant_id: _Optional[str] = ..., max_threads: _Optional[int] = ..., runs: _Optional[int] = ...) -> None: ...

class OrchestratorMessage(_message.Message):
    __slots__ = ("command_id", "desired_state", "run_benchmark", "heartbeat_ack")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    DESIRED_STATE_FIELD_NUMBER: _ClassVar[int]
    RUN_BENCHMARK_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_ACK_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    desired_state: DesiredState
    run_benchmark: RunBenchmark
    heartbeat_ack: HeartbeatAck
    def __init__(self, command_id: _Optional[str] = ..., desired_state: _Optional[_Union[DesiredState, _Mapping]] = ..., run_benchmark: _Optional[_Union[RunBenchmark, _Mapping]] = ..., heartbeat_ack: _Optional[_Union[HeartbeatAck, _Mapping]] = ...) -> None: ...

class HeartbeatAck(_message.Message):
    __slots__ = ("sequence", "server_time")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    server_time: _timestamp_pb2.Timestamp
    def __init__(self, sequence: _Optional[int] = ..., server_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DownloadArtifactRequest(_message.Message):
    __slots__ = ("device_id", "digest", "offset", "chunk_size")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    digest: str
    offset: int
    chunk_size: int
    def __init__(self, device_id: _Optional[str] = ..., digest: _Optional[str] = ..., offset: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("offset", "data", "chunk_sha256", "total_size")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    chunk_sha256: str
    total_size: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., chunk_sha256: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class UploadMetricsRequest(_message.Message):
    __slots__ = ("device_id", "batch_id", "windows")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    batch_id: str
    windows: _containers.RepeatedCompositeFieldContainer[_common_pb2.MetricWindow]
    def __init__(self, device_id: _Optional[str] = ..., batch_id: _Optional[str] = ..., windows: _Optional[_Iterable[_Union[_common_pb2.MetricWindow, _Mapping]]] = ...) -> None: ...

class UploadMetricsResponse(_message.Message):
    __slots__ = ("accepted", "duplicate")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicate: bool
    def __init__(self, accepted: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...
