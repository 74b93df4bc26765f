"""Latency recording into per-window sketches, which the agent then buffers and delivers in batches."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from edgefleet.common.sketch import LatencySketch
from edgefleet.v1 import common_pb2

log = logging.getLogger(__name__)

# Completed windows kept in memory between two moves to the agent's disk buffer (edgefleet.agent.buffer);
# the oldest are dropped past this bound.
MAX_BUFFERED_WINDOWS = 10_000


@dataclass
class _Window:
    start_s: int  # Unix time, a multiple of the window length.
    sketch: LatencySketch = field(default_factory=LatencySketch)
    errors: int = 0
    rejected: int = 0  # Calls whose input was rejected: counted and failed, with no latency.


class MetricsRecorder:
    """Collects latencies per (model, version, variant) into fixed, wall-clock-aligned windows.

    record() takes a lock and adds to a sketch; a window is closed when the first sample of a
    later window arrives or when drain() finds it over.
    """

    def __init__(self, window_s: float = 10.0) -> None:
        if not 1 <= window_s <= 3600:
            raise ValueError(f"metrics window {window_s} s is out of range; use 1 to 3600 seconds")
        self.window_s = int(window_s)
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str, str], _Window] = {}
        self._closed: deque[common_pb2.MetricWindow] = deque()
        self.dropped_windows = 0

    def record(self, model: str, version: str, variant_id: str, latency_ms: float | None, ok: bool = True) -> None:
        """Add one inference's latency; cheap enough for every call (see bench/bench_sketch.py).

        A latency of None is a call rejected before the runtime ran: it counts as a failed
        inference but stays out of the latency sketch, so rejected calls cannot pull p50 down.
        """
        start = int(time.time()) // self.window_s * self.window_s
        key = (model, version, variant_id)
        with self._lock:
            window = self._open.get(key)
            if window is None or window.start_s != start:
                if window is not None:
                    self._close(key, window)
                window = self._open[key] = _Window(start)
            if latency_ms is None:
                window.rejected += 1
                window.errors += 1
                return
            window.sketch.add(latency_ms)
            if not ok:
                window.errors += 1

    def _close(self, key: tuple[str, str, str], window: _Window) -> None:
        message = common_pb2.MetricWindow(
            model_name=key[0],
            model_version=key[1],
            variant_id=key[2],
            window_seconds=self.window_s,
            inference_count=window.sketch.count + window.rejected,
            error_count=window.errors,
            latency=window.sketch.to_proto(),
        )
        message.window_start.FromSeconds(window.start_s)
        if len(self._closed) >= MAX_BUFFERED_WINDOWS:
            self._closed.popleft()
            self.dropped_windows += 1
            if self.dropped_windows in (1, 10, 100) or self.dropped_windows % 1000 == 0:
                log.warning("metric buffer full: dropped %d windows so far", self.dropped_windows)
        self._closed.append(message)

    def drain(self, *, include_open: bool = False, limit: int = 1000) -> list[common_pb2.MetricWindow]:
        """Close finished windows (all windows with include_open) and return up to limit closed ones, oldest first."""
        now_start = int(time.time()) // self.window_s * self.window_s
        with self._lock:
            for key, window in list(self._open.items()):
                if include_open or window.start_s < now_start:
                    self._close(key, window)
                    del self._open[key]
            count = min(limit, len(self._closed))
            windows = [self._closed.popleft() for _ in range(count)]
        return windows
