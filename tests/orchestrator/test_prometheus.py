"""The orchestrator's Prometheus endpoint, scraped over real HTTP from a real orchestrator process."""

from __future__ import annotations

import random
import socket
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.common.hardware import HardwareProfile, RuntimeInfo
from edgefleet.common.serde import hardware_to_proto
from edgefleet.common.sketch import LatencySketch
from edgefleet.demo.processes import LocalFleet
from edgefleet.v1 import agent_pb2, agent_pb2_grpc, common_pb2, operator_pb2, operator_pb2_grpc

HARDWARE = HardwareProfile(
    cpu_model="test cpu",
    architecture="x86_64",
    logical_cores=2,
    usable_cores=2.0,
    cpu_features=("avx2",),
    memory_total_bytes=2 << 30,
    memory_available_bytes=1 << 30,
    disk_free_bytes=10 << 30,
    runtimes=(RuntimeInfo("onnxruntime", "1.0", ("CPUExecutionProvider",)),),
    profile_name="car-ecu",
)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalFleet, int]]:
    work: Path = tmp_path_factory.mktemp("prometheus")
    # Plaintext: the test registers devices with made-up ids, which mutual TLS would reject.
    fleet = LocalFleet(work, secure=False)
    port_file = work / "metrics.port"
    fleet.start_orchestrator(extra_args=("--metrics-listen", "127.0.0.1:0", "--metrics-port-file", str(port_file)))
    try:
        yield fleet, int(port_file.read_text())
    finally:
        fleet.stop()


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def register(channel: grpc.Channel, device_id: str) -> None:
    agent_pb2_grpc.AgentServiceStub(channel).Register(
        agent_pb2.RegisterRequest(
            device_id=device_id, instance_key=f"key-of-{device_id}-0123456789", hardware=hardware_to_proto(HARDWARE)
        ),
        timeout=10,
    )


def window(values: list[float], variant_id: str) -> common_pb2.MetricWindow:
    sketch = LatencySketch()
    for value in values:
        sketch.add(value)
    message = common_pb2.MetricWindow(
        model_name="net",
        model_version="1",
        variant_id=variant_id,
        window_seconds=10,
        inference_count=len(values),
        latency=sketch.to_proto(),
    )
    message.window_start.FromDatetime(datetime.now(UTC))
    return message


def test_scrape_reports_devices_and_quantiles(fleet: tuple[LocalFleet, int]) -> None:
    local, port = fleet
    rng = random.Random(7)
    with grpc.insecure_channel(local.address) as channel:
        for device_id in ("prom-a", "prom-b"):
            register(channel, device_id)
            values = [rng.lognormvariate(3.0, 0.4) for _ in range(500)]
            agent_pb2_grpc.AgentServiceStub(channel).UploadMetrics(
                agent_pb2.UploadMetricsRequest(
                    device_id=device_id, batch_id=f"batch-{device_id}", windows=[window(values, "net:1:source")]
                ),
                timeout=10,
            )
        rows = operator_pb2_grpc.OperatorServiceStub(channel).QueryMetrics(
            operator_pb2.QueryMetricsRequest(model_name="net", group_by=["model", "variant"]), timeout=10
        ).rows

    samples = scrape(port)
    devices = {labels["status"]: value for labels, value in samples["edgefleet_devices"]}
    assert sum(devices.values()) == 2
    # Statuses that no device has are exported as 0, so dashboards sum them to 0, not "no data".
    assert set(devices) == {"online", "stale", "offline"}
    quantiles = {
        labels["quantile"]: value
        for labels, value in samples["edgefleet_inference_latency_ms"]
        if labels["variant"] == "net:1:source"
    }
    assert len(rows) == 1
    # Both sides merge the same stored sketches, so they agree within the sketch's 1% error.
    assert quantiles["0.5"] == pytest.approx(rows[0].p50_ms, rel=0.01)
    assert quantiles["0.95"] == pytest.approx(rows[0].p95_ms, rel=0.01)
    assert quantiles["0.99"] == pytest.approx(rows[0].p99_ms, rel=0.01)
    assert samples["edgefleet_metric_windows_total"][0][1] == 2
    assert samples["edgefleet_registrations_total"][0][1] == 2


def test_duplicate_batch_is_counted_as_duplicate(fleet: tuple[LocalFleet, int]) -> None:
    local, port = fleet
    with grpc.insecure_channel(local.address) as channel:
        register(channel, "prom-c")
        request = agent_pb2.UploadMetricsRequest(
            device_id="prom-c", batch_id="same-batch", windows=[window([5.0, 6.0], "net:1:source")]
        )
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        stub.UploadMetrics(request, timeout=10)
        stub.UploadMetrics(request, timeout=10)
    batches = {labels["result"]: value for labels, value in scrape(port)["edgefleet_metric_batches_total"]}
    assert batches["duplicate"] >= 1


def ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback_works(), reason="this host cannot bind ::1")
def test_metrics_listen_on_ipv6_in_brackets(tmp_path: Path) -> None:
    local = LocalFleet(tmp_path, secure=False)
    port_file = tmp_path / "metrics.port"
    local.start_orchestrator(extra_args=("--metrics-listen", "[::1]:0", "--metrics-port-file", str(port_file)))
    try:
        port = int(port_file.read_text())
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=10) as response:
            status = response.status
            text = response.read().decode()
    finally:
        local.stop()

    assert status == 200
    assert "edgefleet_registrations_total" in text


def test_metrics_listen_empty_host_logged(tmp_path: Path) -> None:
    local = LocalFleet(tmp_path, secure=False)
    port_file = tmp_path / "metrics.port"
    local.start_orchestrator(extra_args=("--metrics-listen", ":0", "--metrics-port-file", str(port_file)))
    try:
        port = int(port_file.read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            status = response.status
        log_text = local.orchestrator.log_path.read_text()
    finally:
        local.stop()

    assert status == 200
    assert f"Prometheus metrics on http://0.0.0.0:{port}/metrics" in log_text
