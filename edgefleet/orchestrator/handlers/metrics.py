"""Metric windows from devices, and latency queries that merge their sketches."""

from __future__ import annotations

import contextlib
import logging
import math
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet.common.errors import InvalidArgument, NotFound, ResourceExhausted
from edgefleet.common.logs import MeasurementLog
from edgefleet.common.serde import MAX_QUERY_TIME, MIN_QUERY_TIME, from_timestamp, timestamp
from edgefleet.common.sketch import DEFAULT_RELATIVE_ACCURACY, LatencySketch
from edgefleet.orchestrator import validation
from edgefleet.orchestrator.domain import MetricWindow
from edgefleet.orchestrator.handlers.devices import DEVICES_LISTING, MODELS_LISTING, reject_if_removed, suggest
from edgefleet.orchestrator.state import OrchestratorState
from edgefleet.orchestrator.store.base import NotFoundError, Store
from edgefleet.v1 import agent_pb2, common_pb2, operator_pb2

log = logging.getLogger(__name__)

MAX_WINDOWS_PER_BATCH = 1000
MAX_WINDOW_SECONDS = 3600
GROUP_KEYS = ("device", "model", "variant", "hardware_class")
MAX_BUCKETS = 10_000
# The CLI command that lists the hardware classes that have latency windows.
HARDWARE_CLASSES_LISTING = "edgefleet metrics query --group-by hardware_class"
# A device clock this far from the orchestrator's is logged with the upload.
CLOCK_SKEW_WARNING = timedelta(minutes=5)


def upload_metrics(
    request: agent_pb2.UploadMetricsRequest, state: OrchestratorState
) -> agent_pb2.UploadMetricsResponse:
    """Validate and store one batch of windows; a batch id seen before stores nothing."""
    validation.check_device_id(request.device_id)
    if not request.batch_id or len(request.batch_id) > 64:
        raise InvalidArgument("batch_id", "must be 1-64 characters; the agent makes one per batch")
    state.limits.metric_uploads.acquire(request.device_id, f"metric uploads of device {request.device_id!r}")
    if len(request.windows) > MAX_WINDOWS_PER_BATCH:
        raise ResourceExhausted(
            f"batch has {len(request.windows)} windows; at most {MAX_WINDOWS_PER_BATCH} per batch, split it"
        )
    device = state.store.get_device(request.device_id)
    if device is None:
        reject_if_removed(request.device_id, state)
        raise NotFound(f"device {request.device_id!r} is not registered; register before uploading metrics")
    received_at = datetime.now(UTC)
    windows = [
        _window_from_proto(device.device_id, device.hardware.hardware_class, w, i, received_at)
        for i, w in enumerate(request.windows)
    ]
    stored = state.store.add_metric_batch(device.device_id, request.batch_id, windows)
    state.telemetry.metric_batches.labels("stored" if stored else "duplicate").inc()
    if stored:
        state.telemetry.metric_windows.inc(len(windows))
        state.telemetry.inferences_reported.inc(sum(w.inference_count for w in windows))
    if stored and windows:
        _log_window_times(device.device_id, request.batch_id, windows, received_at)
    return agent_pb2.UploadMetricsResponse(accepted=len(windows) if stored else 0, duplicate=not stored)


# Logs a device's apparent clock offset the first time, when it moves by over 2 minutes or 10 %, and
# every 5 minutes while it stays. A skewed device uploads every few seconds, so the batches in between
# log at debug level. Keys stay for the process's lifetime: two per device that ever showed an offset.
_window_time_log = MeasurementLog(log, absolute_tolerance=120.0, relative_tolerance=0.1, interval_s=300.0)


def _log_window_times(device_id: str, batch_id: str, windows: list[MetricWindow], received_at: datetime) -> None:
    """Log a batch with a window that starts after its receipt, or one that ended long before it.

    Only a clock that is ahead explains a window from the future. An old window is normal for an
    agent that buffered its windows while the orchestrator was unreachable, so it is no warning.
    Repeats of either line for a device go to debug level, as _window_time_log describes.
    """
    ahead = max(window.window_start - received_at for window in windows)
    if ahead > CLOCK_SKEW_WARNING:
        _window_time_log.log(
            (device_id, "ahead"),
            ahead.total_seconds(),
            logging.WARNING,
            "device_id=%s clock looks ahead by about %.0f s: batch %s has a window that starts after its receipt; "
            "stored with both device and receive times",
            device_id,
            ahead.total_seconds(),
            batch_id,
        )
    late = max(received_at - window.window_start - timedelta(seconds=window.window_seconds) for window in windows)
    if late > CLOCK_SKEW_WARNING:
        _window_time_log.log(
            (device_id, "late"),
            late.total_seconds(),
            logging.INFO,
            "device_id=%s batch %s has a window that ended %.0f s before its receipt: delivered late from the "
            "agent's buffer, or the device clock is behind (devices show prints the measured clock skew)",
            device_id,
            batch_id,
            late.total_seconds(),
        )


def _window_from_proto(
    device_id: str, hardware_class: str, message: common_pb2.MetricWindow, index: int, received_at: datetime
) -> MetricWindow:
    field = f"windows[{index}]"
    validation.check_name(message.model_name, f"{field}.model_name")
    validation.check_text(message.model_version, f"{field}.model_version", 128)
    validation.check_text(message.variant_id, f"{field}.variant_id", 200)
    if not 1 <= message.window_seconds <= MAX_WINDOW_SECONDS:
        raise InvalidArgument(f"{field}.window_seconds", f"{message.window_seconds} must be 1 to {MAX_WINDOW_SECONDS}")
    start = from_timestamp(message.window_start)
    if start is None:
        raise InvalidArgument(f"{field}.window_start", "missing")
    if message.error_count > message.inference_count:
        raise InvalidArgument(
            f"{field}.error_count", f"{message.error_count} exceeds inference_count {message.inference_count}"
        )
    try:
        sketch = LatencySketch.from_proto(message.latency)
    except ValueError as error:
        raise InvalidArgument(f"{field}.latency", str(error)) from None
    if sketch.relative_accuracy != DEFAULT_RELATIVE_ACCURACY:
        # Queries, rollout gates and downsampling merge windows, and sketches merge only at one accuracy.
        raise InvalidArgument(
            f"{field}.latency.relative_accuracy",
            f"{sketch.relative_accuracy:g} differs from the orchestrator's {DEFAULT_RELATIVE_ACCURACY:g}; "
            "build the sketch with the default accuracy",
        )
    if sketch.count > message.inference_count:
        raise InvalidArgument(
            f"{field}.latency",
            f"holds {sketch.count} samples but inference_count is {message.inference_count}",
        )
    return MetricWindow(
        device_id=device_id,
        model_name=message.model_name,
        model_version=message.model_version,
        variant_id=message.variant_id,
        hardware_class=hardware_class,
        window_start=start,
        window_seconds=message.window_seconds,
        received_at=received_at,
        inference_count=message.inference_count,
        error_count=message.error_count,
        sketch=sketch.to_bytes(),
    )


def placement_time(window: MetricWindow, skewed_devices: frozenset[str], max_clock_skew: timedelta) -> datetime:
    """Return the time at which queries place a window: its start, or a receive-time estimate when that is implausible.

    A window start is implausible when the device's clock is flagged as skewed (its last heartbeat
    was more than max_clock_skew off the orchestrator's clock), or when the window starts more than
    max_clock_skew after the orchestrator received it, which no correct clock produces. Such a
    window is placed at received_at minus its length, the latest start it can have had. So a device
    whose clock is an hour off still shows up in queries of the last minutes. Windows delivered late
    from an agent's buffer keep their start, because a late delivery alone is plausible.
    """
    if window.device_id in skewed_devices or window.window_start > window.received_at + max_clock_skew:
        return window.received_at - timedelta(seconds=window.window_seconds)
    return window.window_start


def _group_key(
    window: MetricWindow, placed_at: datetime, keys: tuple[str, ...], bucket_seconds: int
) -> tuple[tuple[str, str], ...]:
    values = {
        "device": window.device_id,
        "model": window.model_name,
        "variant": window.variant_id,
        "hardware_class": window.hardware_class,
    }
    key = tuple((name, values[name]) for name in keys)
    if bucket_seconds:
        start = int(placed_at.timestamp()) // bucket_seconds * bucket_seconds
        key += (("time", datetime.fromtimestamp(start, UTC).isoformat()),)
    return key


def query_metrics(
    request: operator_pb2.QueryMetricsRequest, state: OrchestratorState
) -> operator_pb2.QueryMetricsResponse:
    """Merge the stored sketches of the matching windows into one row per group.

    Raises InvalidArgument for a bad filter, group key, bucket or time (outside MIN_QUERY_TIME to
    MAX_QUERY_TIME), NotFound for a device, model or variant that has neither an entry in the store
    nor matching windows, and ResourceExhausted for more than MAX_BUCKETS rows.

    NOTE: the cost is linear in the windows in range (about 25 us each, bench/bench_metrics_query.py).
    Quick queries of long fleet-wide ranges would need sketches pre-merged per hour at upload.
    """
    for key in request.group_by:
        if key not in GROUP_KEYS:
            raise InvalidArgument("group_by", f"unknown key {key!r}; allowed: {', '.join(GROUP_KEYS)}")
    if request.device_id:
        validation.check_device_id(request.device_id)
    if ":" in request.model_name:
        raise InvalidArgument(
            "model_name",
            f"{request.model_name!r} must be a model name without a version; "
            "filter one version by variant_id (NAME:VERSION:KIND) or group by variant",
        )
    start = _query_time(request.start, "start")
    end = _query_time(request.end, "end")
    if start and end and start >= end:
        raise InvalidArgument("start", f"{start.isoformat()} must be before end {end.isoformat()}")
    if request.bucket_seconds > MAX_WINDOW_SECONDS * 24:
        raise InvalidArgument("bucket_seconds", f"{request.bucket_seconds} is over {MAX_WINDOW_SECONDS * 24}")
    skewed = state.hub.skewed_devices()
    if request.device_id:
        skewed = skewed & {request.device_id}
    max_skew = timedelta(seconds=state.config.max_clock_skew_s)
    # Windows placed by receive time end at their receipt at the latest, so a receipt up to one
    # window length after the range can still place a window inside it; placement_time filters exactly.
    windows = state.store.iter_metric_windows(
        device_id=request.device_id,
        model_name=request.model_name,
        variant_id=request.variant_id,
        hardware_class=request.hardware_class,
        start=start,
        end=end,
        received_start=start,
        received_end=end + timedelta(seconds=MAX_WINDOW_SECONDS) if end else None,
        received_device_ids=skewed,
    )
    keys = tuple(dict.fromkeys(request.group_by))
    # Windows are merged as they stream from the store, so memory grows with the groups, not the windows.
    groups: dict[tuple[tuple[str, str], ...], _Group] = {}
    matched = False
    with contextlib.closing(windows):
        for window in windows:
            matched = True
            placed_at = placement_time(window, skewed, max_skew)
            if (start is not None and placed_at < start) or (end is not None and placed_at >= end):
                continue
            group_key = _group_key(window, placed_at, keys, request.bucket_seconds)
            group = groups.get(group_key)
            if group is None:
                if len(groups) == MAX_BUCKETS:
                    raise ResourceExhausted(
                        f"query would return more than {MAX_BUCKETS} rows: use larger buckets or a shorter range"
                    )
                group = groups[group_key] = _Group()
            group.add(placed_at, window)
    if not matched:
        _check_filters_exist(request, state)
    rows = [group.row(dict(group_key), request.include_sketch) for group_key, group in sorted(groups.items())]
    return operator_pb2.QueryMetricsResponse(rows=rows)


def _query_time(message: Timestamp, field: str) -> datetime | None:
    """Return the time in a query field, or None when it is unset; raise InvalidArgument when out of range."""
    allowed = f"give a time from {MIN_QUERY_TIME.isoformat()} to {MAX_QUERY_TIME.isoformat()}"
    try:
        value = from_timestamp(message)
    except ValueError:
        # An invalid Timestamp (seconds beyond year 9999 or nanos out of range) does not convert.
        raise InvalidArgument(field, f"seconds={message.seconds} nanos={message.nanos} is invalid; {allowed}") from None
    if value is not None and not MIN_QUERY_TIME <= value <= MAX_QUERY_TIME:
        raise InvalidArgument(field, f"{value.isoformat()} is out of range; {allowed}")
    return value


def _check_filters_exist(request: operator_pb2.QueryMetricsRequest, state: OrchestratorState) -> None:
    """Raise NotFound, with the closest known names, for a filter value that does not exist.

    The filters checked are the device, model, variant and hardware class. Only called when no window
    matched, so windows of a deleted device or model can still be queried. A removed device is known, so
    a time range without its windows returns no rows. A hardware class is known while a device has it or
    a stored window carries it.
    """
    store = state.store
    device_id = request.device_id
    if device_id and store.get_device(device_id) is None and store.get_removed_device(device_id) is None:
        # Removed devices are suggested too, because their windows can still be queried.
        known = [device.device_id for device in store.list_devices()] + store.removed_device_ids_with_windows()
        raise NotFound(f"device {device_id!r} not found{suggest(device_id, known, DEVICES_LISTING)}")
    if request.hardware_class and not _hardware_class_known(request.hardware_class, store):
        known = sorted({device.hardware.hardware_class for device in store.list_devices()})
        hint = suggest(request.hardware_class, known, HARDWARE_CLASSES_LISTING)
        raise NotFound(f"hardware class {request.hardware_class!r} not found{hint}")
    if not (request.model_name or request.variant_id):
        return
    model_names = sorted({m.name for m in store.list_model_versions()})
    if request.model_name and request.model_name not in model_names:
        hint = suggest(request.model_name, model_names, MODELS_LISTING)
        raise NotFound(f"model {request.model_name!r} not found{hint}")
    if request.variant_id:
        try:
            store.get_variant(request.variant_id)
        except NotFoundError:
            known = [v.variant_id for name in model_names for v in store.list_variants(name)]
            variant_model = request.variant_id.partition(":")[0]
            listing = f"edgefleet models variants {variant_model}" if variant_model in model_names else MODELS_LISTING
            hint = suggest(request.variant_id, known, listing)
            raise NotFound(f"variant {request.variant_id!r} not found{hint}") from None


def _hardware_class_known(hardware_class: str, store: Store) -> bool:
    if any(device.hardware.hardware_class == hardware_class for device in store.list_devices()):
        return True
    windows = store.iter_metric_windows(hardware_class=hardware_class)
    try:
        return next(windows, None) is not None
    finally:
        windows.close()  # Ends the read transaction that the iterator keeps open.


class _Group:
    """The merged windows of one row of a metrics query."""

    def __init__(self) -> None:
        self.sketch = LatencySketch()
        self.first: datetime | None = None
        self.last_end: datetime | None = None
        self.inferences = 0
        self.errors = 0

    def add(self, placed_at: datetime, window: MetricWindow) -> None:
        self.sketch.merge(LatencySketch.from_bytes(window.sketch))
        window_end = placed_at + timedelta(seconds=window.window_seconds)
        if self.first is None or placed_at < self.first:
            self.first = placed_at
        if self.last_end is None or window_end > self.last_end:
            self.last_end = window_end
        self.inferences += window.inference_count
        self.errors += window.error_count

    def row(self, group: dict[str, str], include_sketch: bool) -> operator_pb2.MetricRow:
        assert self.first is not None and self.last_end is not None, "a group has at least one window"
        sketch = self.sketch
        # Throughput over the row's span, from its first window's start to its last window's end:
        # devices that served at once add up, and devices that served one after another do not.
        span = max((self.last_end - self.first).total_seconds(), 1e-9)
        empty = sketch.count == 0
        row = operator_pb2.MetricRow(
            group=group,
            inference_count=self.inferences,
            error_count=self.errors,
            throughput_per_s=self.inferences / span,
            p50_ms=math.nan if empty else sketch.quantile(0.50),
            p95_ms=math.nan if empty else sketch.quantile(0.95),
            p99_ms=math.nan if empty else sketch.quantile(0.99),
            mean_ms=math.nan if empty else sketch.mean,
            first_window=timestamp(self.first),
            last_window=timestamp(self.last_end),
        )
        if include_sketch:
            row.latency.CopyFrom(sketch.to_proto())
        return row
