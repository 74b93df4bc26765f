"""Tests of the cost model: the analytic prior, calibration, the benchmark store and ExplainSelection."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from edgefleet.cli.main import main as cli_main
from edgefleet.common.hardware import HardwareProfile, RuntimeInfo
from edgefleet.common.models import ModelMetadata, TensorSpec
from edgefleet.common.sketch import LatencySketch
from edgefleet.orchestrator.costmodel import analytic
from edgefleet.orchestrator.costmodel.calibration import (
    GATE_CLASS,
    fleet_measurements,
    gate_measurements,
    gate_profile,
)
from edgefleet.orchestrator.costmodel.features import device_features, variant_features
from edgefleet.orchestrator.costmodel.predictor import AnalyticPredictor, CalibratedPredictor, Measurement
from edgefleet.orchestrator.costmodel.store import BenchmarkResult, SqlBenchmarkStore, benchmark_store
from edgefleet.orchestrator.domain import MetricWindow, ModelStatus, ModelVersion, Variant
from edgefleet.orchestrator.store import open_store
from edgefleet.orchestrator.store.base import NotFoundError, StoreError
from edgefleet.v1 import agent_pb2, common_pb2, operator_pb2
from tests.servers import (
    ControlStream,
    OrchestratorThread,
    hardware_message,
    linear_onnx,
    register,
    upload,
    wait_until,
)

pytest_plugins = ["tests.servers"]

GIB = 1 << 30
NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
StartOrchestrator = Callable[..., OrchestratorThread]
OpenStream = Callable[..., ControlStream]


def profile(
    hardware_class: str = "x86-2c", features: tuple[str, ...] = ("avx2", "fma"), **changes: Any
) -> HardwareProfile:
    base = HardwareProfile(
        cpu_model="Test CPU",
        architecture="x86_64",
        logical_cores=2,
        usable_cores=2.0,
        cpu_features=features,
        memory_total_bytes=4 * GIB,
        memory_available_bytes=2 * GIB,
        disk_free_bytes=10 * GIB,
        runtimes=(RuntimeInfo("onnxruntime", "1.32.0"), RuntimeInfo("litert", "2.3.0")),
        hardware_class=hardware_class,
    )
    return dataclasses.replace(base, **changes)


def variant(
    variant_id: str, macs: int = 300_000_000, precision: str = "fp32", fmt: str = "onnx", layers: int = 60
) -> Variant:
    metadata = ModelMetadata(
        format=fmt,
        inputs=(TensorSpec("image", "float32", (1, 3, 224, 224)),),
        outputs=(TensorSpec("logits", "float32", (1, 1000)),),
        opset=17,
        parameters=4_000_000,
        macs=macs,
        peak_activation_bytes=3_000_000,
        macs_by_op_type={"Conv": macs},
        precision=precision,
        layers=layers,
    )
    return Variant(
        variant_id=variant_id,
        model_name="net",
        model_version="1",
        kind="source",
        format=fmt,
        precision=precision,
        digest="sha256:" + "1" * 64,
        size_bytes=16_000_000,
        metadata=metadata,
    )


# Analytic prior


def test_prior_int8_not_faster_without_dot() -> None:
    device = device_features(profile(features=("avx2",)))
    fp32 = analytic.estimate(variant_features(variant("a").metadata, 1), device, 1)
    int8 = analytic.estimate(variant_features(variant("b", precision="int8").metadata, 1), device, 1)
    assert int8.p50_s >= fp32.p50_s


def test_prior_int8_faster_with_vnni() -> None:
    device = device_features(profile(features=("avx2", "avx512f", "avx512_vnni")))
    fp32 = analytic.estimate(variant_features(variant("a").metadata, 1), device, 1)
    int8 = analytic.estimate(variant_features(variant("b", precision="int8").metadata, 1), device, 1)
    assert int8.p50_s < fp32.p50_s


def test_prior_threads_capped_by_cores() -> None:
    device = device_features(profile(usable_cores=1.0))
    features = variant_features(variant("a").metadata, 1)
    assert analytic.estimate(features, device, 4).p50_s == analytic.estimate(features, device, 1).p50_s


def test_prior_more_macs_slower() -> None:
    device = device_features(profile())
    small = analytic.estimate(variant_features(variant("a", macs=10_000_000).metadata, 1), device, 1)
    large = analytic.estimate(variant_features(variant("b", macs=500_000_000).metadata, 1), device, 1)
    assert large.p50_s > small.p50_s


def test_prior_memory_grows_with_size() -> None:
    small = analytic.memory_bytes(variant_features(variant("a").metadata, 1_000_000))
    large = analytic.memory_bytes(variant_features(variant("a").metadata, 100_000_000))
    assert large > small


# Calibration


def true_p50(variant_: Variant, hardware_class: str, threads: int) -> float:
    """A synthetic ground truth that the prior gets wrong: 3x slower class, poor int8 and variant quirks."""
    base = 1.5 + variant_.metadata.macs / 40e6
    if hardware_class == "slow":
        base *= 3.0
    if variant_.precision == "int8":
        base *= 1.3
    quirk = 1.0 + 0.05 * (int(variant_.variant_id[1:]) % 3)
    speedup = 1.0 / (0.4 + 0.6 / threads)
    return base * quirk / speedup


def synthetic(variants: list[Variant], classes: list[str], threads: tuple[int, ...] = (1, 2)) -> list[Measurement]:
    return [
        Measurement(v.variant_id, c, n, true_p50(v, c, n), 1.2 * true_p50(v, c, n), 50, "benchmark")
        for v in variants
        for c in classes
        for n in threads
    ]


def relative_error(predicted: float, actual: float) -> float:
    return abs(predicted - actual) / actual


def test_calibration_improves_held_out() -> None:
    variants = [variant(f"v{i}", macs=50_000_000 * (i + 1), precision="int8" if i % 2 else "fp32") for i in range(8)]
    profiles = {"slow": profile("slow"), "fast": profile("fast")}
    held_out = variants[3]
    measurements = [m for m in synthetic(variants, ["slow", "fast"]) if m.variant_id != held_out.variant_id]
    calibrated = CalibratedPredictor(measurements, profiles=profiles, variants={v.variant_id: v for v in variants})
    prior = AnalyticPredictor()

    actual = true_p50(held_out, "slow", 2)
    prior_error = relative_error(prior.predict(profiles["slow"], held_out, 2).p50_ms, actual)
    calibrated_prediction = calibrated.predict(profiles["slow"], held_out, 2)
    calibrated_error = relative_error(calibrated_prediction.p50_ms, actual)

    assert calibrated_prediction.basis == "calibrated"
    assert calibrated_error < prior_error
    assert calibrated_error < 0.15


def test_calibration_learns_int8_slowdown() -> None:
    # On this class int8 measures slower than fp32, so the calibrated int8 prediction must be too.
    variants = [variant(f"v{i}", macs=100_000_000, precision="int8" if i % 2 else "fp32") for i in range(6)]
    held_fp32, held_int8 = variant("v10", macs=100_000_000), variant("v11", macs=100_000_000, precision="int8")
    known = {v.variant_id: v for v in [*variants, held_fp32, held_int8]}
    calibrated = CalibratedPredictor(
        synthetic(variants, ["slow"], (1,)), profiles={"slow": profile("slow")}, variants=known
    )
    fp32 = calibrated.predict(profile("slow"), held_fp32, 1).p50_ms
    int8 = calibrated.predict(profile("slow"), held_int8, 1).p50_ms
    assert int8 > fp32


# A synthetic table of latencies that is exactly multiplicative: a cost per variant times a speed per
# hardware class, a runtime and a precision factor per class (int8 is slower than fp32 on "avx2" and
# faster on "vnni") and a speed-up per class and thread count.
TABLE_CLASSES = {
    "avx2": profile("avx2", ("avx2", "fma")),
    "vnni": profile("vnni", ("avx2", "avx512f", "avx512_vnni"), usable_cores=4.0, logical_cores=4),
    "arm": profile("arm", ("neon", "dotprod"), architecture="aarch64", usable_cores=4.0, logical_cores=4),
}
TABLE_PROFILES = (("avx2", 1), ("avx2", 2), ("vnni", 1), ("vnni", 4), ("arm", 1), ("arm", 2))
CLASS_SPEED = {"avx2": 1.0, "vnni": 0.55, "arm": 2.4}
RUNTIME_SPEED = {("avx2", "onnx"): 1.0, ("avx2", "tflite"): 0.8, ("vnni", "onnx"): 1.0}
RUNTIME_SPEED |= {("vnni", "tflite"): 1.3, ("arm", "onnx"): 1.4, ("arm", "tflite"): 1.0}
INT8_FACTOR = {"avx2": 1.35, "vnni": 0.5, "arm": 0.8}
THREAD_FACTOR = {("avx2", 2): 0.62, ("vnni", 4): 0.35, ("arm", 2): 0.7}


def table_variants() -> list[Variant]:
    variants = []
    for i in range(12):
        fmt = "tflite" if i % 3 == 2 else "onnx"
        precision = "int8" if i % 3 == 1 else "fp32"
        variants.append(
            variant(f"t{i}", macs=(20 + 37 * i) * 1_000_000, precision=precision, fmt=fmt, layers=20 + 7 * i)
        )
    return variants


def table_p50(v: Variant, hardware_class: str, threads: int) -> float:
    # The variant's own cost departs from its MACs by up to +-40%, which the prior cannot know.
    cost = v.metadata.macs / 20e6 * (0.6 + 0.8 * ((int(v.variant_id[1:]) * 7) % 11) / 10)
    latency = cost * CLASS_SPEED[hardware_class] * RUNTIME_SPEED[(hardware_class, v.format)]
    if v.precision == "int8":
        latency *= INT8_FACTOR[hardware_class]
    return latency * THREAD_FACTOR.get((hardware_class, threads), 1.0)


def test_calibration_recovers_multiplicative_table() -> None:
    variants = table_variants()
    known = {v.variant_id: v for v in variants}
    table = [
        Measurement(v.variant_id, c, n, table_p50(v, c, n), 1.2 * table_p50(v, c, n), 50, "benchmark")
        for v in variants
        for c, n in TABLE_PROFILES
    ]
    errors = {}
    for index, held_out in enumerate(table):
        others = table[:index] + table[index + 1 :]
        predictor = CalibratedPredictor(others, profiles=TABLE_CLASSES, variants=known)
        predicted = predictor.predict(
            TABLE_CLASSES[held_out.hardware_class], known[held_out.variant_id], held_out.threads
        )
        errors[(held_out.variant_id, held_out.hardware_class, held_out.threads)] = relative_error(
            predicted.p50_ms, held_out.p50_ms
        )
    worst = max(errors, key=lambda key: errors[key])
    assert errors[worst] <= 0.10, f"{worst} predicted {errors[worst]:.1%} off"


def test_calibration_ignores_one_disturbed_measurement() -> None:
    # One pair measured 3x too slow (another process ran during it) must not drag the other variants.
    variants = table_variants()
    known = {v.variant_id: v for v in variants}
    table = [
        Measurement(v.variant_id, c, n, table_p50(v, c, n), 1.2 * table_p50(v, c, n), 50, "benchmark")
        for v in variants
        for c, n in TABLE_PROFILES
    ]
    disturbed = [
        dataclasses.replace(m, p50_ms=3 * m.p50_ms) if m.variant_id == "t0" and m.threads == 2 else m for m in table
    ]
    held_out = next(m for m in table if m.variant_id == "t3" and m.hardware_class == "avx2" and m.threads == 2)
    predictor = CalibratedPredictor([m for m in disturbed if m != held_out], profiles=TABLE_CLASSES, variants=known)
    predicted = predictor.predict(TABLE_CLASSES["avx2"], known["t3"], 2).p50_ms
    assert relative_error(predicted, held_out.p50_ms) <= 0.10


def test_measured_pair_uses_measurement() -> None:
    v = variant("v1")
    measurement = Measurement("v1", "x86-2c", 1, 7.5, 9.0, 50, "benchmark")
    predictor = CalibratedPredictor([measurement], profiles={"x86-2c": profile()}, variants={"v1": v})
    prediction = predictor.predict(profile(), v, 1)
    assert prediction.basis == "measured"
    assert prediction.p50_ms == pytest.approx(7.5)
    assert prediction.p95_ms == pytest.approx(9.0)


def test_threads_chosen_from_measurements() -> None:
    v = variant("v1")
    four_cores = profile(usable_cores=4.0, logical_cores=4)
    measured = [
        Measurement("v1", "x86-2c", n, latency, latency * 1.1, 50, "benchmark")
        for n, latency in {1: 10.0, 2: 6.0, 3: 5.9, 4: 5.8}.items()
    ]
    predictor = CalibratedPredictor(measured, profiles={"x86-2c": four_cores}, variants={"v1": v})
    prediction = predictor.predict(four_cores, v)
    assert prediction.threads == 2
    assert prediction.p50_ms == pytest.approx(6.0)


def test_unknown_variant_skipped() -> None:
    predictor = CalibratedPredictor(
        [Measurement("gone", "x86-2c", 1, 5.0, 6.0, 10, "benchmark")], profiles={"x86-2c": profile()}, variants={}
    )
    assert predictor.measurements == ()


def test_gate_measurements_parse() -> None:
    v = dataclasses.replace(variant("v1"), latency_ms={"threads=1": 8.0, "threads=2": 5.0, "other": 1.0})
    measurements = gate_measurements([v])
    assert sorted((m.threads, m.p50_ms) for m in measurements) == [(1, 8.0), (2, 5.0)]
    assert all(m.hardware_class == GATE_CLASS for m in measurements)
    assert all(math.isnan(m.p95_ms) for m in measurements)


def test_gate_profile_reads_flags(tmp_path: Any) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    gate = gate_profile(cpuinfo)
    assert gate.cpu_features == ("avx2", "avx512_vnni", "avx512f")
    assert gate.hardware_class == GATE_CLASS


# Stores


def stored_variant(store: Any, variant_id: str = "net-1-source") -> Variant:
    source = dataclasses.replace(variant(variant_id), variant_id=variant_id)
    model = ModelVersion("net", "1", source.digest, source.size_bytes, source.metadata, NOW)
    store.add_model_version(model, source)
    return source


def register_device(store: Any, device_id: str = "dev-1", hardware_class: str = "x86-2c") -> None:
    store.register_device(
        device_id=device_id,
        instance_key_hash="a" * 64,
        hardware=profile(hardware_class),
        labels={},
        agent_version="0.1.0",
        peer="ipv4:127.0.0.1:1",
        now=NOW,
    )


def result(**changes: Any) -> BenchmarkResult:
    base = BenchmarkResult("net-1-source", "dev-1", "x86-2c", "onnxruntime", 1, 5.0, 6.0, 20, NOW)
    return dataclasses.replace(base, **changes)


def test_benchmark_store_roundtrip(db_url: str) -> None:
    store = open_store(db_url)
    try:
        stored_variant(store)
        register_device(store)
        benchmarks = SqlBenchmarkStore(store.engine)  # type: ignore[attr-defined]

        added = benchmarks.add_results([result(), result(threads=2, p50_ms=3.0, measured_at=NOW + timedelta(1))])

        assert added == 2
        assert [r.threads for r in benchmarks.list_results(variant_ids=["net-1-source"])] == [1, 2]
        assert benchmarks.list_results(hardware_class="x86-2c")[0] == result()
        assert benchmarks.list_results(device_id="other") == []
    finally:
        store.close()


def test_benchmark_store_unknown_variant(db_url: str) -> None:
    store = open_store(db_url)
    try:
        register_device(store)
        benchmarks = SqlBenchmarkStore(store.engine)  # type: ignore[attr-defined]
        with pytest.raises(NotFoundError, match="variants \\['net-1-source'\\] not found"):
            benchmarks.add_results([result()])
        assert benchmarks.list_results() == []
    finally:
        store.close()


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"threads": 0}, "threads=0"), ({"p50_ms": math.nan}, "p50_ms=nan"), ({"runs": 0}, "runs=0")],
)
def test_benchmark_store_invalid(tmp_path: Any, changes: dict[str, Any], message: str) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        benchmarks = SqlBenchmarkStore(store.engine)  # type: ignore[attr-defined]
        with pytest.raises(StoreError, match=message):
            benchmarks.add_results([result(**changes)])
    finally:
        store.close()


def test_fleet_measurements_from_windows(tmp_path: Any) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        source = stored_variant(store)
        register_device(store)
        store.save_reported_state(
            "dev-1",
            1,
            [ModelStatus("dev-1", "net", "1", source.variant_id, source.digest, "serving", threads=2)],
            NOW,
        )
        sketch = LatencySketch()
        for i in range(100):
            sketch.add(10.0 + i % 10)
        window = MetricWindow("dev-1", "net", "1", source.variant_id, "x86-2c", NOW, 10, NOW, 100, 0, sketch.to_bytes())
        store.add_metric_batch("dev-1", "batch-1", [window])

        measurements = fleet_measurements(store, [source.variant_id], now=NOW + timedelta(minutes=1))

        assert len(measurements) == 1
        assert measurements[0].threads == 2
        assert measurements[0].hardware_class == "x86-2c"
        assert measurements[0].p50_ms == pytest.approx(14.0, rel=0.05)
        assert measurements[0].runs == 100
    finally:
        store.close()


# ExplainSelection over gRPC and the CLI


def close_stream(orchestrator: OrchestratorThread, stream: ControlStream, device_id: str) -> None:
    """Close a control stream and wait until the orchestrator has recorded the disconnect."""
    stream.close()

    def disconnected() -> bool:
        device = orchestrator.state.store.get_device(device_id)
        return device is not None and not device.connected

    wait_until(disconnected, "the orchestrator to record the closed stream")


def explain(orchestrator: OrchestratorThread, device_id: str, **fields: Any) -> operator_pb2.ExplainSelectionResponse:
    request = operator_pb2.ExplainSelectionRequest(model_name="linear", device_id=device_id, **fields)
    return orchestrator.operator.ExplainSelection(request, timeout=30)


def onnx_only_device(orchestrator: OrchestratorThread) -> tuple[str, str]:
    runtimes = [common_pb2.Runtime(name="onnxruntime", version="1.32.0", providers=["CPUExecutionProvider"])]
    return register(orchestrator.agent, hardware=hardware_message(runtimes=runtimes))


def test_explain_grpc(orchestrator: OrchestratorThread) -> None:
    device_id, _ = onnx_only_device(orchestrator)
    model = upload(orchestrator, linear_onnx(seed=0), "linear", "1")

    response = explain(orchestrator, device_id)

    assert response.chosen_variant_id == model.variants[0].variant_id
    assert len(response.candidates) == 1
    candidate = response.candidates[0]
    assert candidate.chosen
    assert candidate.reason.startswith("chosen")
    assert candidate.basis == "analytic"
    assert candidate.predicted_p95_ms >= candidate.predicted_p50_ms > 0
    assert candidate.predicted_memory_bytes > 0
    assert response.threads == candidate.threads >= 1
    assert response.hardware_class


def test_explain_ranked_accuracy(orchestrator: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    """The source ranks as 1.0 (no drop) against an int8 variant measured as agreement with it, as the table shows."""
    device_id, _ = onnx_only_device(orchestrator)
    upload(orchestrator, linear_onnx(seed=0), "linear", "1")
    source = orchestrator.state.store.get_variant("linear:1:source")
    orchestrator.state.store.add_variant(
        dataclasses.replace(
            source,
            variant_id="linear:1:int8",
            kind="int8",
            precision="int8",
            accuracy=0.95,
            accuracy_metric="top1_agreement",
            accuracy_drop=5.0,
        )
    )
    capsys.readouterr()

    ranked = {c.variant.variant_id: c.ranked_accuracy for c in explain(orchestrator, device_id).candidates}
    code = cli_main(
        ["--orchestrator", orchestrator.address, "--insecure", "explain", "--model", "linear", "--device", device_id]
    )
    table = capsys.readouterr().out

    assert ranked == {"linear:1:source": 1.0, "linear:1:int8": pytest.approx(0.95)}
    assert code == 0
    source_row = next(line for line in table.splitlines() if "linear:1:source " in line and " onnx " in line)
    int8_row = next(line for line in table.splitlines() if "linear:1:int8 " in line)
    assert " 0.00 " in source_row
    assert " 5.00 " in int8_row


def test_explain_budget_excludes(orchestrator: OrchestratorThread) -> None:
    device_id, _ = onnx_only_device(orchestrator)
    upload(orchestrator, linear_onnx(seed=0), "linear", "1")
    response = explain(orchestrator, device_id, budget_ms=1e-6)
    assert response.chosen_variant_id == ""
    assert response.candidates[0].reason.startswith("predicted p95 over the budget")


def test_explain_unknown_device(orchestrator: OrchestratorThread) -> None:
    upload(orchestrator, linear_onnx(seed=0), "linear", "1")
    with pytest.raises(grpc.RpcError) as caught:
        explain(orchestrator, "no-such-device")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_explain_negative_budget(orchestrator: OrchestratorThread) -> None:
    device_id, _ = onnx_only_device(orchestrator)
    with pytest.raises(grpc.RpcError) as caught:
        explain(orchestrator, device_id, budget_ms=-1.0)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_explain_uses_benchmark_report(orchestrator: OrchestratorThread, open_stream: OpenStream) -> None:
    device_id, key = onnx_only_device(orchestrator)
    model = upload(orchestrator, linear_onnx(seed=0), "linear", "1")
    variant_id = model.variants[0].variant_id
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key)
    report = agent_pb2.BenchmarkReport(
        variant_id=variant_id,
        runtime="onnxruntime",
        by_threads=[
            agent_pb2.ThreadLatency(threads=1, p50_ms=4.0, p95_ms=5.0, runs=30),
            agent_pb2.ThreadLatency(threads=2, p50_ms=3.9, p95_ms=4.8, runs=30),
        ],
    )
    stream.send(agent_pb2.AgentMessage(benchmark=report))
    benchmarks = benchmark_store(orchestrator.state)
    wait_until(lambda: len(benchmarks.list_results(device_id=device_id)) == 2, "the benchmark report to be stored")

    candidate = explain(orchestrator, device_id).candidates[0]

    assert candidate.basis == "measured"
    assert candidate.threads == 1  # 2 threads gain only 3%, so the extra thread is not worth it.
    assert candidate.predicted_p50_ms == pytest.approx(4.0)
    assert candidate.predicted_p95_ms == pytest.approx(5.0)
    close_stream(orchestrator, stream, device_id)


def test_benchmark_report_unknown_variant_kept_stream(
    orchestrator: OrchestratorThread, open_stream: OpenStream
) -> None:
    device_id, key = onnx_only_device(orchestrator)
    stream = open_stream(orchestrator.agent)
    stream.hello(device_id, key)
    bad = agent_pb2.BenchmarkReport(
        variant_id="no-such-variant", by_threads=[agent_pb2.ThreadLatency(threads=1, p50_ms=1.0, p95_ms=1.0, runs=1)]
    )
    stream.send(agent_pb2.AgentMessage(benchmark=bad))
    stream.heartbeat(1)
    assert stream.receive_kind("heartbeat_ack").heartbeat_ack.sequence == 1
    close_stream(orchestrator, stream, device_id)


def test_explain_cli_json(orchestrator: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    device_id, _ = onnx_only_device(orchestrator)
    model = upload(orchestrator, linear_onnx(seed=0), "linear", "1")
    capsys.readouterr()

    code = cli_main(
        [
            "--orchestrator",
            orchestrator.address,
            "--insecure",
            "explain",
            "--model",
            "linear:1",
            "--device",
            device_id,
            "--budget-ms",
            "1000",
            "-o",
            "json",
        ]
    )

    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert data["chosen_variant_id"] == model.variants[0].variant_id
    assert data["budget_ms"] == 1000
    assert data["candidates"][0]["chosen"] is True
    assert data["candidates"][0]["predicted_p95_ms"] > 0


def test_explain_cli_table(orchestrator: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    device_id, _ = onnx_only_device(orchestrator)
    model = upload(orchestrator, linear_onnx(seed=0), "linear", "1")
    capsys.readouterr()

    code = cli_main(
        ["--orchestrator", orchestrator.address, "--insecure", "explain", "--model", "linear", "--device", device_id]
    )

    output = capsys.readouterr().out
    assert code == 0
    assert f"chosen: {model.variants[0].variant_id} with " in output
    assert " with 1 threads" not in output
    assert "P95 MS" in output
    assert "most accurate runnable variant" in output


def test_explain_cli_not_found(orchestrator: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(
        ["--orchestrator", orchestrator.address, "--insecure", "explain", "--model", "linear", "--device", "nope"]
    )
    assert code == 3
    assert "not found" in capsys.readouterr().err
