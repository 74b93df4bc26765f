"""Measure what a metrics query costs as the stored latency windows grow.

Fills a store with one 10 s window per device and minute-of-operation for a model, as agents upload
them, and times the QueryMetrics handler (the code behind `edgefleet metrics query`) over the whole
range: fleet-wide, grouped by device, and in hourly buckets. Every window's sketch is merged at
query time, so the time grows with the windows in the range. A second run of each query under
tracemalloc gives the peak memory the query allocated, which should not grow with the windows.

The store is SQLite in a temporary directory unless --db names another SQLAlchemy URL (a PostgreSQL
database to fill, for example). The figures are for the orchestrator process alone: no gRPC.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from common import machine_line
from sqlalchemy.engine import make_url

from edgefleet.common.hardware import HardwareProfile, RuntimeInfo
from edgefleet.common.sketch import LatencySketch
from edgefleet.orchestrator.artifacts import FileArtifactStore
from edgefleet.orchestrator.config import OrchestratorConfig
from edgefleet.orchestrator.domain import MetricWindow
from edgefleet.orchestrator.fleet import FleetHub
from edgefleet.orchestrator.handlers.metrics import query_metrics
from edgefleet.orchestrator.limits import OrchestratorLimits
from edgefleet.orchestrator.state import OrchestratorState
from edgefleet.orchestrator.store import Store, open_store
from edgefleet.v1 import operator_pb2

WINDOW_SECONDS = 10
WINDOWS_PER_BATCH = 60  # An agent uploads about ten minutes of windows at once after an outage.
HARDWARE = HardwareProfile(
    cpu_model="bench cpu",
    architecture="x86_64",
    logical_cores=2,
    usable_cores=2.0,
    cpu_features=("avx2",),
    memory_total_bytes=2 << 30,
    memory_available_bytes=1 << 30,
    disk_free_bytes=10 << 30,
    runtimes=(RuntimeInfo("onnxruntime", "1.20.0", ("CPUExecutionProvider",)),),
    profile_name="car-ecu",
)


def sample_sketches(count: int, samples: int) -> list[bytes]:
    """Return count serialized sketches of samples log-normal latencies around 7 ms each."""
    rng = np.random.default_rng(0)
    sketches = []
    for _ in range(count):
        sketch = LatencySketch()
        for value in rng.lognormal(np.log(7.0), 0.3, samples):
            sketch.add(float(value))
        sketches.append(sketch.to_bytes())
    return sketches


def fill(store: Store, devices: int, hours: float, start: datetime) -> int:
    """Register devices and store their windows from start on; return the number of windows."""
    sketches = sample_sketches(32, 200)
    per_device = int(hours * 3600 / WINDOW_SECONDS)
    for index in range(devices):
        device_id = f"bench-{index:05d}"
        store.register_device(
            device_id=device_id,
            instance_key_hash="0" * 64,
            hardware=HARDWARE,
            labels={},
            agent_version="bench",
            peer="bench",
            now=start,
        )
        for first in range(0, per_device, WINDOWS_PER_BATCH):
            windows = [
                MetricWindow(
                    device_id=device_id,
                    model_name="classifier",
                    model_version="1",
                    variant_id="classifier:1:source",
                    hardware_class="bench",
                    window_start=start + timedelta(seconds=WINDOW_SECONDS * k),
                    window_seconds=WINDOW_SECONDS,
                    received_at=start + timedelta(seconds=WINDOW_SECONDS * (k + 1)),
                    inference_count=200,
                    error_count=0,
                    sketch=sketches[k % len(sketches)],
                )
                for k in range(first, min(first + WINDOWS_PER_BATCH, per_device))
            ]
            store.add_metric_batch(device_id, f"{device_id}-{first}", windows)
    return devices * per_device


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=50, help="devices that uploaded windows")
    parser.add_argument("--hours", type=float, default=6.0, help="hours of 10 s windows per device")
    parser.add_argument("--db", help="SQLAlchemy URL of an empty database to fill (default: a temporary SQLite file)")
    args = parser.parse_args()
    print(machine_line())

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        store = open_store(args.db or f"sqlite:///{directory / 'bench.db'}")
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=args.hours)
        began = time.perf_counter()
        windows = fill(store, args.devices, args.hours, start)
        print(
            f"stored {windows} windows ({args.devices} devices x {args.hours:g} h) in "
            f"{time.perf_counter() - began:.1f} s on {make_url(args.db).get_backend_name() if args.db else 'sqlite'}"
        )

        config = OrchestratorConfig(data_dir=directory)
        hub = FleetHub(store, stale_after_s=30, offline_after_s=90, max_clock_skew_s=config.max_clock_skew_s)
        state = OrchestratorState(
            config=config,
            store=store,
            hub=hub,
            artifacts=FileArtifactStore(directory / "artifacts"),
            limits=OrchestratorLimits.from_config(config),
        )
        queries = {
            "fleet": operator_pb2.QueryMetricsRequest(model_name="classifier"),
            "by device": operator_pb2.QueryMetricsRequest(model_name="classifier", group_by=["device"]),
            "hourly": operator_pb2.QueryMetricsRequest(model_name="classifier", bucket_seconds=3600),
        }
        print(f"{'QUERY':<10} {'ROWS':>6} {'WINDOWS':>9} {'SECONDS':>8} {'US/WINDOW':>10} {'PEAK MIB':>9}")
        for name, request in queries.items():
            began = time.perf_counter()
            response = query_metrics(request, state)
            elapsed = time.perf_counter() - began
            tracemalloc.start()
            query_metrics(request, state)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            merged = sum(row.inference_count for row in response.rows) // 200
            print(
                f"{name:<10} {len(response.rows):>6} {merged:>9} {elapsed:>8.2f} {elapsed / merged * 1e6:>10.1f} "
                f"{peak / 2**20:>9.1f}"
            )
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
