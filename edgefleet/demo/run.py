"""The main job: a three-device fleet on real pretrained models and real photos, end to end."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import grpc
import numpy as np

from edgefleet.agent.local_api import array_to_tensor, tensor_to_array
from edgefleet.cli.main import upload_requests
from edgefleet.common.serde import tensor_from_proto
from edgefleet.demo.processes import LocalFleet
from edgefleet.v1 import inference_pb2, inference_pb2_grpc, operator_pb2, operator_pb2_grpc

log = logging.getLogger(__name__)

MODEL_NAME = "efficientnet-lite0"
MODEL_VERSION = "1"
# Profiles of the demo fleet: name shown to the operator, shipped profile.
DEVICES = (("camera-01", "camera"), ("car-ecu-01", "car-ecu"), ("plc-01", "plc"))


@dataclass
class DeviceRun:
    name: str
    profile: str
    device_id: str
    socket: Path
    model: inference_pb2.LocalModel | None = None
    local_latencies_ms: list[float] | None = None
    predictions: list[dict[str, Any]] | None = None


def _say(message: str) -> None:
    print(message, flush=True)


def _upload(stub: operator_pb2_grpc.OperatorServiceStub, path: Path, variant_kind: str = "") -> operator_pb2.Model:
    import hashlib

    header = operator_pb2.UploadModelHeader(
        name=MODEL_NAME,
        version=MODEL_VERSION,
        size_bytes=path.stat().st_size,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        filename=path.name,
        variant_kind=variant_kind,
    )
    return stub.UploadModel(upload_requests(path, header, progress=False), timeout=300)


def _wait_serving(stub: operator_pb2_grpc.OperatorServiceStub, device_id: str, timeout_s: float) -> operator_pb2.Device:
    deadline = time.monotonic() + timeout_s
    while True:
        device = stub.GetDevice(operator_pb2.GetDeviceRequest(device_id=device_id), timeout=10)
        states = {m.model_name: m for m in device.models}
        status = states.get(MODEL_NAME)
        if status is not None and status.state == 5:  # MODEL_STATE_SERVING
            return device
        if status is not None and status.state == 6:  # MODEL_STATE_FAILED
            raise RuntimeError(f"device {device_id} failed to load {status.variant_id}: {status.error}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"device {device_id} did not serve {MODEL_NAME} within {timeout_s:g} s")
        time.sleep(0.3)


def _photo_inputs(model: inference_pb2.LocalModel) -> list[tuple[str, np.ndarray]]:
    from edgefleet.demo.images import demo_photos, preprocess

    spec = tensor_from_proto(model.inputs[0])
    return [(photo.name, preprocess(photo.image, spec)) for photo in demo_photos()]


def _run_inference(run: DeviceRun, duration_s: float) -> None:
    """Classify every photo once, then keep classifying them in turn for duration_s."""
    from edgefleet.demo.images import imagenet_labels

    labels = imagenet_labels()
    with grpc.insecure_channel(f"unix://{run.socket}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        models = stub.ListLocalModels(inference_pb2.ListLocalModelsRequest(), timeout=10).models
        run.model = next(m for m in models if m.model_name == MODEL_NAME)
        inputs = _photo_inputs(run.model)
        input_name = run.model.inputs[0].name
        run.predictions = []
        latencies: list[float] = []
        deadline = time.monotonic() + duration_s
        first_pass = True
        while first_pass or time.monotonic() < deadline:
            for photo_name, tensor in inputs:
                response = stub.Infer(
                    inference_pb2.InferRequest(model_name=MODEL_NAME, inputs=[array_to_tensor(input_name, tensor)]),
                    timeout=30,
                )
                latencies.append(response.latency_ms)
                if first_pass:
                    scores = tensor_to_array(response.outputs[0]).reshape(-1)
                    index = int(np.argmax(scores))
                    run.predictions.append({"image": photo_name, "class_index": index, "label": labels[index]})
            first_pass = False
        run.local_latencies_ms = latencies


def _query(stub: operator_pb2_grpc.OperatorServiceStub, device_id: str) -> operator_pb2.MetricRow | None:
    response = stub.QueryMetrics(
        operator_pb2.QueryMetricsRequest(device_id=device_id, model_name=MODEL_NAME, group_by=["device"]),
        timeout=10,
    )
    return response.rows[0] if response.rows else None


def _wait_for_metrics(stub: operator_pb2_grpc.OperatorServiceStub, runs: list[DeviceRun], timeout_s: float) -> None:
    """Wait until the orchestrator has every inference the demo made, as merged metric windows."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = [(_query(stub, r.device_id), len(r.local_latencies_ms or [])) for r in runs]
        if all(row is not None and row.inference_count >= local for row, local in counts):
            return
        time.sleep(0.5)
    log.warning("not every metric window reached the orchestrator within %.0f s", timeout_s)


def _report(runs: list[DeviceRun], stub: operator_pb2_grpc.OperatorServiceStub, address: str) -> dict[str, Any]:
    devices = []
    for run in runs:
        assert run.model is not None
        row = _query(stub, run.device_id)
        device = stub.GetDevice(operator_pb2.GetDeviceRequest(device_id=run.device_id), timeout=10)
        variant_format = "tflite" if run.model.runtime == "litert" else "onnx"
        devices.append(
            {
                "device_id": run.device_id,
                "name": run.name,
                "profile": run.profile,
                "hardware_class": device.hardware.hardware_class,
                "usable_cores": device.hardware.usable_cores,
                "memory_bytes": device.hardware.memory_total_bytes,
                "model": f"{run.model.model_name}:{run.model.model_version}",
                "variant_id": run.model.variant_id,
                "format": variant_format,
                "runtime": run.model.runtime,
                "providers": list(run.model.providers),
                "threads": run.model.threads,
                "inferences": row.inference_count if row else 0,
                "errors": row.error_count if row else 0,
                "throughput_per_s": round(row.throughput_per_s, 2) if row else 0.0,
                "p50_ms": round(row.p50_ms, 3) if row else 0.0,
                "p95_ms": round(row.p95_ms, 3) if row else 0.0,
                "p99_ms": round(row.p99_ms, 3) if row else 0.0,
                "local_p50_ms": round(float(np.percentile(run.local_latencies_ms or [0], 50)), 3),
                "predictions": run.predictions or [],
            }
        )
    return {"orchestrator": address, "model": f"{MODEL_NAME}:{MODEL_VERSION}", "devices": devices}


def _print_report(report: dict[str, Any]) -> None:
    from edgefleet.cli.views import table

    _say("")
    _say(f"Latency per device, from the orchestrator's merged sketches ({report['model']}):")
    _say(
        table(
            (
                "DEVICE",
                "PROFILE",
                "FORMAT",
                "RUNTIME",
                "PROVIDERS",
                "THREADS",
                "INFERENCES",
                "PER S",
                "P50 MS",
                "P95 MS",
                "P99 MS",
            ),
            [
                (
                    d["name"],
                    d["profile"],
                    d["format"],
                    d["runtime"],
                    ",".join(d["providers"]),
                    d["threads"],
                    d["inferences"],
                    d["throughput_per_s"],
                    d["p50_ms"],
                    d["p95_ms"],
                    d["p99_ms"],
                )
                for d in report["devices"]
            ],
        )
    )
    _say("")
    _say("Top-1 class per photo and device:")
    names = [d["name"] for d in report["devices"]]
    photos = [p["image"] for p in report["devices"][0]["predictions"]]
    rows = []
    for index, photo in enumerate(photos):
        rows.append(
            (
                photo,
                *[
                    f"{d['predictions'][index]['class_index']} {d['predictions'][index]['label']}"
                    for d in report["devices"]
                ],
            )
        )
    _say(table(("PHOTO", *[n.upper() for n in names]), rows))


def _compare_prometheus(stub: operator_pb2_grpc.OperatorServiceStub, port: int) -> dict[str, Any]:
    """Scrape the orchestrator's /metrics and compare its latency quantiles with QueryMetrics.

    /metrics merges the windows of its lookback (300 s by default) and the query requests the same
    range, so both merge the same stored sketches and should agree within the sketch's 1% error.
    """
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    scraped: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "edgefleet_inference_latency_ms":
            for sample in family.samples:
                scraped[(sample.labels["variant"], sample.labels["quantile"])] = sample.value
    request = operator_pb2.QueryMetricsRequest(model_name=MODEL_NAME, group_by=["variant"])
    request.start.FromDatetime(datetime.now(UTC) - timedelta(seconds=300))
    rows = []
    for row in stub.QueryMetrics(request, timeout=10).rows:
        variant = row.group["variant"]
        for quantile, queried in (("0.5", row.p50_ms), ("0.95", row.p95_ms), ("0.99", row.p99_ms)):
            value = scraped.get((variant, quantile))
            difference = None if value is None else abs(value - queried) / queried
            rows.append(
                {
                    "variant": variant,
                    "quantile": quantile,
                    "scraped_ms": value,
                    "query_ms": round(queried, 3),
                    "relative_difference": None if difference is None else round(difference, 5),
                }
            )
    return {"url": url, "rows": rows}


def _print_prometheus(comparison: dict[str, Any]) -> None:
    from edgefleet.cli.views import table

    _say("")
    _say(f"Prometheus {comparison['url']} against edgefleet metrics query (same windows, same sketches):")
    _say(
        table(
            ("VARIANT", "QUANTILE", "/METRICS MS", "QUERY MS", "DIFFERENCE"),
            [
                (
                    r["variant"],
                    r["quantile"],
                    "-" if r["scraped_ms"] is None else f"{r['scraped_ms']:.3f}",
                    f"{r['query_ms']:.3f}",
                    "missing" if r["relative_difference"] is None else f"{r['relative_difference']:.2%}",
                )
                for r in comparison["rows"]
            ],
        )
    )


def _ensure_models() -> tuple[Path, Path]:
    from edgefleet.demo.assets import ensure_efficientnet_lite0_onnx, ensure_efficientnet_lite0_tflite

    return ensure_efficientnet_lite0_onnx(), ensure_efficientnet_lite0_tflite()


def run_demo(*, report_path: Path | None, duration_s: float, work_dir: Path | None, json_output: bool = False) -> int:
    """Run the demo; return the process exit status. Every process it starts is stopped on return.

    With json_output the report goes to stdout as JSON, and the narration to stderr.
    """
    if not json_output:
        return _run_demo(report_path, duration_s, work_dir, report_stream=None)
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        return _run_demo(report_path, duration_s, work_dir, report_stream=stdout)


def _run_demo(report_path: Path | None, duration_s: float, work_dir: Path | None, report_stream: TextIO | None) -> int:
    from edgefleet.common.logs import configure_logging

    if duration_s <= 0:
        print(f"edgefleet demo: --duration must be positive, got {duration_s:g}", file=sys.stderr)
        return 2
    # Checked before anything starts: the report is written only after minutes of work.
    if work_dir is not None and work_dir.exists() and not work_dir.is_dir():
        print(
            f"edgefleet demo: invalid --work-dir {work_dir}: it exists and is not a directory; "
            "give a new or existing directory",
            file=sys.stderr,
        )
        return 2
    if report_path is not None and report_path.is_dir():
        print(
            f"edgefleet demo: invalid --report {report_path}: it is a directory; give a file path such as "
            f"{report_path / 'report.json'}",
            file=sys.stderr,
        )
        return 2
    configure_logging("warning")
    temporary = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="edgefleet-demo-")) if work_dir is None else work_dir
    fleet = LocalFleet(work)
    # SIGTERM ends the demo like Ctrl-C, so the finally block below stops every process.
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        _say("Preparing the pretrained EfficientNet-Lite0 (ONNX and TFLite) from the local cache...")
        onnx_path, tflite_path = _ensure_models()
        _say(f"Starting the orchestrator on embedded SQLite in {work} ...")
        metrics_port_file = work / "metrics.port"
        fleet.start_orchestrator(
            extra_args=("--metrics-listen", "127.0.0.1:0", "--metrics-port-file", str(metrics_port_file))
        )
        for name, profile in DEVICES:
            fleet.start_agent(name, profile)
        devices = fleet.wait_for_devices(len(DEVICES))
        by_name = {d.labels["name"]: d for d in devices}
        _say(
            f"Orchestrator on {fleet.address}; {len(devices)} devices online: "
            + ", ".join(f"{n} ({d.device_id})" for n, d in sorted(by_name.items()))
        )
        _say(f"Agents enrolled over mutual TLS with certificates of the fleet CA in {fleet.pki_dir}")
        with fleet.operator_channel() as channel:
            stub = operator_pb2_grpc.OperatorServiceStub(channel)
            model = _upload(stub, onnx_path)
            _upload(stub, tflite_path, variant_kind="tflite-fp32")
            _say(
                f"Added {MODEL_NAME}:{MODEL_VERSION}: {model.metadata.macs / 1e6:.0f}M MACs, "
                f"{model.metadata.parameters / 1e6:.2f}M parameters, ONNX {onnx_path.stat().st_size / 1e6:.1f} MB "
                f"and TFLite {tflite_path.stat().st_size / 1e6:.1f} MB"
            )
            runs = []
            for name, profile in DEVICES:
                device = by_name[name]
                response = stub.Deploy(
                    operator_pb2.DeployRequest(
                        model_name=MODEL_NAME, model_version=MODEL_VERSION, device_id=device.device_id
                    ),
                    timeout=30,
                )
                _wait_serving(stub, device.device_id, timeout_s=120)
                _say(f"Deployed {response.assignment.variant_id} to {name}")
                runs.append(
                    DeviceRun(name=name, profile=profile, device_id=device.device_id, socket=fleet.socket_of(name))
                )
            for run in runs:
                _say(f"Classifying photos on {run.name} for {duration_s:g} s ...")
                _run_inference(run, duration_s)
            _wait_for_metrics(stub, runs, timeout_s=30)
            report = _report(runs, stub, fleet.address)
            _print_report(report)
            report["prometheus"] = _compare_prometheus(stub, int(metrics_port_file.read_text()))
            _print_prometheus(report["prometheus"])
            from edgefleet.demo.rollouts import DemoDevice, run_rollouts

            demo_devices = {run.name: DemoDevice(run.name, run.device_id, run.socket) for run in runs}
            report["rollouts"] = run_rollouts(stub, onnx_path, tflite_path, demo_devices, work, _say)
        from edgefleet.demo.rollouts import print_rollouts

        print_rollouts(report["rollouts"], _say)
        if report_path is not None:
            report_path.parent.mkdir(parents=True, exist_ok=True)
            report_path.write_text(json.dumps(report, indent=2) + "\n")
            _say(f"\nReport written to {report_path}")
        if report_stream is not None:
            report_stream.write(json.dumps(report, indent=2) + "\n")
            report_stream.flush()
        return 0
    except KeyboardInterrupt:
        _say("\nInterrupted; stopping the fleet.")
        return 130
    except Exception as error:
        print(f"edgefleet demo failed: {error}", file=sys.stderr)
        print(f"Process logs are in {work}", file=sys.stderr)
        temporary = False
        return 1
    finally:
        fleet.stop()
        signal.signal(signal.SIGTERM, previous)
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
