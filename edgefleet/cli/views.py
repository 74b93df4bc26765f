"""Plain, JSON-ready views of API messages, and their rendering as tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet.common.models import FORMATS, PRECISIONS
from edgefleet.common.serde import DEVICE_STATUS_NAMES, MODEL_STATE_NAMES
from edgefleet.v1 import agent_pb2, common_pb2, operator_pb2


def _name(value: int, names: Sequence[str]) -> str:
    return names[value - 1] if 1 <= value <= len(names) else "unknown"


def iso_time(value: Timestamp) -> str | None:
    """Return value as ISO 8601 in UTC to the second (2026-12-04T21:08:38+00:00), or None when unset."""
    if value.seconds == 0 and value.nanos == 0:
        return None
    return value.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")


def _number(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)


def model_status_view(status: agent_pb2.ModelStatus) -> dict[str, Any]:
    return {
        "model": status.model_name,
        "version": status.model_version,
        "variant_id": status.variant_id,
        "state": _name(status.state, MODEL_STATE_NAMES),
        "error": status.error,
        "runtime": status.runtime,
        "providers": list(status.providers),
        "threads": status.threads,
        "bytes_downloaded": status.bytes_downloaded,
        "size_bytes": status.size_bytes,
        "updated_at": iso_time(status.updated_at),
    }


def device_view(device: operator_pb2.Device) -> dict[str, Any]:
    """Return the device's view. Each model has "current": false unless the device is online.

    A stale or offline device's model states are its last report, which held when the device was last
    seen ("last_seen"), so they do not say that the model serves now.
    """
    hardware = device.hardware
    status = _name(device.status, DEVICE_STATUS_NAMES)
    return {
        "device_id": device.device_id,
        "status": status,
        "revoked": device.revoked,
        "profile": hardware.profile_name,
        "hardware_class": hardware.hardware_class,
        "architecture": hardware.architecture,
        "cpu_model": hardware.cpu_model,
        "usable_cores": hardware.usable_cores,
        "logical_cores": hardware.logical_cores,
        "memory_bytes": hardware.memory_total_bytes,
        "memory_available_bytes": hardware.memory_available_bytes,
        "disk_free_bytes": hardware.disk_free_bytes,
        "cpu_features": list(hardware.cpu_features),
        "accelerators": [
            {
                "kind": _name(a.kind, ("gpu", "npu", "dsp")),
                "vendor": a.vendor,
                "name": a.name,
                "device_path": a.device_path,
            }
            for a in hardware.accelerators
        ],
        "runtimes": [{"name": r.name, "version": r.version, "providers": list(r.providers)} for r in hardware.runtimes],
        "os": hardware.os,
        "kernel": hardware.kernel,
        "labels": dict(device.labels),
        "agent_version": device.agent_version,
        "registered_at": iso_time(device.registered_at),
        "last_seen": iso_time(device.last_seen),
        "desired_generation": device.desired_generation,
        "reported_generation": device.reported_generation,
        "clock_skew_seconds": round(device.clock_skew_seconds, 3),
        "clock_skewed": device.clock_skewed,
        "models": [{**model_status_view(m), "current": status == "online"} for m in device.models],
        "desired": [
            {
                "model": a.model_name,
                "version": a.model_version,
                "variant_id": a.variant_id,
                "digest": a.digest,
            }
            for a in device.desired
        ],
        "identity_conflicts": [
            {
                "instance_key_fingerprint": c.instance_key_fingerprint,
                "peer": c.peer,
                "seen_at": iso_time(c.seen_at),
            }
            for c in device.identity_conflicts
        ],
        "profile_revisions": device.profile_revisions,
        "trusted_keys": {"version": device.trusted_key_set_version, "key_ids": list(device.trusted_key_ids)}
        if device.trusted_key_set_version
        else None,
    }


def tensor_view(tensor: common_pb2.TensorSpec) -> dict[str, Any]:
    view: dict[str, Any] = {"name": tensor.name, "dtype": tensor.dtype, "shape": list(tensor.shape)}
    if tensor.scale:
        view["scale"] = tensor.scale
        view["zero_point"] = tensor.zero_point
    return view


def variant_view(variant: operator_pb2.Variant) -> dict[str, Any]:
    metadata = variant.metadata
    # Source p50 over variant p50, by "threads=N": above 1 the variant ran faster in its gate.
    speedups = {
        key: source_ms / variant.latency_ms[key]
        for key, source_ms in variant.source_latency_ms.items()
        if variant.latency_ms.get(key, 0.0) > 0.0
    }
    return {
        "variant_id": variant.variant_id,
        "kind": variant.kind,
        "format": _name(variant.format, FORMATS),
        "precision": _name(variant.precision, PRECISIONS),
        "status": variant.status,
        "rejection_reason": variant.rejection_reason,
        "digest": variant.digest,
        "size_bytes": variant.size_bytes,
        "macs": metadata.macs,
        "parameters": metadata.parameters,
        "peak_activation_bytes": metadata.peak_activation_bytes,
        "opset": metadata.opset,
        "min_runtime_version": metadata.min_runtime_version,
        "accuracy": _number(variant.accuracy),
        "accuracy_metric": variant.accuracy_metric,
        "accuracy_drop": _number(variant.accuracy_drop),
        "evaluation_samples": variant.evaluation_samples or None,
        "evaluation_digest": variant.evaluation_digest,
        "latency_ms": dict(variant.latency_ms),
        "source_latency_ms": dict(variant.source_latency_ms),
        "speedup": speedups,
        # None when the gate kept no source figure, so nothing was compared.
        "slower_than_source": any(value < 1.0 for value in speedups.values()) if speedups else None,
        "parent_variant_id": variant.parent_variant_id,
    }


def model_view(model: operator_pb2.Model) -> dict[str, Any]:
    metadata = model.metadata
    return {
        "name": model.name,
        "version": model.version,
        "digest": model.digest,
        "size_bytes": model.size_bytes,
        "format": _name(metadata.format, FORMATS),
        "opset": metadata.opset,
        "parameters": metadata.parameters,
        "macs": metadata.macs,
        "macs_by_op_type": dict(metadata.macs_by_op_type),
        "peak_activation_bytes": metadata.peak_activation_bytes,
        "precision": _name(metadata.precision, PRECISIONS),
        "layers": metadata.layers,
        "inputs": [tensor_view(t) for t in metadata.inputs],
        "outputs": [tensor_view(t) for t in metadata.outputs],
        "created_at": iso_time(model.created_at),
        "variants": [variant_view(v) for v in model.variants],
    }


def metric_row_view(row: operator_pb2.MetricRow) -> dict[str, Any]:
    return {
        **dict(row.group),
        "inferences": row.inference_count,
        "errors": row.error_count,
        "throughput_per_s": _number(row.throughput_per_s),
        "p50_ms": _number(row.p50_ms),
        "p95_ms": _number(row.p95_ms),
        "p99_ms": _number(row.p99_ms),
        "mean_ms": _number(row.mean_ms),
        "first_window": iso_time(row.first_window),
        "last_window": iso_time(row.last_window),
    }


def human_count(value: int, millions_digits: int = 1) -> str:
    """Format a MAC or parameter count: 385.2M from a million on, 17.0K from a thousand, else the number."""
    if value >= 1_000_000:
        return f"{value / 1e6:.{millions_digits}f}M"
    if value >= 1_000:
        return f"{value / 1e3:.1f}K"
    return str(value)


def age(iso: str | None, now: datetime | None = None) -> str:
    if iso is None:
        return "never"
    seconds = ((now or datetime.now(UTC)) - datetime.fromisoformat(iso)).total_seconds()
    if seconds < 90:
        return f"{max(seconds, 0):.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def clock_skew_text(device: dict[str, Any]) -> str:
    """Return how far the device clock runs ahead of or behind the orchestrator's: "125 s behind the orchestrator"."""
    skew = device["clock_skew_seconds"]
    return f"{abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the orchestrator"


def last_report_note(device: dict[str, Any]) -> str:
    """Return " (last seen AGE)" for a device view whose model states are its last report, else ""."""
    if device["status"] == "online":
        return ""
    return f" (last seen {age(device['last_seen'])})"


def shorten(text: str, width: int) -> str:
    """Return text on one line, cut to width characters and ending in "..." when it was cut.

    Runs of whitespace, newlines included, become one space, so a multi-line error keeps a table's
    rows apart. `show` commands print the text whole.
    """
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 3] + "..."


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Render rows as a left-aligned text table with a header line."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]
    return "\n".join(lines)
