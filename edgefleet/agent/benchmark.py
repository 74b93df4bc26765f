"""On-device latency benchmark of a model at 1..n threads, and a worker that runs it off the inference path."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.agent.runtime.base import Runner, release_freed_memory, zeros_for
from edgefleet.common.amdahl import ThreadChoice, choose_threads
from edgefleet.common.models import TensorSpec
from edgefleet.v1 import agent_pb2

log = logging.getLogger(__name__)

DEFAULT_RUNS = 20
DEFAULT_WARMUP = 3
MAX_RUNS = 1000
MAX_THREADS = 64


@dataclass(frozen=True)
class ThreadLatency:
    """Latency percentiles of one model at one thread count."""

    threads: int
    p50_ms: float
    p95_ms: float
    runs: int


@dataclass(frozen=True)
class ModelBenchmark:
    """Latencies of one model file at each thread count from 1 to n, and the Amdahl thread choice."""

    runtime: str
    providers: tuple[str, ...]
    by_threads: tuple[ThreadLatency, ...]
    choice: ThreadChoice

    def to_proto(self, variant_id: str) -> agent_pb2.BenchmarkReport:
        """Return the report the agent sends on its control stream."""
        return agent_pb2.BenchmarkReport(
            variant_id=variant_id,
            runtime=self.runtime,
            by_threads=[
                agent_pb2.ThreadLatency(threads=t.threads, p50_ms=t.p50_ms, p95_ms=t.p95_ms, runs=t.runs)
                for t in self.by_threads
            ],
        )


def _default_runners() -> dict[str, Runner]:
    from edgefleet.agent.runtime.litert import LiteRTRunner
    from edgefleet.agent.runtime.onnx import OnnxRunner

    return {"onnx": OnnxRunner(), "tflite": LiteRTRunner()}


def sample_input(spec: TensorSpec, rng: np.random.Generator | None) -> np.ndarray:
    """Return an input for spec: zeros when rng is None, else random values of the spec's dtype.

    Dynamic axes are set to 1. Floats are standard normal and integers span the dtype's range
    (booleans are random too).
    """
    if rng is None:
        return zeros_for(spec)
    shape = tuple(1 if dim < 0 else dim for dim in spec.shape)
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        limits = np.iinfo(dtype)
        return rng.integers(limits.min, limits.max, size=shape, endpoint=True, dtype=dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    return zeros_for(spec)


def benchmark_model(
    path: Path | str,
    format: str,
    *,
    max_threads: int,
    runs: int = DEFAULT_RUNS,
    warmup: int = DEFAULT_WARMUP,
    random_inputs: bool = False,
    seed: int = 0,
    runners: Mapping[str, Runner] | None = None,
    share: float = 0.9,
) -> ModelBenchmark:
    """Measure the latency of a model file at 1, 2, ..., max_threads threads.

    Each thread count gets its own runtime session, because onnxruntime's intra_op_num_threads
    and LiteRT's num_threads are fixed when the session is created. After warmup untimed calls,
    runs calls are timed (the runtime call only) on zeros, or on random data with random_inputs,
    of the model's input shapes. Returns p50 and p95 per thread count and the Amdahl thread
    choice (common.amdahl.choose_threads with share). Raises ValueError for an unknown format or
    counts out of range, and ModelLoadError when the runtime cannot load the file.
    """
    if not 1 <= max_threads <= MAX_THREADS:
        raise ValueError(f"max_threads must be in [1, {MAX_THREADS}], got {max_threads}")
    if not 1 <= runs <= MAX_RUNS:
        raise ValueError(f"runs must be in [1, {MAX_RUNS}], got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be 0 or more, got {warmup}")
    available = dict(runners) if runners is not None else _default_runners()
    runner = available.get(format)
    if runner is None:
        raise ValueError(f"unknown model format {format!r}; use one of {sorted(available)}")
    rng = np.random.default_rng(seed) if random_inputs else None
    results: list[ThreadLatency] = []
    providers: tuple[str, ...] = ()
    for threads in range(1, max_threads + 1):
        model = runner.load(path, threads=threads)
        try:
            providers = model.providers
            feeds = {spec.name: sample_input(spec, rng) for spec in model.inputs}
            for _ in range(warmup):
                model.run_checked(feeds)
            timings = np.empty(runs)
            for i in range(runs):
                start = time.perf_counter_ns()
                model.run_checked(feeds)
                timings[i] = (time.perf_counter_ns() - start) / 1e6
        finally:
            model.close()
            # Each thread count loads a session of its own; without this, glibc keeps its freed memory.
            release_freed_memory()
        results.append(
            ThreadLatency(
                threads=threads,
                p50_ms=float(np.percentile(timings, 50)),
                p95_ms=float(np.percentile(timings, 95)),
                runs=runs,
            )
        )
    choice = choose_threads({r.threads: r.p50_ms for r in results}, share=share)
    return ModelBenchmark(runtime=runner.runtime, providers=providers, by_threads=tuple(results), choice=choice)


SendCallback = Callable[[agent_pb2.AgentMessage], None]


class BenchmarkWorker:
    """Runs benchmarks one at a time on a background thread and sends each report through send().

    A benchmark competes with inference for the device's cores, so only one runs at a time and
    never with more than max_threads threads (the device's thread budget). send() is called on the
    worker thread and must be thread-safe.
    """

    def __init__(
        self,
        send: SendCallback,
        *,
        max_threads: int,
        runs: int = DEFAULT_RUNS,
        runners: Mapping[str, Runner] | None = None,
    ) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be at least 1, got {max_threads}")
        self._send = send
        self.max_threads = max_threads
        self.runs = runs
        self._runners = runners
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="benchmark")
        self._closed = False

    def submit(
        self,
        variant_id: str,
        path: Path,
        format: str,
        *,
        max_threads: int = 0,
        runs: int = 0,
        command_id: str = "",
    ) -> concurrent.futures.Future[ModelBenchmark | None] | None:
        """Queue a benchmark of a model file; return its future, or None after close().

        max_threads and runs of 0 take the worker's defaults; max_threads is capped at the
        worker's. With a command_id, a CommandAck follows the report (ok=False with the error
        when the benchmark fails). A failure is logged, never raised.
        """
        if self._closed:
            return None
        threads = min(max_threads or self.max_threads, self.max_threads)
        count = min(runs or self.runs, MAX_RUNS)
        return self._executor.submit(self._run, variant_id, path, format, threads, count, command_id)

    def _run(
        self, variant_id: str, path: Path, format: str, threads: int, runs: int, command_id: str
    ) -> ModelBenchmark | None:
        started = time.monotonic()
        try:
            result = benchmark_model(path, format, max_threads=threads, runs=runs, runners=self._runners)
        except Exception as error:  # Runtimes raise their own exception types; the agent keeps serving.
            log.warning("benchmark of variant=%s at %s failed: %s", variant_id, path, error)
            if command_id:
                self._send(agent_pb2.AgentMessage(ack=agent_pb2.CommandAck(command_id=command_id, error=str(error))))
            return None
        log.info(
            "benchmarked variant=%s on %s at 1..%d threads in %.1f s: p50 %s ms, %d threads chosen (p=%.2f)",
            variant_id,
            result.runtime,
            threads,
            time.monotonic() - started,
            ", ".join(f"{t.p50_ms:.2f}" for t in result.by_threads),
            result.choice.threads,
            result.choice.parallel_fraction,
        )
        self._send(agent_pb2.AgentMessage(benchmark=result.to_proto(variant_id)))
        if command_id:
            self._send(agent_pb2.AgentMessage(ack=agent_pb2.CommandAck(command_id=command_id, ok=True)))
        return result

    def close(self) -> None:
        """Drop queued benchmarks and wait for the running one to finish."""
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
