"""edgefleet metrics plot: latency over time and its distribution, drawn to a PNG with matplotlib."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from edgefleet.common.sketch import LatencySketch
from edgefleet.v1 import operator_pb2


def bucket_bounds(index: int, gamma: float) -> tuple[float, float]:
    """Return the (low, high] latency range in ms of sketch bucket index."""
    return gamma ** (index - 1), gamma**index


def plot_latency(
    series: list[operator_pb2.MetricRow], overall: operator_pb2.MetricRow, title: str, output: Path
) -> Path:
    """Draw p50/p95/p99 per time bucket above the histogram of the merged sketch; return the PNG path."""
    import matplotlib

    matplotlib.use("Agg")  # No display: render straight to a file.
    import matplotlib.pyplot as plt

    times = [datetime.fromisoformat(row.group["time"]) for row in series]
    figure, (over_time, distribution) = plt.subplots(2, 1, figsize=(10, 8), constrained_layout=True)
    for label, values, style in (
        ("p50", [r.p50_ms for r in series], "-"),
        ("p95", [r.p95_ms for r in series], "--"),
        ("p99", [r.p99_ms for r in series], ":"),
    ):
        over_time.plot(times, values, style, marker="o", markersize=3, label=label)
    over_time.set_title(f"Latency over time: {title}")
    over_time.set_ylabel("latency (ms)")
    over_time.set_xlabel("window start (UTC)")
    over_time.grid(True, alpha=0.3)
    over_time.legend()
    figure.autofmt_xdate()

    sketch = LatencySketch.from_proto(overall.latency)
    gamma = (1 + sketch.relative_accuracy) / (1 - sketch.relative_accuracy)
    counts = sketch.bucket_counts()
    lefts, widths, heights = [], [], []
    for index in sorted(counts):
        low, high = bucket_bounds(index, gamma)
        lefts.append(low)
        widths.append(high - low)
        heights.append(counts[index])
    distribution.bar(lefts, heights, width=widths, align="edge", color="tab:blue", alpha=0.8)
    for quantile, color in ((0.5, "tab:green"), (0.95, "tab:orange"), (0.99, "tab:red")):
        value = sketch.quantile(quantile)
        distribution.axvline(value, color=color, linestyle="--", label=f"p{quantile * 100:g} = {value:.2f} ms")
    distribution.set_xscale("log")
    distribution.set_title(f"Latency distribution: {sketch.count} inferences")
    distribution.set_xlabel("latency (ms, log scale; bars are the sketch's 1% buckets)")
    distribution.set_ylabel("inferences")
    distribution.grid(True, alpha=0.3)
    distribution.legend()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output
