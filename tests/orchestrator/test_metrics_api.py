"""UploadMetrics and QueryMetrics over gRPC with real latency sketches, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import numpy as np
import pytest

from edgefleet.common.serde import timestamp
from edgefleet.common.sketch import LatencySketch
from edgefleet.orchestrator.handlers import metrics as metrics_handlers
from edgefleet.v1 import agent_pb2, common_pb2, operator_pb2
from tests.servers import OrchestratorThread, hardware_message, register

pytest_plugins = ["tests.servers"]

# Window starts are whole minutes an hour ago, well inside the default retention.
BASE = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1)


def make_window(
    samples: Sequence[float] | np.ndarray,
    *,
    model: str = "classifier",
    variant: str = "classifier:1:source",
    start: datetime = BASE,
    seconds: int = 10,
    errors: int = 0,
) -> common_pb2.MetricWindow:
    sketch = LatencySketch()
    for value in samples:
        sketch.add(float(value))
    return common_pb2.MetricWindow(
        model_name=model,
        model_version="1",
        variant_id=variant,
        window_start=timestamp(start),
        window_seconds=seconds,
        inference_count=len(samples),
        error_count=errors,
        latency=sketch.to_proto(),
    )


def send(
    orchestrator: OrchestratorThread, device_id: str, batch_id: str, windows: Sequence[common_pb2.MetricWindow]
) -> agent_pb2.UploadMetricsResponse:
    request = agent_pb2.UploadMetricsRequest(device_id=device_id, batch_id=batch_id, windows=list(windows))
    return orchestrator.agent.UploadMetrics(request, timeout=30)


def query(orchestrator: OrchestratorThread, **fields: Any) -> list[operator_pb2.MetricRow]:
    return list(orchestrator.operator.QueryMetrics(operator_pb2.QueryMetricsRequest(**fields), timeout=30).rows)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def latencies(seed: int, count: int) -> np.ndarray:
    """Return count log-normal latencies around 20 ms with a long tail."""
    return np.random.default_rng(seed).lognormal(mean=np.log(20.0), sigma=0.6, size=count)


def test_quantiles_match_numpy(orchestrator: OrchestratorThread) -> None:
    device_id, _ = register(orchestrator.agent)
    samples = latencies(seed=1, count=6000)
    windows = [make_window(part, start=BASE + timedelta(seconds=10 * i)) for i, part in enumerate(np.split(samples, 6))]

    response = send(orchestrator, device_id, "batch-1", windows)
    rows = query(orchestrator, device_id=device_id, group_by=["device"])

    assert response.accepted == 6
    assert response.duplicate is False
    assert len(rows) == 1
    row = rows[0]
    assert row.inference_count == 6000
    for quantile, value in ((0.50, row.p50_ms), (0.95, row.p95_ms), (0.99, row.p99_ms)):
        exact = float(np.quantile(samples, quantile, method="lower"))
        assert abs(value - exact) <= 0.01 * exact, f"p{quantile * 100:g}: {value} vs numpy {exact}"
    assert row.mean_ms == pytest.approx(float(samples.mean()), rel=1e-9)
    assert row.throughput_per_s == pytest.approx(6000 / 60)
    assert row.first_window.ToDatetime(tzinfo=UTC) == BASE
    assert row.last_window.ToDatetime(tzinfo=UTC) == BASE + timedelta(seconds=60)
    assert dict(row.group) == {"device": device_id}


def test_quantiles_merge_devices(orchestrator: OrchestratorThread) -> None:
    first, _ = register(orchestrator.agent)
    second, _ = register(orchestrator.agent)
    fast = latencies(seed=2, count=3000) / 4
    slow = latencies(seed=3, count=1000) * 3
    send(orchestrator, first, "batch-a", [make_window(fast)])
    send(orchestrator, second, "batch-b", [make_window(slow)])

    rows = query(orchestrator, model_name="classifier")

    merged = np.concatenate([fast, slow])
    assert len(rows) == 1
    assert rows[0].inference_count == 4000
    for quantile, value in ((0.50, rows[0].p50_ms), (0.95, rows[0].p95_ms), (0.99, rows[0].p99_ms)):
        exact = float(np.quantile(merged, quantile, method="lower"))
        assert abs(value - exact) <= 0.01 * exact, f"p{quantile * 100:g}: {value} vs numpy {exact}"


def minute_of_windows(seed: int, start: datetime) -> list[common_pb2.MetricWindow]:
    """Six back-to-back 10 s windows of 500 inferences each: 50 inferences per second for a minute."""
    return [make_window(latencies(seed, 500), start=start + timedelta(seconds=10 * i)) for i in range(6)]


@pytest.mark.parametrize(("second_starts_after_s", "expected_per_s"), [(0, 100.0), (60, 50.0), (30, 6000 / 90)])
def test_throughput_of_devices_counts_time_they_served(
    orchestrator: OrchestratorThread, second_starts_after_s: int, expected_per_s: float
) -> None:
    """Two devices serving 50/s each: 100/s when at once, 50/s when one after the other."""
    first, _ = register(orchestrator.agent)
    second, _ = register(orchestrator.agent)
    send(orchestrator, first, "batch-a", minute_of_windows(5, BASE))
    send(orchestrator, second, "batch-b", minute_of_windows(6, BASE + timedelta(seconds=second_starts_after_s)))

    (row,) = query(orchestrator, model_name="classifier", device_id="")

    assert row.inference_count == 6000
    assert row.throughput_per_s == pytest.approx(expected_per_s)


def test_throughput_is_averaged_over_idle_gaps(orchestrator: OrchestratorThread) -> None:
    device_id, _ = register(orchestrator.agent)
    windows = minute_of_windows(7, BASE) + minute_of_windows(8, BASE + timedelta(hours=1))

    send(orchestrator, device_id, "batch-1", windows)
    (row,) = query(orchestrator, device_id=device_id)

    assert row.throughput_per_s == pytest.approx(6000 / 3660)


def test_duplicate_batch(orchestrator: OrchestratorThread) -> None:
    device_id, _ = register(orchestrator.agent)
    windows = [make_window(latencies(seed=4, count=100))]
    send(orchestrator, device_id, "batch-1", windows)

    again = send(orchestrator, device_id, "batch-1", windows)
    rows = query(orchestrator, device_id=device_id)

    assert again.duplicate is True
    assert again.accepted == 0
    assert rows[0].inference_count == 100
    assert len(orchestrator.state.store.query_metric_windows(device_id=device_id)) == 1


def test_group_and_filter(orchestrator: OrchestratorThread) -> None:
    camera, _ = register(orchestrator.agent, "camera-1", hardware=hardware_message(usable_cores=1.0))
    ecu, _ = register(orchestrator.agent, "ecu-1")
    send(
        orchestrator,
        camera,
        "camera-batch",
        [
            make_window([10.0] * 10, model="detector", variant="detector:1:tflite-fp32"),
            make_window([20.0] * 20, model="classifier", start=BASE + timedelta(minutes=10)),
        ],
    )
    send(
        orchestrator,
        ecu,
        "ecu-batch",
        [
            make_window([30.0] * 30, model="classifier", errors=3),
            make_window(
                [40.0] * 40, model="classifier", variant="classifier:1:int8", start=BASE + timedelta(minutes=20)
            ),
        ],
    )

    by_model = query(orchestrator, group_by=["model"])
    by_device_variant = query(orchestrator, group_by=["device", "variant"])
    one_device = query(orchestrator, device_id=ecu, group_by=["variant"])
    one_variant = query(orchestrator, variant_id="classifier:1:int8")
    camera_class = query(
        orchestrator,
        hardware_class=orchestrator.state.store.get_device(camera).hardware.hardware_class,  # type: ignore[union-attr]
    )
    late = query(orchestrator, start=timestamp(BASE + timedelta(minutes=5)), group_by=["model"])
    early = query(orchestrator, end=timestamp(BASE + timedelta(minutes=5)), group_by=["device"])

    assert {r.group["model"]: r.inference_count for r in by_model} == {"classifier": 90, "detector": 10}
    assert {r.group["model"]: r.error_count for r in by_model} == {"classifier": 3, "detector": 0}
    assert len(by_device_variant) == 4
    assert {r.group["variant"]: r.inference_count for r in one_device} == {
        "classifier:1:source": 30,
        "classifier:1:int8": 40,
    }
    assert [r.inference_count for r in one_variant] == [40]
    assert [r.inference_count for r in camera_class] == [30]
    assert {r.group["model"]: r.inference_count for r in late} == {"classifier": 60}
    assert {r.group["device"]: r.inference_count for r in early} == {camera: 10, ecu: 30}


def test_query_empty(orchestrator: OrchestratorThread) -> None:
    assert query(orchestrator, group_by=["device"]) == []


def test_query_invalid(orchestrator: OrchestratorThread) -> None:
    bad_group = rpc_error(lambda: query(orchestrator, group_by=["colour"]))
    reversed_range = rpc_error(
        lambda: query(orchestrator, start=timestamp(BASE), end=timestamp(BASE - timedelta(minutes=1)))
    )

    assert bad_group.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "colour" in bad_group.details()
    assert reversed_range.code() == grpc.StatusCode.INVALID_ARGUMENT


def _errors_above_count(window: common_pb2.MetricWindow) -> None:
    window.error_count = window.inference_count + 1


def _zero_seconds(window: common_pb2.MetricWindow) -> None:
    window.window_seconds = 0


def _count_mismatch(window: common_pb2.MetricWindow) -> None:
    window.latency.count += 5


def _sketch_above_inferences(window: common_pb2.MetricWindow) -> None:
    window.inference_count = 1


def _min_above_max(window: common_pb2.MetricWindow) -> None:
    window.latency.min_ms = window.latency.max_ms + 1


def _other_accuracy(window: common_pb2.MetricWindow) -> None:
    sketch = LatencySketch(relative_accuracy=0.02)
    for value in (5.0, 6.0, 7.0):
        sketch.add(value)
    window.latency.CopyFrom(sketch.to_proto())


def _no_start(window: common_pb2.MetricWindow) -> None:
    window.ClearField("window_start")


def _no_model(window: common_pb2.MetricWindow) -> None:
    window.model_name = ""


INVALID_WINDOWS = [
    pytest.param(_errors_above_count, "windows[1].error_count", id="errors-above-count"),
    pytest.param(_zero_seconds, "windows[1].window_seconds", id="window-seconds-0"),
    pytest.param(_count_mismatch, "windows[1].latency", id="sketch-count-mismatch"),
    pytest.param(_sketch_above_inferences, "windows[1].latency", id="sketch-above-inferences"),
    pytest.param(_min_above_max, "windows[1].latency", id="sketch-min-above-max"),
    pytest.param(_other_accuracy, "windows[1].latency.relative_accuracy", id="sketch-other-accuracy"),
    pytest.param(_no_start, "windows[1].window_start", id="no-start"),
    pytest.param(_no_model, "windows[1].model_name", id="no-model"),
]


@pytest.mark.parametrize(("mutate", "field"), INVALID_WINDOWS)
def test_upload_rejects(
    orchestrator: OrchestratorThread, mutate: Callable[[common_pb2.MetricWindow], None], field: str
) -> None:
    device_id, _ = register(orchestrator.agent)
    windows = [make_window([5.0, 6.0, 7.0]), make_window([5.0, 6.0, 7.0], start=BASE + timedelta(seconds=10))]
    mutate(windows[1])

    error = rpc_error(lambda: send(orchestrator, device_id, "batch-1", windows))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details()
    assert query(orchestrator) == []


def test_rejected_batch_id_reusable(orchestrator: OrchestratorThread) -> None:
    device_id, _ = register(orchestrator.agent)
    bad = make_window([5.0])
    bad.window_seconds = 0
    rpc_error(lambda: send(orchestrator, device_id, "batch-1", [bad]))

    response = send(orchestrator, device_id, "batch-1", [make_window([5.0])])

    assert response.duplicate is False
    assert response.accepted == 1


def test_upload_too_many_windows(orchestrator: OrchestratorThread) -> None:
    device_id, _ = register(orchestrator.agent)
    window = make_window([5.0])

    error = rpc_error(lambda: send(orchestrator, device_id, "batch-1", [window] * 1001))

    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1001" in error.details()
    assert query(orchestrator) == []


def test_upload_1000_windows(orchestrator: OrchestratorThread) -> None:
    device_id, _ = register(orchestrator.agent)
    windows = [make_window([5.0], start=BASE + timedelta(seconds=10 * i)) for i in range(1000)]

    response = send(orchestrator, device_id, "batch-1", windows)

    assert response.accepted == 1000
    assert query(orchestrator)[0].inference_count == 1000


def test_query_too_many_rows(orchestrator: OrchestratorThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_handlers, "MAX_BUCKETS", 100)
    device_id, _ = register(orchestrator.agent)
    windows = [make_window([5.0], start=BASE + timedelta(seconds=10 * i)) for i in range(101)]
    send(orchestrator, device_id, "batch-1", windows)

    error = rpc_error(lambda: query(orchestrator, bucket_seconds=10))

    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than 100 rows" in error.details()
    assert len(query(orchestrator, bucket_seconds=20)) == 51


def test_upload_unknown_device(orchestrator: OrchestratorThread) -> None:
    error = rpc_error(lambda: send(orchestrator, "nobody", "batch-1", [make_window([5.0])]))

    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_upload_bad_batch_id(orchestrator: OrchestratorThread) -> None:
    device_id, _ = register(orchestrator.agent)

    empty = rpc_error(lambda: send(orchestrator, device_id, "", [make_window([5.0])]))
    long = rpc_error(lambda: send(orchestrator, device_id, "b" * 65, [make_window([5.0])]))

    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert long.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_batch_id_per_device(orchestrator: OrchestratorThread) -> None:
    first, _ = register(orchestrator.agent)
    second, _ = register(orchestrator.agent)
    send(orchestrator, first, "batch-1", [make_window([5.0])])

    response = send(orchestrator, second, "batch-1", [make_window([5.0, 6.0])])

    assert response.duplicate is False
    assert {r.group["device"]: r.inference_count for r in query(orchestrator, group_by=["device"])} == {
        first: 1,
        second: 2,
    }


def test_duplicate_batch_concurrent(orchestrator: OrchestratorThread) -> None:
    device_id, _ = register(orchestrator.agent)
    windows = [make_window(latencies(seed=5, count=50))]

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda _: send(orchestrator, device_id, "batch-1", windows), range(8)))

    assert [r.duplicate for r in responses].count(False) == 1
    assert query(orchestrator)[0].inference_count == 50

