"""edgefleet metrics plot: latency over time and its distribution, drawn to a PNG with matplotlib."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from edgefleet.common.sketch import LatencySketch
from edgefleet.v1 import operator_pb2

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def bucket_bounds(index: int, gamma: float) -> tuple[float, float]:
    """Return the (low, high] latency range in ms of sketch bucket index."""
    return gamma ** (index - 1), gamma**index


def output_path(path: Path) -> Path:
    """Return the file that --out names, with .png added when it has no suffix.

    matplotlib picks the image format from the suffix and adds .png itself to a name without one, so the
    returned path is the file that plot_latency writes. Raises ValueError, naming the path and the fix,
    for a directory or a suffix that matplotlib cannot write.
    """
    from matplotlib.backend_bases import FigureCanvasBase

    if path.is_dir():
        raise ValueError(f"invalid --out {path}: it is a directory; give a file path such as {path / 'latency.png'}")
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    image_format = path.suffix[1:].lower()
    supported = sorted(FigureCanvasBase.get_supported_filetypes())
    if image_format not in supported:
        raise ValueError(
            f"invalid --out {path}: matplotlib cannot write .{image_format} files; use .png or one of "
            f"{', '.join('.' + name for name in supported)}"
        )
    return path


def plot_latency(
    series: list[operator_pb2.MetricRow], overall: operator_pb2.MetricRow, title: str, output: Path
) -> Path:
    """Draw p50/p95/p99 per time bucket above the histogram of the merged sketch, and return the image path.

    Raises OSError when the file or its folder cannot be written.
    """
    import matplotlib.pyplot as plt

    figure = latency_figure(series, overall, title)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(output, dpi=110)
    finally:
        plt.close(figure)
    return output


def latency_figure(series: list[operator_pb2.MetricRow], overall: operator_pb2.MetricRow, title: str) -> Figure:
    """Build the figure of plot_latency: latency over time on top, the merged distribution below."""
    import matplotlib

    matplotlib.use("Agg")  # No display: render straight to a file.
    import matplotlib.dates as mdates
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
    # Figure.autofmt_xdate hides the tick labels of every axes but the bottom one, which here is the
    # distribution, so the time axis formats its own labels.
    locator = mdates.AutoDateLocator()
    over_time.xaxis.set_major_locator(locator)
    over_time.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))

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
    return figure
