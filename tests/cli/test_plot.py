"""The figure of `edgefleet metrics plot`: readable time labels above the distribution."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import matplotlib.pyplot as plt

from edgefleet.cli.plot import latency_figure
from edgefleet.common.sketch import LatencySketch
from edgefleet.v1 import operator_pb2


def metric_row(latencies_ms: list[float], time: datetime | None = None) -> operator_pb2.MetricRow:
    sketch = LatencySketch()
    for value in latencies_ms:
        sketch.add(value)
    row = operator_pb2.MetricRow(
        inference_count=len(latencies_ms),
        p50_ms=sketch.quantile(0.5),
        p95_ms=sketch.quantile(0.95),
        p99_ms=sketch.quantile(0.99),
        latency=sketch.to_proto(),
    )
    if time is not None:
        row.group["time"] = time.isoformat()
    return row


def test_time_axis_labels_visible() -> None:
    start = datetime(2026, 12, 1, tzinfo=UTC)
    # Three days of hourly buckets, the range at which the labels went missing.
    series = [metric_row([5.0 + hour % 7, 9.0], start + timedelta(hours=hour)) for hour in range(72)]
    overall = metric_row([5.0 + hour % 7 for hour in range(72)])

    figure = latency_figure(series, overall, "efficientnet-lite0")
    try:
        figure.canvas.draw()
        over_time, distribution = figure.axes[:2]
        time_labels = [label.get_text() for label in over_time.get_xticklabels() if label.get_visible()]
        distribution_labels = [label for label in distribution.get_xticklabels() if label.get_visible()]
    finally:
        plt.close(figure)

    assert len(time_labels) >= 3
    assert all(time_labels)
    assert any("Dec" in text or text.isdigit() for text in time_labels)
    assert distribution_labels
