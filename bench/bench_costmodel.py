"""Measure real model latencies on this machine and check the cost model's leave-one-out predictions against them."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

# Run from a checkout without `pip install -e .`: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_line
from edgefleet.agent.benchmark import sample_input
from edgefleet.agent.probe import probe_hardware
from edgefleet.agent.runtime.litert import LiteRTRunner
from edgefleet.agent.runtime.onnx import INTRA_OP_SPIN_DURATION_US, OnnxRunner
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
# Runs a benchmark measurement counts as, for the calibration weights (full weight from 20 runs).
FULL_RUNS = 30


@dataclasses.dataclass(frozen=True)
class Pair:
    """One variant on one profile and, once measured, its latency figures."""

    variant: Variant
    path: Path
    cores: int
    threads: int
    hardware_class: str
    round_medians_ms: tuple[float, ...] = ()  # The median of each interleaved round, in round order.
    p95_ms: float = math.nan  # Over every timed run of every round.

    @property
    def p50_ms(self) -> float:
        """The median of the per-round medians."""
        return float(np.median(self.round_medians_ms)) if self.round_medians_ms else math.nan

    @property
    def spread(self) -> float:
        """The range of the per-round medians relative to p50_ms."""
        return (max(self.round_medians_ms) - min(self.round_medians_ms)) / self.p50_ms

    @property
    def noise(self) -> float:
        """The relative difference between the medians of the even and of the odd rounds.

        The even and the odd rounds run separate sessions, so each half is an honest measurement
        of the pair on its own. This is the error of predicting one by the other, and no predictor
        can be judged finer than it.
        """
        even = float(np.median(self.round_medians_ms[0::2]))
        odd = float(np.median(self.round_medians_ms[1::2]))
        return abs(even / odd - 1.0)

    @property
    def label(self) -> str:
        """The variant and profile, as the report prints them."""
        return f"{self.variant.variant_id} cores={self.cores} threads={self.threads}"


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


def export_onnx(module: Any, shape: tuple[int, ...], target: Path) -> Path:
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


def export_tflite(module: Any, shape: tuple[int, ...], target: Path) -> Path:
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


class SpinOnnxRunner(OnnxRunner):
    """The agent's onnxruntime runner with another bound on intra-op spinning (None: onnxruntime's default)."""

    def __init__(self, spin_duration_us: int | None) -> None:
        super().__init__()
        self.spin_duration_us = spin_duration_us

    def session_options(
        self, threads: int, *, spin_duration_us: int | None = INTRA_OP_SPIN_DURATION_US
    ) -> ort.SessionOptions:
        """Return the agent's session options with this runner's spin bound in place of spin_duration_us."""
        return super().session_options(threads, spin_duration_us=self.spin_duration_us)


def load_sessions(pairs: list[Pair], onnx_runner: OnnxRunner) -> list[Any]:
    """Load one runtime session per pair, created while pinned to the pair's cores.

    The runtimes start their worker threads when the session is created, and a new thread inherits
    the CPU affinity of the thread that creates it, so every worker of a pair stays on its cores.
    """
    allowed = sorted(os.sched_getaffinity(0))
    sessions = []
    try:
        for pair in pairs:
            os.sched_setaffinity(0, allowed[: pair.cores])
            runner = onnx_runner if pair.variant.format == "onnx" else LiteRTRunner()
            sessions.append(runner.load(pair.path, threads=pair.threads))
    finally:
        os.sched_setaffinity(0, allowed)
    return sessions


def time_runs(session: Any, feed: dict[str, np.ndarray], count: int) -> list[float]:
    """Return the wall time of count calls, in ms."""
    timings = []
    for _ in range(count):
        start = time.perf_counter_ns()
        session.run_checked(feed)
        timings.append((time.perf_counter_ns() - start) / 1e6)
    return timings


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The runs, rounds and pauses of the interleaved measurement."""

    rounds: int  # Every round runs every pair once, in a shuffled order.
    round_ms: float  # Timed milliseconds per pair and round; fast pairs get more runs to fill them.
    min_runs: int  # Timed runs per pair and round, at least.
    warmup: int  # Untimed runs before each pair's timed runs in every round, to refill its caches.
    pause_s: float  # Sleep between pairs, so the previous pair's spinning worker threads park first.
    rest: float = 0.0  # Also sleep this many times the time the pair just ran, to leave CPU to others.


def measure_interleaved(
    pairs: list[Pair], schedule: Schedule, onnx_runner: OnnxRunner
) -> tuple[list[Pair], list[float]]:
    """Measure every pair in interleaved rounds; return the measured pairs and the load average per round.

    Round-robin over the pairs spreads load from other processes over every pair, instead of
    spoiling the few that ran while it lasted. Each round's median is kept, so the spread over the
    rounds shows how stable each figure is. Every pair has two sessions, one for the even and one
    for the odd rounds, so the even/odd noise includes any difference between two sessions of the same
    file. With onnxruntime's default spinning (--onnx-spin-us -1), the workers of the other sessions kept
    spinning for tens of ms after their pair ran, so two sessions of one file differed by up to a factor
    of 2 at 2 threads.
    """
    allowed = sorted(os.sched_getaffinity(0))
    sessions = (load_sessions(pairs, onnx_runner), load_sessions(pairs, onnx_runner))
    feeds = [{spec.name: sample_input(spec, np.random.default_rng(0)) for spec in s.inputs} for s in sessions[0]]
    runs: list[int] = []
    medians: list[list[float]] = [[] for _ in pairs]
    timings: list[list[float]] = [[] for _ in pairs]
    loads = []
    try:
        # One untimed pass sizes the runs per round, so a pair of 0.2 ms gets as much time as one of 30 ms.
        for index, pair in enumerate(pairs):
            os.sched_setaffinity(0, allowed[: pair.cores])
            probe = float(np.median(time_runs(sessions[0][index], feeds[index], schedule.warmup + 3)))
            runs.append(max(schedule.min_runs, math.ceil(schedule.round_ms / probe)))
        order = np.random.default_rng(1)
        for round_index in range(schedule.rounds):
            for index in order.permutation(len(pairs)):
                session = sessions[round_index % 2][index]
                os.sched_setaffinity(0, allowed[: pairs[index].cores])
                busy = time.monotonic()
                time_runs(session, feeds[index], schedule.warmup)
                timed = time_runs(session, feeds[index], runs[index])
                medians[index].append(float(np.median(timed)))
                timings[index].extend(timed)
                time.sleep(schedule.pause_s + schedule.rest * (time.monotonic() - busy))
            loads.append(os.getloadavg()[0])
    finally:
        os.sched_setaffinity(0, allowed)
        for session in (*sessions[0], *sessions[1]):
            session.close()
    measured = [
        dataclasses.replace(pair, round_medians_ms=tuple(m), p95_ms=float(np.percentile(t, 95)))
        for pair, m, t in zip(pairs, medians, timings, strict=True)
    ]
    return measured, loads


def save_measurements(pairs: list[Pair], loads: list[float], target: Path) -> None:
    """Write the per-round medians of every pair and the load averages to a JSON file."""
    records = [
        {
            "variant": p.variant.variant_id,
            "cores": p.cores,
            "threads": p.threads,
            "round_medians_ms": list(p.round_medians_ms),
            "p95_ms": p.p95_ms,
        }
        for p in pairs
    ]
    target.write_text(json.dumps({"machine": machine_line(), "loads": loads, "pairs": records}, indent=1))


def load_measurements(pairs: list[Pair], source: Path) -> tuple[list[Pair], list[float]]:
    """Fill the pairs from a file written by save_measurements; raise ValueError when a pair is missing."""
    data = json.loads(source.read_text())
    by_key = {(r["variant"], r["cores"], r["threads"]): r for r in data["pairs"]}
    filled = []
    for pair in pairs:
        record = by_key.get((pair.variant.variant_id, pair.cores, pair.threads))
        if record is None:
            raise ValueError(f"{source} has no measurement of {pair.label}; measure again without --load")
        filled.append(
            dataclasses.replace(pair, round_medians_ms=tuple(record["round_medians_ms"]), p95_ms=record["p95_ms"])
        )
    return filled, list(data["loads"])


def report_runs(pairs: list[Pair], others: list[Path]) -> None:
    """Print how far the p50s of this run are from those of earlier runs saved by --save.

    Each earlier run is a separate process, started minutes apart, so this is the noise between
    runs, which the even/odd noise within one run does not see.
    """
    for other in others:
        previous, _ = load_measurements(pairs, other)
        differences = [abs(b.p50_ms / a.p50_ms - 1) for a, b in zip(pairs, previous, strict=True)]
        single = [d for d, p in zip(differences, pairs, strict=True) if p.threads == 1]
        threaded = [d for d, p in zip(differences, pairs, strict=True) if p.threads > 1]
        print(
            f"p50 of {other} within +-{TOLERANCE:.0%} of this run: {share([d <= TOLERANCE for d in differences])} "
            f"(1 thread {share([d <= TOLERANCE for d in single])}, "
            f"2 threads {share([d <= TOLERANCE for d in threaded])}); max difference {max(differences):.1%}"
        )


def report_threads(pairs: list[Pair]) -> None:
    """Print, per variant, the latency ratios between the profiles, and flag 2 threads slower than 1.

    On an idle machine a 1-thread pair should measure the same on 1 and on 2 cores, and 2 threads
    should be no slower than 1 beyond the noise.
    """
    by_variant: dict[str, dict[tuple[int, int], Pair]] = {}
    for pair in pairs:
        by_variant.setdefault(pair.variant.variant_id, {})[(pair.cores, pair.threads)] = pair
    print("latency ratios between profiles (noise: the larger even/odd-round difference of the two pairs):")
    print(f"  {'variant':22} {'1c1t/2c1t':>9} {'noise':>6} {'2c2t/2c1t':>9} {'noise':>6}")
    slower = []
    for variant_id, profiles in by_variant.items():
        one, two, both = profiles.get((1, 1)), profiles.get((2, 1)), profiles.get((2, 2))
        if one is None or two is None or both is None:
            continue
        cores_ratio = one.p50_ms / two.p50_ms
        threads_ratio = both.p50_ms / two.p50_ms
        threads_noise = max(both.noise, two.noise)
        if threads_ratio > 1.0 + threads_noise:
            slower.append(variant_id)
        print(
            f"  {variant_id:22} {cores_ratio:9.3f} {max(one.noise, two.noise):6.1%} "
            f"{threads_ratio:9.3f} {threads_noise:6.1%}"
        )
    if slower:
        print(f"  2 threads slower than 1 beyond the noise: {', '.join(slower)}")
    else:
        print("  no variant is slower at 2 threads than at 1 beyond the noise")


def leave_one_out(pairs: list[Pair], profiles: dict[str, HardwareProfile]) -> list[tuple[Pair, float, float]]:
    """Predict each pair from every other pair's measurement; return (pair, calibrated, analytic) p50s.

    The prediction of a variant on a profile uses the variant on the other profiles and the other
    variants on every profile, never the pair's own measurement.
    """
    variants = {p.variant.variant_id: p.variant for p in pairs}
    measurements = [
        Measurement(p.variant.variant_id, p.hardware_class, p.threads, p.p50_ms, p.p95_ms, FULL_RUNS, "benchmark")
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


def leave_variant_out(pairs: list[Pair], profiles: dict[str, HardwareProfile]) -> list[float]:
    """Predict each pair with no measurement of its variant at all; return the relative errors.

    This is the case of a new variant, whose cost comes from its graph's features alone.
    """
    variants = {p.variant.variant_id: p.variant for p in pairs}
    errors = []
    for variant_id, variant in variants.items():
        others = [
            Measurement(p.variant.variant_id, p.hardware_class, p.threads, p.p50_ms, p.p95_ms, FULL_RUNS, "benchmark")
            for p in pairs
            if p.variant.variant_id != variant_id
        ]
        predictor = CalibratedPredictor(others, profiles=profiles, variants=variants)
        for pair in (p for p in pairs if p.variant.variant_id == variant_id):
            predicted = predictor.predict(profiles[pair.hardware_class], variant, pair.threads).p50_ms
            errors.append(abs(predicted / pair.p50_ms - 1))
    return errors


def share(flags: list[bool]) -> str:
    return f"{sum(flags)}/{len(flags)} = {sum(flags) / len(flags):.1%}"


def report_predictions(results: list[tuple[Pair, float, float]], worst: int) -> None:
    """Print every pair's measurement and predictions, the shares within the tolerance and the worst cases."""
    print(
        f"{'variant':22} {'format':6} {'prec':4} {'MMACs':>7} {'cores':>5} {'thr':>3} {'measured':>9} "
        f"{'spread':>7} {'noise':>6} {'loo pred':>9} {'error':>7} {'analytic':>9} {'error':>7}"
    )
    for pair, calibrated, analytic in results:
        v = pair.variant
        print(
            f"{v.variant_id:22} {v.format:6} {v.precision:4} {v.metadata.macs / 1e6:7.1f} {pair.cores:5d} "
            f"{pair.threads:3d} {pair.p50_ms:9.3f} {pair.spread:7.1%} {pair.noise:6.1%} {calibrated:9.3f} "
            f"{calibrated / pair.p50_ms - 1:+7.1%} {analytic:9.3f} {analytic / pair.p50_ms - 1:+7.1%}"
        )

    errors = [abs(c / p.p50_ms - 1) for p, c, _ in results]
    noisy = [p for p, _, _ in results if p.noise > TOLERANCE]
    print()
    print(f"noise floor: median even/odd-round difference {np.median([p.noise for p, _, _ in results]):.1%}, ", end="")
    print(f"max {max(p.noise for p, _, _ in results):.1%}; {len(noisy)} pairs are noisier than +-{TOLERANCE:.0%}")
    for pair in noisy:
        print(f"  {pair.label}: even/odd rounds differ by {pair.noise:.1%} (spread {pair.spread:.1%})")

    repeat = [p.noise <= TOLERANCE for p, _, _ in results]
    print(f"re-measurement (even rounds vs odd rounds) within +-{TOLERANCE:.0%}: {share(repeat)}")
    print(
        f"leave-one-out calibrated within +-{TOLERANCE:.0%} of the measured p50: "
        f"{share([e <= TOLERANCE for e in errors])} (target >= 95%)"
    )
    for threads in sorted({p.threads for p, _, _ in results}):
        subset = [e <= TOLERANCE for e, (p, _, _) in zip(errors, results, strict=True) if p.threads == threads]
        print(f"  of the pairs at {threads} thread(s): {share(subset)}")
    within_noise = [e <= max(TOLERANCE, p.noise) for e, (p, _, _) in zip(errors, results, strict=True)]
    print(f"leave-one-out calibrated within max(+-{TOLERANCE:.0%}, the pair's noise): {share(within_noise)}")
    prior = [abs(a / p.p50_ms - 1) <= TOLERANCE for p, _, a in results]
    print(f"analytic prior alone within +-{TOLERANCE:.0%}: {share(prior)}")

    print(f"leave-one-out errors: median {np.median(errors):.1%}, 95th percentile {np.percentile(errors, 95):.1%}")
    print("worst leave-one-out cases:")
    for pair, calibrated, _ in sorted(results, key=lambda item: -abs(item[1] / item[0].p50_ms - 1))[:worst]:
        print(
            f"  {pair.label}: measured {pair.p50_ms:.3f} ms (noise {pair.noise:.1%}), "
            f"predicted {calibrated:.3f} ms ({calibrated / pair.p50_ms - 1:+.1%})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds over all pairs (default 30)")
    parser.add_argument(
        "--round-ms", type=float, default=25.0, help="timed ms per pair and round, at least (default 25)"
    )
    parser.add_argument("--min-runs", type=int, default=3, help="timed runs per pair and round, at least (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per pair and round (default 2)")
    parser.add_argument("--pause-ms", type=float, default=2.0, help="sleep between pairs, in ms (default 2)")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="scheduling niceness of the benchmark process (default 0; negative values need root and "
        "make other processes' load disturb the figures less)",
    )
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="measure under SCHED_FIFO (needs root or CAP_SYS_NICE), so other processes cannot preempt a "
        "timed run; the benchmark then sleeps as long as each pair ran, leaving other processes half the CPU",
    )
    parser.add_argument(
        "--onnx-spin-us",
        type=int,
        default=INTRA_OP_SPIN_DURATION_US,
        help="microseconds an idle onnxruntime intra-op worker spins before it blocks (default "
        f"{INTRA_OP_SPIN_DURATION_US}, the agent's setting; -1 keeps onnxruntime's default spinning)",
    )
    parser.add_argument("--save", type=Path, help="write the per-round measurements to this JSON file")
    parser.add_argument("--load", type=Path, help="predict from measurements saved by --save instead of measuring")
    parser.add_argument(
        "--compare", type=Path, action="append", default=[], help="a run saved by --save to compare p50s with"
    )
    parser.add_argument("--worst", type=int, default=8, help="worst leave-one-out cases to print (default 8)")
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache" / "bench-costmodel")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2 to estimate the noise, got {args.rounds}")
    if args.onnx_spin_us < -1:
        parser.error(f"--onnx-spin-us must be -1 (onnxruntime's default) or at least 0, got {args.onnx_spin_us}")
    if len(os.sched_getaffinity(0)) < 2:
        print("this benchmark needs 2 usable cores to measure the 2-core profiles", file=sys.stderr)
        return 2
    # Set before any session exists, so every runtime worker thread inherits it.
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)

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
    if args.load:
        pairs, loads = load_measurements(pairs, args.load)
        print(f"loaded the measurements of {len(pairs)} pairs from {args.load}")
    else:
        rest = 1.0 if args.realtime else 0.0
        schedule = Schedule(args.rounds, args.round_ms, args.min_runs, args.warmup, args.pause_ms / 1000.0, rest)
        load_before = os.getloadavg()
        measuring = time.monotonic()
        if args.realtime:
            # measure_interleaved creates the sessions, so their worker threads inherit the policy.
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(os.sched_get_priority_min(os.SCHED_FIFO)))
        try:
            onnx_runner = SpinOnnxRunner(None if args.onnx_spin_us == -1 else args.onnx_spin_us)
            pairs, loads = measure_interleaved(pairs, schedule, onnx_runner)
        finally:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        print(
            f"measured {len(pairs)} variant x profile pairs in {args.rounds} interleaved rounds "
            f"(>= {args.round_ms:g} ms and >= {args.min_runs} runs per pair and round) in "
            f"{time.monotonic() - measuring:.0f} s at niceness {os.getpriority(os.PRIO_PROCESS, 0)}"
            + (", under SCHED_FIFO" if args.realtime else "")
        )
        spin = "onnxruntime's default" if args.onnx_spin_us == -1 else f"{args.onnx_spin_us} us"
        print(f"onnxruntime intra-op spinning: {spin}")
        print(
            "load average (1, 5, 15 min) before: " + ", ".join(f"{x:.2f}" for x in load_before) + "; "
            f"1-minute after each round: {', '.join(f'{x:.2f}' for x in loads)}; on "
            f"{len(os.sched_getaffinity(0))} cores"
        )
        if args.save:
            save_measurements(pairs, loads, args.save)
            print(f"saved the measurements to {args.save}")
    if args.compare:
        print()
        report_runs(pairs, args.compare)
    print()
    report_threads(pairs)
    print()
    report_predictions(leave_one_out(pairs, profiles), args.worst)
    unseen = leave_variant_out(pairs, profiles)
    print(
        f"leave-variant-out (no measurement of the variant on any profile) within +-{TOLERANCE:.0%}: "
        f"{share([e <= TOLERANCE for e in unseen])}; median error {np.median(unseen):.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
