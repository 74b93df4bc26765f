"""Prometheus metrics of the orchestrator: fleet gauges, ingest counters and fleet latency quantiles."""

from __future__ import annotations

import logging
import threading
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from edgefleet.common.serde import DEVICE_STATUS_NAMES
from edgefleet.common.sketch import LatencySketch
from edgefleet.orchestrator.config import resolve_listen_host
from edgefleet.orchestrator.store.engine import DatabaseUnavailable

if TYPE_CHECKING:
    from edgefleet.orchestrator.state import OrchestratorState

log = logging.getLogger(__name__)

QUANTILES = (0.5, 0.95, 0.99)


class Telemetry:
    """Counters that handlers increment, plus a collector that reads fleet state at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.registrations = Counter("edgefleet_registrations", "Device registrations accepted", registry=self.registry)
        self.rejected_registrations = Counter(
            "edgefleet_rejected_registrations", "Device registrations rejected", ["reason"], registry=self.registry
        )
        self.metric_batches = Counter(
            "edgefleet_metric_batches", "Metric batches received from agents", ["result"], registry=self.registry
        )
        self.metric_windows = Counter("edgefleet_metric_windows", "Metric windows stored", registry=self.registry)
        self.inferences_reported = Counter(
            "edgefleet_inferences_reported", "Inferences counted in stored metric windows", registry=self.registry
        )
        self.uploads = Counter("edgefleet_model_uploads", "Model uploads", ["result"], registry=self.registry)
        # Export every known label value from the start, so dashboards and rate() see zeros, not gaps.
        for result in ("stored", "duplicate"):
            self.metric_batches.labels(result)
        for result in ("stored", "rejected"):
            self.uploads.labels(result)
        self.rejected_registrations.labels("identity_conflict")
        self._server: ThreadingWSGIServer | None = None
        self._serving: threading.Thread | None = None

    def attach(self, state: OrchestratorState, lookback_s: float) -> None:
        """Register the collector that reads devices and latency windows from the store at each scrape."""
        self.registry.register(FleetCollector(state, lookback_s))

    def bind(self, address: str) -> int:
        """Bind and listen on HOST:PORT for /metrics without serving scrapes yet; return the bound port.

        Start-up binds before the store opens, so a port in use fails the start with nothing written.
        Scrapes that arrive before serve() wait in the listen backlog.
        """
        host, _, port = address.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"invalid metrics listen address {address!r}; expected HOST:PORT")
        # The address keeps the brackets of an IPv6 host ([::1]:9464), which getaddrinfo does not accept.
        host = host.removeprefix("[").removesuffix("]") or "0.0.0.0"
        family, *_, socket_address = resolve_listen_host(address, host, int(port), "--metrics-listen")[0]

        class Server(ThreadingWSGIServer):
            address_family = family

        try:
            self._server = make_server(
                str(socket_address[0]), int(port), make_wsgi_app(self.registry), Server, handler_class=_QuietHandler
            )
        except OSError as error:
            raise OSError(
                f"cannot listen on {address} (--metrics-listen): {error.strerror or error}; "
                "pick a free port or stop the process that holds it"
            ) from None
        return int(self._server.server_port)

    def serve(self) -> int:
        """Serve scrapes on the bound address from a daemon thread; return the bound port."""
        assert self._server is not None, "bind() first"
        self._serving = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._serving.start()
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is None:
            return
        # shutdown() waits for serve_forever to return, so it is only called once that runs.
        if self._serving is not None:
            self._server.shutdown()
            self._serving = None
        self._server.server_close()
        self._server = None


class _QuietHandler(WSGIRequestHandler):
    """Leaves scrapes out of stderr: Prometheus calls every few seconds."""

    def log_message(self, format: str, *args: object) -> None:
        pass


class FleetCollector(Collector):
    """Reads fleet state when Prometheus scrapes, so the figures are never older than the scrape."""

    def __init__(self, state: OrchestratorState, lookback_s: float, now: Callable[[], datetime] | None = None) -> None:
        self.state = state
        self.lookback_s = lookback_s
        self.now = now or (lambda: datetime.now(UTC))

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._devices()
            yield from self._latency()
        except DatabaseUnavailable as error:
            # Every scrape during a PostgreSQL outage gets here, so one line each, not a traceback.
            log.warning("collecting fleet metrics for /metrics failed: %s", error)
        except Exception:
            # A failed scrape must not take the exporter down; the error is in the log.
            log.exception("collecting fleet metrics for /metrics failed")

    def _devices(self) -> Iterator[Metric]:
        devices = self.state.store.list_devices()
        by_status: Tally[tuple[str, str]] = Tally()
        for device in devices:
            by_status[(self.state.hub.status_of(device), device.hardware.hardware_class)] += 1
        # Every status gets a series for each hardware class, 0 included, so that a sum over a
        # status reads 0 rather than "no data" when no device has it.
        for hardware_class in {hardware_class for _, hardware_class in by_status}:
            for status in DEVICE_STATUS_NAMES:
                by_status.setdefault((status, hardware_class), 0)
        gauge = GaugeMetricFamily(
            "edgefleet_devices", "Devices by status and hardware class", labels=["status", "hardware_class"]
        )
        for (status, hardware_class), count in sorted(by_status.items()):
            gauge.add_metric([status, hardware_class], count)
        yield gauge
        streams = GaugeMetricFamily("edgefleet_control_streams", "Control streams open on this orchestrator")
        streams.add_metric([], len(self.state.hub.sessions))
        yield streams
        rollouts = GaugeMetricFamily("edgefleet_rollouts", "Rollouts by state", labels=["state"])
        if self.state.rollouts is not None:
            for state, count in sorted(Tally(r.state for r in self.state.rollouts.list_rollouts()).items()):
                rollouts.add_metric([state], count)
        yield rollouts

    def _latency(self) -> Iterator[Metric]:
        start = self.now() - timedelta(seconds=self.lookback_s)
        windows = self.state.store.query_metric_windows(start=start)
        sketches: dict[tuple[str, str], LatencySketch] = defaultdict(LatencySketch)
        counts: Tally[tuple[str, str]] = Tally()
        errors: Tally[tuple[str, str]] = Tally()
        for window in windows:
            key = (window.model_name, window.variant_id)
            sketches[key].merge(LatencySketch.from_bytes(window.sketch))
            counts[key] += window.inference_count
            errors[key] += window.error_count

        labels = ["model", "variant"]
        latency = GaugeMetricFamily(
            "edgefleet_inference_latency_ms",
            f"Inference latency quantiles over the last {self.lookback_s:g} s, merged from device sketches",
            labels=[*labels, "quantile"],
        )
        rate = GaugeMetricFamily(
            "edgefleet_inferences_per_second",
            f"Inferences per second over the last {self.lookback_s:g} s",
            labels=labels,
        )
        error_rate = GaugeMetricFamily(
            "edgefleet_inference_errors_per_second",
            f"Failed inferences per second over the last {self.lookback_s:g} s",
            labels=labels,
        )

        for key in sorted(sketches):
            sketch = sketches[key]
            if sketch.count:
                for q in QUANTILES:
                    latency.add_metric([*key, f"{q:g}"], sketch.quantile(q))
            rate.add_metric(list(key), counts[key] / self.lookback_s)
            error_rate.add_metric(list(key), errors[key] / self.lookback_s)
        yield latency
        yield rate
        yield error_rate
