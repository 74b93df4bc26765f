import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_STATUS_UNSPECIFIED: _ClassVar[DeviceStatus]
    DEVICE_STATUS_ONLINE: _ClassVar[DeviceStatus]
    DEVICE_STATUS_STALE: _ClassVar[DeviceStatus]
    DEVICE_STATUS_OFFLINE: _ClassVar[DeviceStatus]

class AcceleratorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCELERATOR_KIND_UNSPECIFIED: _ClassVar[AcceleratorKind]
    ACCELERATOR_KIND_GPU: _ClassVar[AcceleratorKind]
    ACCELERATOR_KIND_NPU: _ClassVar[AcceleratorKind]
    ACCELERATOR_KIND_DSP: _ClassVar[AcceleratorKind]

class ModelFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_FORMAT_UNSPECIFIED: _ClassVar[ModelFormat]
    MODEL_FORMAT_ONNX: _ClassVar[ModelFormat]
    MODEL_FORMAT_TFLITE: _ClassVar[ModelFormat]

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_FP32: _ClassVar[Precision]
    PRECISION_FP16: _ClassVar[Precision]
    PRECISION_INT8: _ClassVar[Precision]

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_PENDING: _ClassVar[ModelState]
    MODEL_STATE_DOWNLOADING: _ClassVar[ModelState]
    MODEL_STATE_VERIFYING: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_SERVING: _ClassVar[ModelState]
    MODEL_STATE_FAILED: _ClassVar[ModelState]
    MODEL_STATE_REMOVED: _ClassVar[ModelState]
DEVICE_STATUS_UNSPECIFIED: DeviceStatus
DEVICE_STATUS_ONLINE: DeviceStatus
DEVICE_STATUS_STALE: DeviceStatus
DEVICE_STATUS_OFFLINE: DeviceStatus
ACCELERATOR_KIND_UNSPECIFIED: AcceleratorKind
ACCELERATOR_KIND_GPU: AcceleratorKind
ACCELERATOR_KIND_NPU: AcceleratorKind
ACCELERATOR_KIND_DSP: AcceleratorKind
MODEL_FORMAT_UNSPECIFIED: ModelFormat
MODEL_FORMAT_ONNX: ModelFormat
MODEL_FORMAT_TFLITE: ModelFormat
PRECISION_UNSPECIFIED: Precision
PRECISION_FP32: Precision
PRECISION_FP16: Precision
PRECISION_INT8: Precision
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_PENDING: ModelState
MODEL_STATE_DOWNLOADING: ModelState
MODEL_STATE_VERIFYING: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_SERVING: ModelState
MODEL_STATE_FAILED: ModelState
MODEL_STATE_REMOVED: ModelState

class Accelerator(_message.Message):
    __slots__ = ("kind", "vendor", "name", "device_path", "pci_address", "driver", "memory_bytes", "source")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VENDOR_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_PATH_FIELD_NUMBER: _ClassVar[int]
    PCI_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    kind: AcceleratorKind
    vendor: str
    name: str
    device_path: str
    pci_address: str
    driver: str
    memory_bytes: int
    source: str
    def __init__(self, kind: _Optional[_Union[AcceleratorKind, str]] = ..., vendor: _Optional[str] = ..., name: _Optional[str] = ..., device_path: _Optional[str] = ..., pci_address: _Optional[str] = ..., driver: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class Runtime(_message.Message):
    __slots__ = ("name", "version", "providers", "package")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    package: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., package: _Optional[str] = ...) -> None: ...

class HardwareProfile(_message.Message):
    __slots__ = ("cpu_model", "architecture", "logical_cores", "usable_cores", "cpu_features", "memory_total_bytes", "memory_available_bytes", "disk_free_bytes", "accelerators", "runtimes", "os", "kernel", "profile_name", "hardware_class")
    CPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_CORES_FIELD_NUMBER: _ClassVar[int]
    USABLE_CORES_FIELD_NUMBER: _ClassVar[int]
    CPU_FEATURES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACCELERATORS_FIELD_NUMBER: _ClassVar[int]
    RUNTIMES_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    PROFILE_NAME_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_CLASS_FIELD_NUMBER: _ClassVar[int]
    cpu_model: str
    architecture: str
    logical_cores: int
    usable_cores: float
    cpu_features: _containers.RepeatedScalarFieldContainer[str]
    memory_total_bytes: int
    memory_available_bytes: int
    disk_free_bytes: int
    accelerators: _containers.RepeatedCompositeFieldContainer[Accelerator]
    runtimes: _containers.RepeatedCompositeFieldContainer[Runtime]
    os: str
    kernel: str
    profile_name: str
    hardware_class: str
    def __init__(self, cpu_model: _Optional[str] = ..., architecture: _Optional[str] = ..., logical_cores: _Optional[int] = ..., usable_cores: _Optional[float] = ..., cpu_features: _Optional[_Iterable[str]] = ..., memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., disk_free_bytes: _Optional[int] = ..., accelerators: _Optional[_Iterable[_Union[Accelerator, _Mapping]]] = ..., runtimes: _Optional[_Iterable[_Union[Runtime, _Mapping]]] = ..., os: _Optional[str] = ..., kernel: _Optional[str] = ..., profile_name: _Optional[str] = ..., hardware_class: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "dim_names", "scale", "zero_point")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DIM_NAMES_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ZERO_POINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dim_names: _containers.RepeatedScalarFieldContainer[str]
    scale: float
    zero_point: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dim_names: _Optional[_Iterable[str]] = ..., scale: _Optional[float] = ..., zero_point: _Optional[int] = ...) -> None: ...

class ModelMetadata(_message.Message):
    __slots__ = ("format", "inputs", "outputs", "opset", "parameters", "macs", "peak_activation_bytes", "macs_by_op_type", "precision", "layers", "min_runtime_version")
    class MacsByOpTypeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    OPSET_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MACS_FIELD_NUMBER: _ClassVar[int]
    PEAK_ACTIVATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    MACS_BY_OP_TYPE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MIN_RUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    format: ModelFormat
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    opset: int
    parameters: int
    macs: int
    peak_activation_bytes: int
    macs_by_op_type: _containers.ScalarMap[str, int]
    precision: Precision
    layers: int
    min_runtime_version: str
    def __init__(self, format: _Optional[_Union[ModelFormat, str]] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., opset: _Optional[int] = ..., parameters: _Optional[int] = ..., macs: _Optional[int] = ..., peak_activation_bytes: _Optional[int] = ..., macs_by_op_type: _Optional[_Mapping[str, int]] = ..., precision: _Optional[_Union[Precision, str]] = ..., layers: _Optional[int] = ..., min_runtime_version: _Optional[str] = ...) -> None: ...

class LatencySketch(_message.Message):
    __slots__ = ("relative_accuracy", "bucket_offset", "counts", "zero_count", "count", "sum_ms", "min_ms", "max_ms")
    RELATIVE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    BUCKET_OFFSET_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    ZERO_COUNT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUM_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MS_FIELD_NUMBER: _ClassVar[int]
    relative_accuracy: float
    bucket_offset: int
    counts: _containers.RepeatedScalarFieldContainer[int]
    zero_count: int
    count: int
    sum_ms: float
    min_ms: float
    max_ms: float
    def __init__(self, relative_accuracy: _Optional[float] = ..., bucket_offset: _Optional[int] = ..., counts: _Optional[_Iterable[int]] = ..., zero_count: _Optional[int] = ..., count: _Optional[int] = ..., sum_ms: _Optional[float] = ..., min_ms: _Optional[float] = ..., max_ms: _Optional[float] = ...) -> None: ...

class MetricWindow(_message.Message):
    __slots__ = ("model_name", "model_version", "variant_id", "window_start", "window_seconds", "inference_count", "error_count", "latency")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    ERROR_COUNT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    variant_id: str
    window_start: _timestamp_pb2.Timestamp
    window_seconds: int
    inference_count: int
    error_count: int
    latency: LatencySketch
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., variant_id: _Optional[str] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_seconds: _Optional[int] = ..., inference_count: _Optional[int] = ..., error_count: _Optional[int] = ..., latency: _Optional[_Union[LatencySketch, _Mapping]] = ...) -> None: ...

class Page(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...
