"""The agent's on-disk metric buffer: durable batches with fixed ids, bounds, crash leftovers."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edgefleet.agent.buffer import BufferLimits, MetricBuffer
from edgefleet.common.sketch import LatencySketch
from edgefleet.v1 import common_pb2


def window(count: int, start_s: int = 1_700_000_000) -> common_pb2.MetricWindow:
    sketch = LatencySketch()
    for i in range(count):
        sketch.add(1.0 + i)
    message = common_pb2.MetricWindow(
        model_name="classifier",
        model_version="1",
        variant_id="classifier:1:source",
        window_seconds=10,
        inference_count=count,
        latency=sketch.to_proto(),
    )
    message.window_start.FromSeconds(start_s)
    return message


def test_buffer_round_trip(tmp_path: Path) -> None:
    buffer = MetricBuffer(tmp_path)
    batch_id = buffer.append([window(3), window(4)])

    batch = buffer.oldest()

    assert batch is not None
    assert batch.batch_id == batch_id
    assert [w.inference_count for w in batch.windows] == [3, 4]


def test_buffer_order_oldest_first(tmp_path: Path) -> None:
    buffer = MetricBuffer(tmp_path)
    ids = [buffer.append([window(i + 1)]) for i in range(5)]

    assert buffer.batch_ids() == ids


def test_buffer_remove_delivered(tmp_path: Path) -> None:
    buffer = MetricBuffer(tmp_path)
    first = buffer.append([window(1)])
    second = buffer.append([window(2)])

    buffer.remove(first)

    assert buffer.batch_ids() == [second]
    assert len(list(tmp_path.glob("*.batch"))) == 1


def test_buffer_restart_keeps_ids(tmp_path: Path) -> None:
    buffer = MetricBuffer(tmp_path)
    ids = [buffer.append([window(i + 1)]) for i in range(3)]
    buffer.remove(ids[0])

    reopened = MetricBuffer(tmp_path)
    newest = reopened.append([window(9)])

    assert reopened.batch_ids() == [*ids[1:], newest]


def test_buffer_drops_oldest_by_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    buffer = MetricBuffer(tmp_path, BufferLimits(max_batches=3))
    ids = [buffer.append([window(10)]) for _ in range(5)]

    with caplog.at_level(logging.WARNING, logger="edgefleet.agent.buffer"):
        newest = buffer.append([window(10)])

    assert buffer.batch_ids() == [*ids[3:], newest]
    assert buffer.dropped_batches == 3
    assert buffer.dropped_inferences == 30
    assert "dropped the 1 oldest batches" in caplog.text


def test_buffer_drops_oldest_by_bytes(tmp_path: Path) -> None:
    size = len(common_pb2.MetricWindow.SerializeToString(window(50))) + 64
    buffer = MetricBuffer(tmp_path, BufferLimits(max_bytes=3 * size))
    for _ in range(10):
        buffer.append([window(50)])

    assert buffer.total_bytes <= 3 * size
    assert buffer.dropped_batches == 10 - len(buffer)
    assert sum(p.stat().st_size for p in tmp_path.glob("*.batch")) == buffer.total_bytes


def test_buffer_keeps_one_oversized(tmp_path: Path) -> None:
    buffer = MetricBuffer(tmp_path, BufferLimits(max_bytes=10))
    buffer.append([window(5)])
    newest = buffer.append([window(6)])

    assert buffer.batch_ids() == [newest]


def test_buffer_removes_crash_leftovers(tmp_path: Path) -> None:
    buffer = MetricBuffer(tmp_path)
    kept = buffer.append([window(2)])
    (tmp_path / f"{'9' * 16}-{'a' * 32}.batch.tmp").write_bytes(b"\x0a\x05half")
    (tmp_path / f"{'8' * 16}-{'b' * 32}.batch").write_bytes(b"\xff\xff\xff not a protobuf")

    reopened = MetricBuffer(tmp_path)

    assert reopened.batch_ids() == [kept]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{'0' * 16}-{kept}.batch"]


def test_buffer_rejects_swapped_content(tmp_path: Path) -> None:
    buffer = MetricBuffer(tmp_path)
    first = buffer.append([window(1)])
    second = buffer.append([window(2)])
    paths = sorted(tmp_path.glob("*.batch"))
    paths[0].write_bytes(paths[1].read_bytes())

    reopened = MetricBuffer(tmp_path)

    assert first not in reopened.batch_ids()
    assert reopened.batch_ids() == [second]


def test_buffer_drop_counts(tmp_path: Path) -> None:
    buffer = MetricBuffer(tmp_path)
    batch_id = buffer.append([window(7)])

    buffer.drop(batch_id, "invalid window")

    assert len(buffer) == 0
    assert buffer.dropped_inferences == 7


def test_buffer_empty(tmp_path: Path) -> None:
    assert MetricBuffer(tmp_path).oldest() is None


def test_limits_reject_zero() -> None:
    with pytest.raises(ValueError, match="max_batches"):
        BufferLimits(max_batches=0)
