"""The demo's rollouts: version 2 with a compressed int8 variant in waves, then a slow version that is rolled back."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edgefleet.agent.local_api import array_to_tensor
from edgefleet.cli.main import upload_requests
from edgefleet.common.serde import tensor_from_proto
from edgefleet.v1 import inference_pb2, inference_pb2_grpc, operator_pb2, operator_pb2_grpc

log = logging.getLogger(__name__)

MODEL_NAME = "efficientnet-lite0"
TARGET = {"fleet": "demo"}
# Short waits and few samples keep the demo to a few minutes on two cores. A p95 of 100 samples is
# the 95th of them, so the first slow calls after a model loads do not decide it alone.
MIN_SAMPLES = 100
# The slow version takes several hundred ms per call; 20 samples show that as clearly.
SLOW_MIN_SAMPLES = 20
# A device benchmarks a variant after it installs it; inference during that benchmark shares its cores.
BENCHMARK_WAIT_S = 60.0
# Times the demo accepts a wave that paused on a p95 regression, as an operator would with resume.
MAX_RESUMES = 2
SAMPLE_TIMEOUT_S = 120.0
ROLLOUT_TIMEOUT_S = 300.0
JOB_TIMEOUT_S = 600.0
BURST = 8  # Inferences per burst on a device of the waiting wave.
# EfficientNet-Lite maps 0..255 pixels with (pixel - 127) / 128; see edgefleet.demo.images.
PREPROCESS = {"scale": 1.0, "mean": [127.0, 127.0, 127.0], "std": [128.0, 128.0, 128.0]}
# int8 on the 100 evaluation crops of 4 photos: one changed top-1 class costs 1 point of agreement.
INT8_RECIPE = {
    "quantize": {
        "method": "static",
        "calibration": {"images": "builtin:demo-photos", "preprocess": PREPROCESS},
        "calibration_size": 32,
    },
    "gate": {
        "max_accuracy_drop": 25.0,
        "evaluation": {"images": "builtin:demo-photos", "preprocess": PREPROCESS},
        "runtimes": ["onnxruntime"],
        "threads": [1],
    },
}
# The slow version: each input pixel is upsampled by this factor on both axes and run through
# elementwise operators before pooling back. The cost model counts no MACs for these operators, so
# it predicts the slow version as fast as the original while it runs several times slower.
SLOW_UPSAMPLE = 8
ROLLOUT_STATES = ("pending", "running", "paused", "succeeded", "rolling_back", "rolled_back", "aborted", "superseded")
WAVE_DECISIONS = ("waiting", "proceed", "pause", "rollback")
FINAL_STATES = frozenset({"paused", "succeeded", "rolled_back", "aborted", "superseded"})


@dataclass(frozen=True)
class DemoDevice:
    name: str
    device_id: str
    socket: Path


Say = Callable[[str], None]


def _upload(
    stub: operator_pb2_grpc.OperatorServiceStub, path: Path, version: str, kind: str = ""
) -> operator_pb2.Model:
    import hashlib

    header = operator_pb2.UploadModelHeader(
        name=MODEL_NAME,
        version=version,
        size_bytes=path.stat().st_size,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        filename=path.name,
        variant_kind=kind,
    )
    return stub.UploadModel(upload_requests(path, header, progress=False), timeout=300)


def compress_int8(stub: operator_pb2_grpc.OperatorServiceStub, version: str, say: Say) -> operator_pb2.Variant | None:
    """Run the int8 compression job on a model version; return its variant if the gate accepted it."""
    job = stub.CreateCompressionJob(
        operator_pb2.CreateCompressionJobRequest(
            model_name=MODEL_NAME, model_version=version, recipe_json=json.dumps(INT8_RECIPE)
        ),
        timeout=30,
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    stage = ""
    done = (operator_pb2.JOB_STATE_SUCCEEDED, operator_pb2.JOB_STATE_FAILED, operator_pb2.JOB_STATE_CANCELLED)
    while job.state not in done:
        if time.monotonic() > deadline:
            raise RuntimeError(f"compression job {job.job_id} did not finish within {JOB_TIMEOUT_S:g} s")
        time.sleep(0.5)
        job = stub.GetCompressionJob(operator_pb2.GetCompressionJobRequest(job_id=job.job_id), timeout=30)
        if job.stage and job.stage != stage:
            stage = job.stage
            say(f"  compression job {job.job_id}: {stage} ({job.progress:.0%})")
    if job.state != operator_pb2.JOB_STATE_SUCCEEDED:
        say(f"  compression job {job.job_id} ended without a variant: {job.error or job.state}")
        return None
    variants = stub.ListVariants(
        operator_pb2.ListVariantsRequest(model_name=MODEL_NAME, model_version=version), timeout=30
    ).variants
    made = [v for v in variants if v.variant_id in set(job.variant_ids)]
    for variant in made:
        latency = ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(variant.latency_ms.items()))
        say(
            f"  {variant.variant_id}: {variant.status}, top-1 agreement with the source "
            f"{variant.accuracy:.0%}, {variant.size_bytes / 1e6:.1f} MB, gate latency {latency or '-'}"
            + (f" ({variant.rejection_reason})" if variant.rejection_reason else "")
        )
    accepted = [v for v in made if v.status == "accepted"]
    return accepted[0] if accepted else None


def build_slow_onnx(source: Path, target: Path) -> Path:
    """Write a copy of an image model that first upsamples its input and runs elementwise operators on it.

    The result has the same input, output and MACs in convolutions as the source.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    name = graph.input[0].name
    inner = f"{name}_slow"
    for node in graph.node:
        for index, value in enumerate(node.input):
            if value == name:
                node.input[index] = inner
    factor = SLOW_UPSAMPLE
    prefix = [
        helper.make_node("Resize", [name, "", "slow_scales"], ["slow_up"], mode="linear"),
        helper.make_node("Tanh", ["slow_up"], ["slow_1"]),
        helper.make_node("Sin", ["slow_1"], ["slow_2"]),
        helper.make_node("Mul", ["slow_2", "slow_up"], ["slow_3"]),
        helper.make_node("Erf", ["slow_3"], ["slow_4"]),
        helper.make_node("Add", ["slow_4", "slow_up"], ["slow_5"]),
        helper.make_node("AveragePool", ["slow_5"], [inner], kernel_shape=[factor, factor], strides=[factor, factor]),
    ]
    for node in reversed(prefix):
        graph.node.insert(0, node)
    graph.initializer.append(numpy_helper.from_array(np.array([1, 1, factor, factor], dtype=np.float32), "slow_scales"))
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return target


def predicted_p95(stub: operator_pb2_grpc.OperatorServiceStub, version: str, device_id: str) -> dict[str, float]:
    """Return the cost model's predicted p95 in ms of every runnable variant of a version on a device."""
    response = stub.ExplainSelection(
        operator_pb2.ExplainSelectionRequest(model_name=MODEL_NAME, model_version=version, device_id=device_id),
        timeout=60,
    )
    return {c.variant.variant_id: c.predicted_p95_ms for c in response.candidates if not math.isnan(c.predicted_p95_ms)}


def choose_budget(
    stub: operator_pb2_grpc.OperatorServiceStub, version: str, devices: dict[str, DemoDevice], say: Say
) -> float:
    """Pick a p95 budget from the cost model's predictions for every device.

    Every device must keep a variant predicted within the budget. Within that, the budget is just
    under the fp32 source's prediction on a device where a faster variant fits, so that the cost
    model chooses that variant there and the source elsewhere. Without such a device the budget is
    twice the slowest device's fastest prediction, and every device gets its most accurate variant.
    """
    source_id = f"{MODEL_NAME}:{version}:source"
    predictions = {name: predicted_p95(stub, version, d.device_id) for name, d in devices.items()}
    for name, by_variant in predictions.items():
        say(f"  predicted p95 on {name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(by_variant.items())))
    floor = max(min(by_variant.values()) for by_variant in predictions.values() if by_variant)
    best: tuple[float, float, str] | None = None
    for name, by_variant in predictions.items():
        source = by_variant.get(source_id)
        faster = [p for k, p in by_variant.items() if k != source_id and source is not None and p < source]
        if source is None or not faster or source <= floor:
            continue
        lower = max(floor, min(faster))
        if best is None or source - lower > best[0] - best[1]:
            best = (source, lower, name)
    if best is not None:
        source, lower, name = best
        budget = max(lower, 0.95 * source)
        say(
            f"  budget {budget:.1f} ms: every device has a variant within it, but the fp32 source on {name} "
            f"({source:.1f} ms) does not, so the cost model picks a faster variant there unless the latencies "
            "measured during the rollout lower that prediction"
        )
        return round(budget, 1)
    budget = 2.0 * floor
    say(
        f"  budget {budget:.1f} ms: no budget keeps fp32 off one device while every device has a variant, so "
        "twice the slowest device's fastest prediction"
    )
    return round(budget, 1)


def wait_for_benchmark(
    stub: operator_pb2_grpc.OperatorServiceStub, version: str, device_id: str, variant_id: str
) -> None:
    """Wait until the device's benchmark of the variant reached the orchestrator, or BENCHMARK_WAIT_S passed.

    The cost model marks a prediction "measured" once it has a benchmark of this variant on the device's class.
    """
    deadline = time.monotonic() + BENCHMARK_WAIT_S
    while time.monotonic() < deadline:
        response = stub.ExplainSelection(
            operator_pb2.ExplainSelectionRequest(model_name=MODEL_NAME, model_version=version, device_id=device_id),
            timeout=60,
        )
        if any(c.variant.variant_id == variant_id and c.basis == "measured" for c in response.candidates):
            return
        time.sleep(1.0)
    log.warning("no benchmark of %s from device_id=%s within %.0f s", variant_id, device_id, BENCHMARK_WAIT_S)


def _serving(socket: Path, variant_id: str) -> inference_pb2.LocalModel | None:
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        models = stub.ListLocalModels(inference_pb2.ListLocalModelsRequest(), timeout=10).models
    return next((m for m in models if m.model_name == MODEL_NAME and m.variant_id == variant_id), None)


def _burst(socket: Path, model: inference_pb2.LocalModel, inputs: list[np.ndarray]) -> None:
    """Send BURST inferences to model; stop early when the device stopped serving that variant.

    A wave rolled back, or a device re-planned, swaps the model under the burst, and the next variant
    may expect other inputs, so the agent rejects the request.
    """
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        name = model.inputs[0].name
        for index in range(BURST):
            tensor = inputs[index % len(inputs)]
            try:
                stub.Infer(
                    inference_pb2.InferRequest(model_name=MODEL_NAME, inputs=[array_to_tensor(name, tensor)]),
                    timeout=60,
                )
            except grpc.RpcError as error:
                if _serving(socket, model.variant_id) is not None:
                    raise
                log.info("stopped a burst: %s no longer serves %s (%s)", socket, model.variant_id, error.code())
                return


def _photo_tensors(model: inference_pb2.LocalModel) -> list[np.ndarray]:
    from edgefleet.demo.images import demo_photos, preprocess

    spec = tensor_from_proto(model.inputs[0])
    return [preprocess(photo.image, spec) for photo in demo_photos()]


def drive(
    stub: operator_pb2_grpc.OperatorServiceStub,
    rollout_id: str,
    devices: dict[str, DemoDevice],
    say: Say,
    *,
    wait_benchmarks: bool = True,
) -> operator_pb2.Rollout:
    """Send inferences to the devices of the waiting wave until the rollout ends or pauses; return it.

    Only the wave's devices are loaded, one at a time, as the fleet's latencies of version 1 were
    measured, so the regression gate compares like with like. With wait_benchmarks, inference on a
    device starts once its benchmark of the new variant is done. A wave that pauses on a regression
    is resumed up to MAX_RESUMES times.
    """
    sockets = {d.device_id: d.socket for d in devices.values()}
    names = {d.device_id: name for name, d in devices.items()}
    inputs: dict[str, list[np.ndarray]] = {}
    benchmarked: set[tuple[str, str]] = set()
    resumes = 0
    started: set[tuple[int, int]] = set()
    decided: set[tuple[int, int]] = set()
    deadline = time.monotonic() + ROLLOUT_TIMEOUT_S
    while True:
        rollout = stub.GetRollout(operator_pb2.GetRolloutRequest(rollout_id=rollout_id), timeout=10)
        for wave in rollout.waves:
            key = (wave.index, wave.attempt)
            if key not in started:
                started.add(key)
                say("  " + describe_wave(wave, names, started=True))
            if key not in decided and wave.decision != operator_pb2.WAVE_DECISION_WAITING:
                decided.add(key)
                say("  " + describe_wave(wave, names, started=False))
        state = ROLLOUT_STATES[rollout.state - 1]
        if state == "paused" and resumes < MAX_RESUMES:
            resumes += 1
            say(f"  paused: {rollout.reason}; resuming as an operator who accepts the regression")
            stub.UpdateRollout(
                operator_pb2.UpdateRolloutRequest(rollout_id=rollout_id, action=operator_pb2.ROLLOUT_ACTION_RESUME),
                timeout=10,
            )
            continue
        if state in FINAL_STATES:
            return rollout
        if time.monotonic() > deadline:
            raise RuntimeError(f"rollout {rollout_id} still {state} after {ROLLOUT_TIMEOUT_S:g} s: {rollout.reason}")
        waiting = [w for w in rollout.waves if w.decision == operator_pb2.WAVE_DECISION_WAITING]
        served = False
        for wave in waiting[-1:]:
            for device in wave.devices:
                if not device.variant_id or device.device_id not in sockets:
                    continue
                model = _serving(sockets[device.device_id], device.variant_id)
                if model is None:
                    continue
                if wait_benchmarks and (device.device_id, device.variant_id) not in benchmarked:
                    wait_for_benchmark(stub, rollout.model_version, device.device_id, device.variant_id)
                    benchmarked.add((device.device_id, device.variant_id))
                if device.variant_id not in inputs:
                    inputs[device.variant_id] = _photo_tensors(model)
                _burst(sockets[device.device_id], model, inputs[device.variant_id])
                served = True
        if not served:
            time.sleep(0.3)


def describe_wave(wave: operator_pb2.Wave, names: dict[str, str], *, started: bool) -> str:
    attempt = f" attempt {wave.attempt + 1}" if wave.attempt else ""
    if started:
        assigned = ", ".join(
            f"{names.get(d.device_id, d.device_id)} <- {d.variant_id or 'nothing (' + d.note + ')'}"
            for d in wave.devices
        )
        return f"wave {wave.index + 1} ({wave.percent}%){attempt} started: {assigned or 'no devices'}"
    figures = "; ".join(
        f"{names.get(d.device_id, d.device_id)} {d.samples} samples p95 {d.p95_ms:.1f} ms"
        for d in wave.devices
        if d.variant_id
    )
    decision = WAVE_DECISIONS[wave.decision - 1].upper()
    return f"wave {wave.index + 1}{attempt}: {decision} ({figures}): {wave.reason}"


def rollout_report(rollout: operator_pb2.Rollout, names: dict[str, str]) -> dict[str, Any]:
    """Return the figures of a rollout for the demo report: every wave with its devices and decision."""

    def number(value: float) -> float | None:
        return None if math.isnan(value) else round(value, 3)

    return {
        "rollout_id": rollout.rollout_id,
        "model": f"{rollout.model_name}:{rollout.model_version}",
        "state": ROLLOUT_STATES[rollout.state - 1],
        "reason": rollout.reason,
        "budget_ms": rollout.budget_ms,
        "max_p95_regression_pct": rollout.max_p95_regression_pct,
        "max_error_rate_pct": rollout.max_error_rate_pct,
        "min_samples": rollout.min_samples,
        "waves": [
            {
                "index": wave.index,
                "percent": wave.percent,
                "attempt": wave.attempt,
                "decision": WAVE_DECISIONS[wave.decision - 1] if wave.decision else "",
                "reason": wave.reason,
                "devices": [
                    {
                        "name": names.get(d.device_id, d.device_id),
                        "device_id": d.device_id,
                        "variant_id": d.variant_id,
                        "previous_variant_id": d.previous_variant_id,
                        "samples": d.samples,
                        "p95_ms": number(d.p95_ms),
                        "baseline_p95_ms": number(d.baseline_p95_ms),
                        "error_rate": round(d.error_rate, 5),
                        "verdict": d.verdict,
                        "note": d.note,
                        "restored": d.restored,
                    }
                    for d in wave.devices
                ],
            }
            for wave in rollout.waves
        ],
    }


def _create(
    stub: operator_pb2_grpc.OperatorServiceStub, version: str, waves: list[int], budget_ms: float, min_samples: int
) -> str:
    rollout = stub.CreateRollout(
        operator_pb2.CreateRolloutRequest(
            model_name=MODEL_NAME,
            model_version=version,
            target_labels=TARGET,
            wave_percents=waves,
            budget_ms=budget_ms,
            max_p95_regression_pct=50.0,
            max_error_rate_pct=1.0,
            min_samples=min_samples,
            sample_timeout_seconds=SAMPLE_TIMEOUT_S,
        ),
        timeout=30,
    )
    return rollout.rollout_id


def run_rollouts(
    stub: operator_pb2_grpc.OperatorServiceStub,
    onnx_path: Path,
    tflite_path: Path,
    devices: dict[str, DemoDevice],
    work_dir: Path,
    say: Say,
) -> list[dict[str, Any]]:
    """Roll out version 2 with its int8 variant in three waves, then the slow version 3; return both rollouts."""
    names = {d.device_id: name for name, d in devices.items()}
    say("")
    say(f"Adding {MODEL_NAME}:2 and compressing it to int8 (static QDQ, calibrated on the demo photos)...")
    _upload(stub, onnx_path, "2")
    _upload(stub, tflite_path, "2", kind="tflite-fp32")
    int8 = compress_int8(stub, "2", say)
    if int8 is None:
        say("  the gate rejected the int8 variant; version 2 rolls out with its fp32 variants")
    budget = choose_budget(stub, "2", devices, say)
    rollout_id = _create(stub, "2", [33, 66, 100], budget, MIN_SAMPLES)
    say(f"Rolling out {MODEL_NAME}:2 as {rollout_id} in waves of 33%, 66% and 100% with a p95 budget of {budget:g} ms")
    second = drive(stub, rollout_id, devices, say)
    say(f"Rollout {rollout_id}: {ROLLOUT_STATES[second.state - 1]}: {second.reason}")

    say("")
    slow_path = build_slow_onnx(onnx_path, work_dir / "efficientnet_lite0_slow.onnx")
    _upload(stub, slow_path, "3")
    predictions = [predicted_p95(stub, "3", d.device_id) for d in devices.values()]
    slow_budget = round(1.3 * max((max(p.values()) for p in predictions if p), default=budget), 1)
    say(
        f"Adding {MODEL_NAME}:3, a deliberately slow copy that upsamples its input {SLOW_UPSAMPLE}x before the "
        f"network; the cost model predicts it within a budget of {slow_budget:g} ms"
    )
    rollout_id = _create(stub, "3", [50, 100], slow_budget, SLOW_MIN_SAMPLES)
    say(f"Rolling out {MODEL_NAME}:3 as {rollout_id} in waves of 50% and 100%")
    # The slow version breaks the budget whether or not its benchmark runs at the same time.
    third = drive(stub, rollout_id, devices, say, wait_benchmarks=False)
    say(f"Rollout {rollout_id}: {ROLLOUT_STATES[third.state - 1]}: {third.reason}")
    return [rollout_report(second, names), rollout_report(third, names)]


def print_rollouts(rollouts: list[dict[str, Any]], say: Say) -> None:
    """Print each rollout of the report as a table of its waves' devices, figures and decisions."""
    from edgefleet.cli.views import table

    for rollout in rollouts:
        say("")
        say(
            f"Rollout {rollout['rollout_id']} of {rollout['model']} (p95 budget {rollout['budget_ms']:g} ms): "
            f"{rollout['state']}"
        )
        rows = [
            (
                f"{wave['index'] + 1}" + (f".{wave['attempt'] + 1}" if wave["attempt"] else ""),
                f"{wave['percent']}%",
                device["name"],
                device["variant_id"] or "-",
                device["samples"],
                device["p95_ms"],
                device["baseline_p95_ms"],
                f"{100 * device['error_rate']:.1f}%",
                device["verdict"] or "-",
                wave["decision"],
            )
            for wave in rollout["waves"]
            for device in wave["devices"]
        ]
        say(
            table(
                (
                    "WAVE",
                    "SHARE",
                    "DEVICE",
                    "VARIANT",
                    "SAMPLES",
                    "P95 MS",
                    "PREV P95",
                    "ERRORS",
                    "VERDICT",
                    "DECISION",
                ),
                rows,
            )
        )
