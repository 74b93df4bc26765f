"""Measure the overhead of ModelHost.infer over bare onnxruntime and LiteRT calls on EfficientNet-Lite0."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from ai_edge_litert.interpreter import Interpreter
from common import interleaved_samples

from edgefleet.agent.runtime import ModelHost
from edgefleet.agent.runtime.litert import LiteRTRunner
from edgefleet.agent.runtime.onnx import OnnxRunner
from edgefleet.demo.assets import ensure_efficientnet_lite0_onnx, ensure_efficientnet_lite0_tflite

# Target: the host's p50 at most 2 % above the bare runtime's p50.
TARGET_RATIO = 1.02


@dataclass(frozen=True)
class Row:
    runtime: str
    threads: int
    bare_p50_ms: float
    host_p50_ms: float
    host_callback_p50_ms: float
    overhead_p50_us: float  # ModelHost.infer wall time minus the runtime call it reports.


def _p50(samples_ns: list[int]) -> float:
    return statistics.median(samples_ns) / 1e6


def _interleave(calls: dict[str, Callable[[], object]], warmup: int, runs: int) -> dict[str, float]:
    """Time the calls interleaved (see common.interleaved_samples); return each p50 in milliseconds."""
    return {name: _p50(values) for name, values in interleaved_samples(calls, warmup, runs).items()}


def _host_overhead_us(host: ModelHost, feeds: dict[str, np.ndarray], runs: int) -> float:
    """Return the p50 in microseconds of the time infer() spends outside the runtime call.

    Unlike the p50 ratios, this figure does not depend on run-to-run noise of the runtime itself.
    """
    samples = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        result = host.infer("model", feeds)
        samples.append(time.perf_counter_ns() - start - result.latency_ms * 1e6)
    return statistics.median(samples) / 1e3


def _hosts(path: Path, model_format: str, threads: int) -> tuple[ModelHost, ModelHost]:
    """Return two hosts serving path as "model": one without and one with an on_latency callback."""
    recorded: list[float] = []

    def record(name: str, variant_id: str, latency_ms: float, ok: bool) -> None:
        recorded.append(latency_ms)

    runners = {"onnx": OnnxRunner(), "tflite": LiteRTRunner()}
    plain = ModelHost(runners=runners)
    with_callback = ModelHost(runners=runners, on_latency=record)
    for host in (plain, with_callback):
        host.install("model", "1", "bench", path, model_format, threads)
    return plain, with_callback


def bench_onnxruntime(path: Path, threads: int, image: np.ndarray, warmup: int, runs: int) -> Row:
    """Compare ModelHost.infer with InferenceSession.run under the same session options."""
    session = ort.InferenceSession(str(path), OnnxRunner().session_options(threads), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    plain, with_callback = _hosts(path, "onnx", threads)
    feeds = {input_name: image}
    p50 = _interleave(
        {
            "bare": lambda: session.run(None, feeds),
            "host": lambda: plain.infer("model", feeds),
            "host_callback": lambda: with_callback.infer("model", feeds),
        },
        warmup,
        runs,
    )
    overhead = _host_overhead_us(plain, feeds, runs)
    return Row("onnxruntime", threads, p50["bare"], p50["host"], p50["host_callback"], overhead)


def bench_litert(path: Path, threads: int, image: np.ndarray, warmup: int, runs: int) -> Row:
    """Compare ModelHost.infer with a bare Interpreter's set_tensor, invoke and get_tensor."""
    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]

    def bare() -> np.ndarray:
        interpreter.set_tensor(input_index, image)
        interpreter.invoke()
        return interpreter.get_tensor(output_index)

    plain, with_callback = _hosts(path, "tflite", threads)
    input_name = interpreter.get_input_details()[0]["name"]
    feeds = {input_name: image}
    p50 = _interleave(
        {
            "bare": bare,
            "host": lambda: plain.infer("model", feeds),
            "host_callback": lambda: with_callback.infer("model", feeds),
        },
        warmup,
        runs,
    )
    overhead = _host_overhead_us(plain, feeds, runs)
    return Row("litert", threads, p50["bare"], p50["host"], p50["host_callback"], overhead)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=100, help="timed calls per variant (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls per variant first (default 10)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--cache", type=Path, default=None, help="model cache (default: the demo cache)")
    args = parser.parse_args()
    thread_counts = [int(value) for value in args.threads.split(",")]

    onnx_path = ensure_efficientnet_lite0_onnx(args.cache)
    tflite_path = ensure_efficientnet_lite0_tflite(args.cache)
    rng = np.random.default_rng(0)
    nchw = rng.uniform(-1.0, 1.0, size=(1, 3, 224, 224)).astype(np.float32)
    nhwc = np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))

    print(f"EfficientNet-Lite0, {args.runs} interleaved runs per variant after {args.warmup} warm-up runs")
    cpu = platform.processor() or "unknown CPU"
    print(f"host: {platform.machine()}, {cpu}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"onnxruntime {ort.__version__}; ratio = host p50 / bare p50, target <= {TARGET_RATIO}")
    header = (
        f"{'runtime':<12} {'threads':>7} {'bare p50 ms':>12} {'host p50 ms':>12} {'ratio':>7} "
        f"{'host+callback ms':>17} {'ratio':>7} {'overhead us':>12} {'overhead %':>10}"
    )
    print(header)
    rows = []
    for threads in thread_counts:
        rows.append(bench_onnxruntime(onnx_path, threads, nchw, args.warmup, args.runs))
        rows.append(bench_litert(tflite_path, threads, nhwc, args.warmup, args.runs))
    for row in rows:
        ratio = row.host_p50_ms / row.bare_p50_ms
        callback_ratio = row.host_callback_p50_ms / row.bare_p50_ms
        print(
            f"{row.runtime:<12} {row.threads:>7} {row.bare_p50_ms:>12.3f} {row.host_p50_ms:>12.3f} "
            f"{ratio:>7.3f} {row.host_callback_p50_ms:>17.3f} {callback_ratio:>7.3f} {row.overhead_p50_us:>12.1f} "
            f"{100 * row.overhead_p50_us / 1000 / row.bare_p50_ms:>10.2f}"
        )


if __name__ == "__main__":
    main()
