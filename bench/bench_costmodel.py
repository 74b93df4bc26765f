"""Measure real model latencies on this machine and check the cost model's leave-one-out predictions against them."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# Run from a checkout without `pip install -e .`: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_line
from edgefleet.agent.benchmark import sample_input
from edgefleet.agent.probe import probe_hardware
from edgefleet.agent.runtime.litert import LiteRTRunner
from edgefleet.agent.runtime.onnx import OnnxRunner
from edgefleet.common.hardware import HardwareProfile, hardware_class_of
from edgefleet.orchestrator.costmodel.predictor import AnalyticPredictor, CalibratedPredictor, Measurement
from edgefleet.orchestrator.domain import Variant
from edgefleet.orchestrator.modelinfo import inspect_model

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
# Bump when a model builder changes, so that cached files are rebuilt.
BUILDER_VERSION = 1
# Small CNNs: (width of the first stage, convolutions per stage). Each of the three stages halves the
# resolution and doubles the width.
CNN_SHAPES = ((8, 1), (8, 2), (16, 1), (16, 2), (24, 2), (32, 2), (32, 3))
CNN_IMAGE = 128
# (usable cores, threads): a 1-core device and a 2-core device at 1 and 2 threads.
PROFILES = ((1, 1), (2, 1), (2, 2))
TOLERANCE = 0.10


@dataclasses.dataclass(frozen=True)
class Pair:
    variant: Variant
    path: Path
    cores: int
    threads: int
    hardware_class: str
    p50_ms: float = math.nan
    p95_ms: float = math.nan


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class SmallCnn:
    """Builds a torch module: three stages of 3x3 convolutions with ReLU, then pooling and a linear head."""

    @staticmethod
    def build(width: int, depth: int) -> object:
        import torch
        from torch import nn

        torch.manual_seed(width * 10 + depth)
        layers: list[nn.Module] = []
        channels = 3
        for stage in range(3):
            out = width * 2**stage
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.ReLU()]
            for _ in range(depth - 1):
                layers += [nn.Conv2d(out, out, 3, padding=1), nn.ReLU()]
            channels = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
        return nn.Sequential(*layers).eval()


def export_onnx(module: object, shape: tuple[int, ...], target: Path) -> Path:
    import torch

    if target.exists():
        return target
    temporary = target.with_suffix(".tmp.onnx")
    with torch.no_grad(), quiet():
        torch.onnx.export(
            module,
            (torch.zeros(*shape),),
            str(temporary),
            input_names=["input"],
            output_names=["logits"],
            opset_version=18,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    temporary.rename(target)
    return target


def export_tflite(module: object, shape: tuple[int, ...], target: Path) -> Path:
    import torch

    if target.exists():
        return target
    litert_torch = importlib.import_module("litert_torch")
    with torch.no_grad(), quiet():
        wrapped = litert_torch.to_channel_last_io(module, args=[0]).eval()
        nhwc = (shape[0], shape[2], shape[3], shape[1])
        litert_torch.convert(wrapped, (torch.zeros(*nhwc),)).export(str(target))
    return target


def quantize(source: Path, target: Path, calibration: np.ndarray) -> Path:
    from edgefleet.orchestrator.compress.quantize import quantize_static_qdq

    if not target.exists():
        with quiet():
            quantize_static_qdq(source, target, calibration)
    return target


def photo_calibration(model: Path, count: int = 16) -> np.ndarray:
    from edgefleet.demo.images import demo_photos, preprocess
    from edgefleet.orchestrator.compress.calibration import model_input_spec

    spec = model_input_spec(model)
    return np.concatenate([preprocess(photo.image, spec) for photo in demo_photos()[:count]])


def build_models(cache: Path) -> list[tuple[str, Path]]:
    """Return (kind, path) of every model file, building the missing ones."""
    from edgefleet.demo.assets import ensure_efficientnet_lite0_onnx, ensure_efficientnet_lite0_tflite

    cache.mkdir(parents=True, exist_ok=True)
    effnet = ensure_efficientnet_lite0_onnx()
    models = [
        ("effnet-fp32", effnet),
        ("effnet-tflite", ensure_efficientnet_lite0_tflite()),
        ("effnet-int8", quantize(effnet, cache / f"effnet-int8-v{BUILDER_VERSION}.onnx", photo_calibration(effnet))),
    ]
    rng = np.random.default_rng(0)
    shape = (1, 3, CNN_IMAGE, CNN_IMAGE)
    for width, depth in CNN_SHAPES:
        name = f"cnn-w{width}-d{depth}"
        module = SmallCnn.build(width, depth)
        onnx_path = export_onnx(module, shape, cache / f"{name}-v{BUILDER_VERSION}.onnx")
        calibration = rng.standard_normal((8, *shape[1:])).astype(np.float32)
        models.append((name, onnx_path))
        models.append(
            (f"{name}-int8", quantize(onnx_path, cache / f"{name}-int8-v{BUILDER_VERSION}.onnx", calibration))
        )
        models.append((f"{name}-tflite", export_tflite(module, shape, cache / f"{name}-v{BUILDER_VERSION}.tflite")))
    return models


def as_variant(kind: str, path: Path) -> Variant:
    metadata = inspect_model(path)
    return Variant(
        variant_id=kind,
        model_name=kind.split("-")[0],
        model_version="1",
        kind=kind,
        format=metadata.format,
        precision=metadata.precision,
        digest="",
        size_bytes=path.stat().st_size,
        metadata=metadata,
    )


def class_profiles(machine: HardwareProfile) -> dict[int, HardwareProfile]:
    """Return a profile of this machine limited to each core count of PROFILES, with its hardware class."""
    profiles = {}
    for cores in sorted({c for c, _ in PROFILES}):
        limited = dataclasses.replace(machine, usable_cores=float(cores), logical_cores=cores, profile_name="bench")
        profiles[cores] = dataclasses.replace(limited, hardware_class=hardware_class_of(limited))
    return profiles


def load_sessions(pairs: list[Pair]) -> list[object]:
    """Load one runtime session per pair, created while pinned to the pair's cores (threads inherit the mask)."""
    allowed = sorted(os.sched_getaffinity(0))
    sessions = []
    try:
        for pair in pairs:
            os.sched_setaffinity(0, allowed[: pair.cores])
            runner = OnnxRunner() if pair.variant.format == "onnx" else LiteRTRunner()
            sessions.append(runner.load(pair.path, threads=pair.threads))
    finally:
        os.sched_setaffinity(0, allowed)
    return sessions


def measure_interleaved(pairs: list[Pair], runs: int, warmup: int, rounds: int) -> list[Pair]:
    """Return the pairs with p50 and p95 over runs timed calls each, spread over interleaved rounds.

    Every round runs every pair a few times, so load from other processes during the benchmark
    spreads over all pairs instead of spoiling the few measured while it lasted.
    """
    allowed = sorted(os.sched_getaffinity(0))
    sessions = load_sessions(pairs)
    feeds = [
        {spec.name: sample_input(spec, np.random.default_rng(0)) for spec in session.inputs}  # type: ignore[attr-defined]
        for session in sessions
    ]
    timings: list[list[float]] = [[] for _ in pairs]
    per_round = max(1, math.ceil(runs / rounds))
    try:
        for round_index in range(rounds):
            for index, pair in enumerate(pairs):
                os.sched_setaffinity(0, allowed[: pair.cores])
                session = sessions[index]
                if round_index == 0:
                    for _ in range(warmup):
                        session.run_checked(feeds[index])  # type: ignore[attr-defined]
                for _ in range(per_round):
                    start = time.perf_counter_ns()
                    session.run_checked(feeds[index])  # type: ignore[attr-defined]
                    timings[index].append((time.perf_counter_ns() - start) / 1e6)
    finally:
        os.sched_setaffinity(0, allowed)
        for session in sessions:
            session.close()  # type: ignore[attr-defined]
    return [
        dataclasses.replace(pair, p50_ms=float(np.percentile(t, 50)), p95_ms=float(np.percentile(t, 95)))
        for pair, t in zip(pairs, timings, strict=True)
    ]


def leave_one_out(pairs: list[Pair], profiles: dict[str, HardwareProfile]) -> list[tuple[Pair, float, float]]:
    """Predict each pair from every other pair's measurement; return (pair, calibrated, analytic) p50s."""
    variants = {p.variant.variant_id: p.variant for p in pairs}
    measurements = [
        Measurement(p.variant.variant_id, p.hardware_class, p.threads, p.p50_ms, p.p95_ms, 30, "benchmark")
        for p in pairs
    ]
    prior = AnalyticPredictor()
    predictions = []
    for index, pair in enumerate(pairs):
        others = measurements[:index] + measurements[index + 1 :]
        predictor = CalibratedPredictor(others, profiles=profiles, variants=variants)
        hardware = profiles[pair.hardware_class]
        calibrated = predictor.predict(hardware, pair.variant, pair.threads).p50_ms
        analytic = prior.predict(hardware, pair.variant, pair.threads).p50_ms
        predictions.append((pair, calibrated, analytic))
    return predictions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=40, help="timed runs per pair (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per pair (default 5)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds the runs are spread over")
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache" / "bench-costmodel")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if len(os.sched_getaffinity(0)) < 2:
        print("this benchmark needs 2 usable cores to measure the 2-core profiles", file=sys.stderr)
        return 2

    print(f"machine: {machine_line()}")
    started = time.monotonic()
    models = build_models(args.cache)
    print(f"built or loaded {len(models)} model files in {time.monotonic() - started:.0f} s")
    machine = probe_hardware(store_dir=args.cache)
    by_cores = class_profiles(machine)
    profiles = {p.hardware_class: p for p in by_cores.values()}
    print(f"cpu features: {', '.join(machine.cpu_features)}")

    pairs: list[Pair] = []
    for kind, path in models:
        variant = as_variant(kind, path)
        for cores, threads in PROFILES:
            pairs.append(Pair(variant, path, cores, threads, by_cores[cores].hardware_class))
    load_before = os.getloadavg()[0]
    pairs = measure_interleaved(pairs, args.runs, args.warmup, args.rounds)
    print(
        f"measured {len(pairs)} variant x profile pairs ({args.runs} runs each in {args.rounds} interleaved rounds) "
        f"in {time.monotonic() - started:.0f} s; 1-minute load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after, on {len(os.sched_getaffinity(0))} cores"
    )

    results = leave_one_out(pairs, profiles)
    print()
    print(
        f"{'variant':22} {'format':6} {'prec':4} {'MMACs':>7} {'cores':>5} {'thr':>3} {'measured':>9} "
        f"{'loo pred':>9} {'error':>7} {'analytic':>9} {'error':>7}"
    )
    for pair, calibrated, analytic in results:
        v = pair.variant
        print(
            f"{v.variant_id:22} {v.format:6} {v.precision:4} {v.metadata.macs / 1e6:7.1f} {pair.cores:5d} "
            f"{pair.threads:3d} {pair.p50_ms:9.3f} {calibrated:9.3f} {calibrated / pair.p50_ms - 1:+7.1%} "
            f"{analytic:9.3f} {analytic / pair.p50_ms - 1:+7.1%}"
        )
    within = [abs(c / p.p50_ms - 1) <= TOLERANCE for p, c, _ in results]
    within_prior = [abs(a / p.p50_ms - 1) <= TOLERANCE for p, _, a in results]
    print()
    print(
        f"leave-one-out calibrated: {sum(within)}/{len(within)} = {sum(within) / len(within):.1%} of pairs "
        f"within +-{TOLERANCE:.0%} of the measured p50 (target >= 95%)"
    )
    print(
        f"analytic prior alone:     {sum(within_prior)}/{len(within_prior)} = "
        f"{sum(within_prior) / len(within_prior):.1%} within +-{TOLERANCE:.0%}"
    )
    errors = sorted(results, key=lambda item: -abs(item[1] / item[0].p50_ms - 1))
    print("worst leave-one-out cases:")
    for pair, calibrated, _ in errors[:5]:
        print(
            f"  {pair.variant.variant_id} cores={pair.cores} threads={pair.threads}: measured {pair.p50_ms:.3f} ms, "
            f"predicted {calibrated:.3f} ms ({calibrated / pair.p50_ms - 1:+.1%})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
