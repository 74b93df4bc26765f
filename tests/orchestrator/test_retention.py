"""Metric retention: downsampling by merged sketches, deletion, and space reclaimed, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa

from edgefleet.common.hardware import HardwareProfile, RuntimeInfo
from edgefleet.common.sketch import LatencySketch
from edgefleet.orchestrator.domain import MetricWindow
from edgefleet.orchestrator.retention import RetentionPolicy, apply_retention, retention_forever, unavailable_retry_s
from edgefleet.orchestrator.store import Store, open_store
from edgefleet.orchestrator.store.engine import DatabaseUnavailable

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
HARDWARE = HardwareProfile(
    cpu_model="Test CPU",
    architecture="x86_64",
    logical_cores=2,
    usable_cores=2.0,
    cpu_features=("avx2",),
    memory_total_bytes=1 << 30,
    memory_available_bytes=1 << 29,
    disk_free_bytes=1 << 30,
    runtimes=(RuntimeInfo("onnxruntime", "1.32.0"),),
    hardware_class="x86-2c",
)
POLICY = RetentionPolicy(downsample_after_s=86400, bucket_seconds=300, delete_after_s=7 * 86400)


def sketch_bytes(values: list[float]) -> bytes:
    sketch = LatencySketch()
    for value in values:
        sketch.add(value)
    return sketch.to_bytes()


def make_window(start: datetime, values: list[float], *, variant: str = "v-source", seconds: int = 10) -> MetricWindow:
    return MetricWindow(
        device_id="dev-1",
        model_name="classifier",
        model_version="1",
        variant_id=variant,
        hardware_class="x86-2c",
        window_start=start,
        window_seconds=seconds,
        received_at=start + timedelta(seconds=seconds + 1),
        inference_count=len(values),
        error_count=1 if values else 0,
        sketch=sketch_bytes(values),
    )


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    opened = open_store(db_url)
    opened.register_device(
        device_id="dev-1",
        instance_key_hash="k" * 64,
        hardware=HARDWARE,
        labels={},
        agent_version="test",
        peer="ipv4:127.0.0.1:1",
        now=NOW - 30 * DAY,
    )
    yield opened
    opened.close()


def test_retention_merges_old_windows(store: Store) -> None:
    old = NOW - 2 * DAY
    # Thirty 10 s windows fill one 5-minute bucket; six more start the next bucket.
    windows = [make_window(old + timedelta(seconds=10 * i), [float(i + 1)] * 4) for i in range(36)]
    store.add_metric_batch("dev-1", "b1", windows)

    result = apply_retention(store, POLICY, NOW)
    merged = store.query_metric_windows()

    assert result.merged_windows == 36
    assert result.written_windows == 2
    assert [w.window_start for w in merged] == [old, old + timedelta(minutes=5)]
    assert [w.inference_count for w in merged] == [120, 24]
    assert [w.error_count for w in merged] == [30, 6]
    assert [w.window_seconds for w in merged] == [300, 60]


def test_retention_keeps_quantiles(store: Store) -> None:
    old = NOW - 2 * DAY
    values = [[float(v) for v in range(1 + i, 200, 7)] for i in range(6)]
    windows = [make_window(old + timedelta(seconds=10 * i), part) for i, part in enumerate(values)]
    store.add_metric_batch("dev-1", "b1", windows)
    expected = LatencySketch()
    for part in values:
        expected.merge(LatencySketch.from_bytes(sketch_bytes(part)))

    apply_retention(store, POLICY, NOW)
    (merged,) = store.query_metric_windows()
    sketch = LatencySketch.from_bytes(merged.sketch)

    assert sketch.count == expected.count
    assert sketch.quantile(0.5) == expected.quantile(0.5)
    assert sketch.quantile(0.99) == expected.quantile(0.99)


def test_retention_keeps_recent(store: Store) -> None:
    recent = NOW - HOUR
    windows = [make_window(recent + timedelta(seconds=10 * i), [1.0]) for i in range(5)]
    store.add_metric_batch("dev-1", "b1", windows)

    result = apply_retention(store, POLICY, NOW)

    assert result.merged_windows == 0
    assert len(store.query_metric_windows()) == 5


def test_retention_separates_variants(store: Store) -> None:
    old = NOW - 2 * DAY
    windows = [
        make_window(old + timedelta(seconds=10 * i), [1.0], variant=variant)
        for i in range(3)
        for variant in ("v-source", "v-int8")
    ]
    store.add_metric_batch("dev-1", "b1", windows)

    apply_retention(store, POLICY, NOW)
    merged = store.query_metric_windows()

    assert sorted((w.variant_id, w.inference_count) for w in merged) == [("v-int8", 3), ("v-source", 3)]


def test_retention_deletes_expired(store: Store) -> None:
    store.add_metric_batch("dev-1", "expired", [make_window(NOW - 8 * DAY, [1.0])])
    store.add_metric_batch("dev-1", "kept", [make_window(NOW - 2 * DAY, [2.0])])

    result = apply_retention(store, POLICY, NOW)

    assert result.deleted_windows == 1
    assert [w.inference_count for w in store.query_metric_windows()] == [1]


def test_retention_second_run_noop(store: Store) -> None:
    old = NOW - 2 * DAY
    store.add_metric_batch("dev-1", "b1", [make_window(old + timedelta(seconds=10 * i), [1.0]) for i in range(10)])
    apply_retention(store, POLICY, NOW)
    before = store.query_metric_windows()

    result = apply_retention(store, POLICY, NOW)

    assert result.merged_windows == 0
    assert store.query_metric_windows() == before


def test_retention_skips_merged_history(store: Store) -> None:
    """A run reads no window that an earlier run merged or left alone in its bucket."""
    old = NOW - 3 * DAY
    history = [make_window(old + timedelta(seconds=10 * i), [1.0]) for i in range(36)]
    alone = [make_window(old + timedelta(hours=1), [2.0])]
    store.add_metric_batch("dev-1", "b1", history + alone)
    apply_retention(store, POLICY, NOW)
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    engine = store.engine  # type: ignore[attr-defined]
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        result = apply_retention(store, POLICY, NOW, reclaim=False)
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)

    assert result.merged_windows == 0
    assert [w.inference_count for w in store.query_metric_windows()] == [30, 6, 1]
    assert statements
    assert not [statement for statement in statements if "metric_windows.sketch" in statement]


def test_retention_merges_late_arrivals(store: Store) -> None:
    old = NOW - 2 * DAY
    store.add_metric_batch("dev-1", "b1", [make_window(old + timedelta(seconds=10 * i), [1.0]) for i in range(3)])
    apply_retention(store, POLICY, NOW)
    late = [dataclasses.replace(make_window(old + timedelta(seconds=100), [1.0, 2.0]), received_at=NOW - 1.5 * DAY)]
    store.add_metric_batch("dev-1", "b2", late)

    apply_retention(store, POLICY, NOW)
    (merged,) = store.query_metric_windows()

    assert merged.inference_count == 5


def test_policy_rejects_delete_before_downsample() -> None:
    with pytest.raises(ValueError, match="metrics_delete_after_s"):
        RetentionPolicy(downsample_after_s=7200, delete_after_s=3600)


def sqlite_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())


def test_retention_shrinks_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.db"
    store = open_store(f"sqlite:///{path}")
    try:
        store.register_device(
            device_id="dev-1",
            instance_key_hash="k" * 64,
            hardware=HARDWARE,
            labels={},
            agent_version="test",
            peer="ipv4:127.0.0.1:1",
            now=NOW - 30 * DAY,
        )
        values = [float(v) for v in range(1, 400, 3)]
        for batch in range(8):
            start = NOW - 10 * DAY + timedelta(hours=batch)
            windows = [make_window(start + timedelta(seconds=10 * i), values) for i in range(300)]
            store.add_metric_batch("dev-1", f"b{batch}", windows)
        store.reclaim_space()  # Converts the file to incremental auto-vacuum, as the first run would.
        before = sqlite_bytes(path)

        result = apply_retention(store, POLICY, NOW)
        after = sqlite_bytes(path)
    finally:
        store.close()

    assert result.deleted_windows == 2400
    assert before > 1_000_000
    assert after < before / 4


class OutageStore:
    """A store whose first `failures` deletions raise DatabaseUnavailable, as during a database outage."""

    def __init__(self, store: Store, failures: int) -> None:
        self.store = store
        self.failures = failures

    def delete_metric_windows(self, received_before: datetime) -> int:
        if self.failures:
            self.failures -= 1
            raise DatabaseUnavailable("the orchestrator's database is unavailable (connection refused)")
        return self.store.delete_metric_windows(received_before=received_before)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


class StopLoop(Exception):
    """Ends retention_forever from the test's sleep."""


def test_retention_retries_soon_after_outage(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    store.add_metric_batch("dev-1", "expired", [make_window(datetime.now(UTC) - 40 * DAY, [1.0])])
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) > 4:
            raise StopLoop

    outage = cast(Store, OutageStore(store, failures=3))
    with caplog.at_level(logging.INFO, logger="edgefleet.orchestrator.retention"), pytest.raises(StopLoop):
        asyncio.run(retention_forever(outage, POLICY, 3600.0, sleep=sleep))

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert delays == [60.0, 5.0, 10.0, 20.0, 3600.0]
    assert len(warnings) == 1
    assert "retrying in 5.0 s" in warnings[0].getMessage()
    assert warnings[0].exc_info is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("works again" in r.getMessage() for r in caplog.records)
    assert store.query_metric_windows() == []


def test_unavailable_retry_capped() -> None:
    assert unavailable_retry_s(1, 3600.0) == 5.0
    assert unavailable_retry_s(7, 3600.0) == 300.0
    assert unavailable_retry_s(3, 12.0) == 12.0
