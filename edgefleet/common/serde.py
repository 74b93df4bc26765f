"""Conversions between protobuf messages and the shared domain types; nothing deeper sees _pb2."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet.common.hardware import ACCELERATOR_KINDS, Accelerator, HardwareProfile, RuntimeInfo
from edgefleet.common.models import FORMATS, PRECISIONS, ModelMetadata, TensorSpec
from edgefleet.v1 import common_pb2 as pb

# Enum values are the list position + 1, because 0 is UNSPECIFIED in every enum of the API.
MODEL_STATE_NAMES = ("pending", "downloading", "verifying", "loading", "serving", "failed", "removed")
DEVICE_STATUS_NAMES = ("online", "stale", "offline")


# Times that metric queries accept. The upper bound leaves room below datetime.max for the window
# lengths and buckets that queries add to a time.
MIN_QUERY_TIME = datetime(1970, 1, 1, tzinfo=UTC)
MAX_QUERY_TIME = datetime(9999, 1, 1, tzinfo=UTC)


def enum_to_name(value: int, names: tuple[str, ...], field: str) -> str:
    """Map an API enum value to its domain name; raise ValueError for UNSPECIFIED or unknown values."""
    if 1 <= value <= len(names):
        return names[value - 1]
    allowed = ", ".join(names)
    raise ValueError(f"{field} has unknown or unspecified value {value}; allowed: {allowed}")


def name_to_enum(name: str, names: tuple[str, ...]) -> Any:
    """Map a domain name to its API enum value, 0 (UNSPECIFIED) when empty or unknown.

    The value is a plain int; Any matches the enum wrapper types of the generated stubs.
    """
    return names.index(name) + 1 if name in names else 0


def format_to_proto(name: str) -> Any:
    return name_to_enum(name, FORMATS)


def format_from_proto(value: int) -> str:
    return enum_to_name(value, FORMATS, "format")


def timestamp(value: datetime | None) -> Timestamp:
    message = Timestamp()
    if value is not None:
        message.FromDatetime(value.astimezone(UTC))
    return message


def from_timestamp(message: Timestamp) -> datetime | None:
    """Return an aware UTC datetime, or None for an unset (zero) timestamp."""
    if message.seconds == 0 and message.nanos == 0:
        return None
    return message.ToDatetime(tzinfo=UTC)


def hardware_to_proto(profile: HardwareProfile) -> pb.HardwareProfile:
    return pb.HardwareProfile(
        cpu_model=profile.cpu_model,
        architecture=profile.architecture,
        logical_cores=profile.logical_cores,
        usable_cores=profile.usable_cores,
        cpu_features=list(profile.cpu_features),
        memory_total_bytes=profile.memory_total_bytes,
        memory_available_bytes=profile.memory_available_bytes,
        disk_free_bytes=profile.disk_free_bytes,
        accelerators=[
            pb.Accelerator(
                kind=name_to_enum(a.kind, ACCELERATOR_KINDS),
                vendor=a.vendor,
                name=a.name,
                device_path=a.device_path,
                pci_address=a.pci_address,
                driver=a.driver,
                memory_bytes=a.memory_bytes,
                source=a.source,
            )
            for a in profile.accelerators
        ],
        runtimes=[
            pb.Runtime(name=r.name, version=r.version, providers=list(r.providers), package=r.package)
            for r in profile.runtimes
        ],
        os=profile.os,
        kernel=profile.kernel,
        profile_name=profile.profile_name,
        hardware_class=profile.hardware_class,
    )


def hardware_from_proto(message: pb.HardwareProfile) -> HardwareProfile:
    """Convert a reported profile; raise ValueError naming the field for an unknown accelerator kind."""
    accelerators = tuple(
        Accelerator(
            kind=enum_to_name(a.kind, ACCELERATOR_KINDS, f"hardware.accelerators[{i}].kind"),
            vendor=a.vendor,
            name=a.name,
            device_path=a.device_path,
            pci_address=a.pci_address,
            driver=a.driver,
            memory_bytes=a.memory_bytes,
            source=a.source,
        )
        for i, a in enumerate(message.accelerators)
    )
    return HardwareProfile(
        cpu_model=message.cpu_model,
        architecture=message.architecture,
        logical_cores=message.logical_cores,
        usable_cores=message.usable_cores,
        cpu_features=tuple(message.cpu_features),
        memory_total_bytes=message.memory_total_bytes,
        memory_available_bytes=message.memory_available_bytes,
        disk_free_bytes=message.disk_free_bytes,
        accelerators=accelerators,
        runtimes=tuple(RuntimeInfo(r.name, r.version, tuple(r.providers), r.package) for r in message.runtimes),
        os=message.os,
        kernel=message.kernel,
        profile_name=message.profile_name,
        hardware_class=message.hardware_class,
    )


def tensor_to_proto(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(
        name=spec.name,
        dtype=spec.dtype,
        shape=list(spec.shape),
        dim_names=list(spec.dim_names),
        scale=spec.scale,
        zero_point=spec.zero_point,
    )


def tensor_from_proto(message: pb.TensorSpec) -> TensorSpec:
    return TensorSpec(
        name=message.name,
        dtype=message.dtype,
        shape=tuple(message.shape),
        dim_names=tuple(message.dim_names),
        scale=message.scale,
        zero_point=message.zero_point,
    )


def metadata_to_proto(metadata: ModelMetadata) -> pb.ModelMetadata:
    return pb.ModelMetadata(
        format=format_to_proto(metadata.format),
        inputs=[tensor_to_proto(t) for t in metadata.inputs],
        outputs=[tensor_to_proto(t) for t in metadata.outputs],
        opset=metadata.opset,
        parameters=metadata.parameters,
        macs=metadata.macs,
        peak_activation_bytes=metadata.peak_activation_bytes,
        macs_by_op_type=dict(metadata.macs_by_op_type),
        precision=name_to_enum(metadata.precision, PRECISIONS),
        layers=metadata.layers,
        min_runtime_version=metadata.min_runtime_version,
    )


def metadata_from_proto(message: pb.ModelMetadata) -> ModelMetadata:
    return ModelMetadata(
        format=format_from_proto(message.format),
        inputs=tuple(tensor_from_proto(t) for t in message.inputs),
        outputs=tuple(tensor_from_proto(t) for t in message.outputs),
        opset=message.opset,
        parameters=message.parameters,
        macs=message.macs,
        peak_activation_bytes=message.peak_activation_bytes,
        macs_by_op_type=dict(message.macs_by_op_type),
        precision=enum_to_name(message.precision, PRECISIONS, "precision") if message.precision else "fp32",
        layers=message.layers,
        min_runtime_version=message.min_runtime_version,
    )
