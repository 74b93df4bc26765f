"""Tests of ModelHost on real onnxruntime and LiteRT models: install, infer, hot swap and failures."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

import edgefleet
from edgefleet.agent.runtime import (
    InvalidInputError,
    LoadedModel,
    ModelHost,
    ModelLoadError,
    ModelNotFoundError,
    Runner,
)
from edgefleet.agent.runtime.litert import LiteRTRunner
from edgefleet.agent.runtime.onnx import OnnxRunner
from edgefleet.demo.assets import ensure_efficientnet_lite0_onnx
from tests.agent.models import (
    calibration_inputs,
    linear_reference,
    onnx_failing_reshape,
    onnx_linear,
    tflite_linear_int8,
)

SWAPS = 20
INFER_THREADS = 4


class RecordingRunner(Runner):
    """A real runner that keeps every model it loads, so a test can check which were closed."""

    def __init__(self, runner: Runner) -> None:
        self.runtime = runner.runtime
        self.format = runner.format
        self._runner = runner
        self.loaded: list[LoadedModel] = []

    def available_providers(self) -> tuple[str, ...]:
        return self._runner.available_providers()

    def load(self, path: Path | str, *, threads: int, allowed_providers: Sequence[str] | None = None) -> LoadedModel:
        model = self._runner.load(path, threads=threads, allowed_providers=allowed_providers)
        self.loaded.append(model)
        return model


@pytest.fixture(scope="module")
def seed_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("host")
    return {seed: onnx_linear(folder / f"linear-{seed}.onnx", seed) for seed in (0, 1)}


@pytest.fixture
def recorder() -> RecordingRunner:
    return RecordingRunner(OnnxRunner())


@pytest.fixture
def host(recorder: RecordingRunner) -> ModelHost:
    return ModelHost(runners={"onnx": recorder})


def _x(rows: int = 1) -> np.ndarray:
    return np.linspace(-1.0, 1.0, rows * 4, dtype=np.float32).reshape(rows, 4)


def test_install_then_infer(host: ModelHost, seed_paths: dict[int, Path]) -> None:
    host.install("linear", "1", "variant-a", seed_paths[0], "onnx")
    result = host.infer("linear", {"x": _x(2)})
    np.testing.assert_allclose(result.outputs["y"], linear_reference(_x(2), 0), rtol=1e-5, atol=1e-6)
    assert result.model_version == "1"
    assert result.variant_id == "variant-a"
    assert result.model_name == "linear"
    assert result.latency_ms > 0.0


def test_install_returns_description(host: ModelHost, seed_paths: dict[int, Path]) -> None:
    served = host.install("linear", "1", "variant-a", seed_paths[0], "onnx", threads=2)
    assert served.runtime == "onnxruntime"
    assert served.threads == 2
    assert served.providers == ("CPUExecutionProvider",)
    assert [spec.name for spec in served.inputs] == ["x"]


def test_install_default_threads(recorder: RecordingRunner, seed_paths: dict[int, Path]) -> None:
    host = ModelHost(runners={"onnx": recorder}, default_threads=3)
    assert host.install("linear", "1", "v", seed_paths[0], "onnx").threads == 3


def test_warm_up_not_reported(recorder: RecordingRunner, seed_paths: dict[int, Path]) -> None:
    calls: list[tuple[str, str, float, bool]] = []
    warm_host = ModelHost(runners={"onnx": recorder}, on_latency=lambda *args: calls.append(args))
    warm_host.install("linear", "1", "v", seed_paths[0], "onnx")
    # Warm-up runs outside infer(), so it is not reported as a request.
    assert calls == []


def test_list_and_get(host: ModelHost, seed_paths: dict[int, Path]) -> None:
    host.install("b", "1", "vb", seed_paths[0], "onnx")
    host.install("a", "2", "va", seed_paths[1], "onnx")
    assert [served.name for served in host.list()] == ["a", "b"]
    served = host.get("a")
    assert served is not None
    assert served.version == "2"
    assert host.get("missing") is None
    assert "a" in host


def test_infer_unknown_name(host: ModelHost) -> None:
    with pytest.raises(ModelNotFoundError, match="'missing' is not installed"):
        host.infer("missing", {"x": _x()})


def test_infer_bare_array(host: ModelHost, seed_paths: dict[int, Path]) -> None:
    host.install("linear", "1", "variant-a", seed_paths[0], "onnx")

    with pytest.raises(TypeError, match=r"feeds must map each input name to an array, got ndarray"):
        host.infer("linear", _x())  # type: ignore[arg-type]


def test_install_unknown_format(host: ModelHost, seed_paths: dict[int, Path]) -> None:
    with pytest.raises(ValueError, match="unknown model format 'pt'"):
        host.install("linear", "1", "v", seed_paths[0], "pt")


def test_infer_invalid_input(recorder: RecordingRunner, seed_paths: dict[int, Path]) -> None:
    calls: list[tuple[str, str, float | None, bool]] = []
    host = ModelHost(runners={"onnx": recorder}, on_latency=lambda *args: calls.append(args))
    host.install("linear", "1", "v", seed_paths[0], "onnx")
    with pytest.raises(InvalidInputError, match="'x'"):
        host.infer("linear", {"x": np.zeros((1, 4), dtype=np.int8)})
    # Reported as a failed call, so that the error rate shows inputs the served variant rejects, with no
    # latency: the check's microseconds would pull the latency quantiles down.
    assert calls == [("linear", "v", None, False)]


def test_on_latency_called(recorder: RecordingRunner, seed_paths: dict[int, Path]) -> None:
    calls: list[tuple[str, str, float, bool]] = []
    host = ModelHost(runners={"onnx": recorder}, on_latency=lambda *args: calls.append(args))
    host.install("linear", "1", "variant-a", seed_paths[0], "onnx")
    result = host.infer("linear", {"x": _x()})
    assert calls == [("linear", "variant-a", result.latency_ms, True)]


def test_on_latency_failure_ignored(
    recorder: RecordingRunner, seed_paths: dict[int, Path], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(name: str, variant_id: str, latency_ms: float, ok: bool) -> None:
        raise RuntimeError("metrics store unavailable")

    host = ModelHost(runners={"onnx": recorder}, on_latency=broken)
    host.install("linear", "1", "v", seed_paths[0], "onnx")
    with caplog.at_level(logging.ERROR, logger="edgefleet.agent.runtime.host"):
        for _ in range(3):
            host.infer("linear", {"x": _x()})
    # Only the first of repeated failures is logged.
    assert len(caplog.records) == 1
    assert "on_latency callback failed" in caplog.records[0].getMessage()


def test_broken_file_keeps_old(host: ModelHost, seed_paths: dict[int, Path], tmp_path: Path) -> None:
    host.install("linear", "1", "v1", seed_paths[0], "onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x00\x01 truncated upload")
    with pytest.raises(ModelLoadError, match="INVALID_PROTOBUF"):
        host.install("linear", "2", "v2", broken, "onnx")
    result = host.infer("linear", {"x": _x()})
    assert result.model_version == "1"
    np.testing.assert_allclose(result.outputs["y"], linear_reference(_x(), 0), rtol=1e-5, atol=1e-6)


def test_failed_warm_up_keeps_old(
    host: ModelHost, recorder: RecordingRunner, seed_paths: dict[int, Path], tmp_path: Path
) -> None:
    host.install("linear", "1", "v1", seed_paths[0], "onnx")
    failing = onnx_failing_reshape(tmp_path / "failing.onnx")
    with pytest.raises(ModelLoadError, match="warm-up of linear version 2"):
        host.install("linear", "2", "v2", failing, "onnx")
    assert host.infer("linear", {"x": _x()}).model_version == "1"
    assert recorder.loaded[-1].closed


def test_remove(host: ModelHost, recorder: RecordingRunner, seed_paths: dict[int, Path]) -> None:
    host.install("linear", "1", "v1", seed_paths[0], "onnx")
    removed = host.remove("linear")
    assert removed.version == "1"
    assert recorder.loaded[0].closed
    with pytest.raises(ModelNotFoundError):
        host.infer("linear", {"x": _x()})


def test_remove_unknown(host: ModelHost) -> None:
    with pytest.raises(ModelNotFoundError, match="'missing'"):
        host.remove("missing")


def test_close_closes_models(host: ModelHost, recorder: RecordingRunner, seed_paths: dict[int, Path]) -> None:
    with host:
        host.install("a", "1", "v", seed_paths[0], "onnx")
        host.install("b", "1", "v", seed_paths[1], "onnx")
    assert host.list() == ()
    assert all(model.closed for model in recorder.loaded)


def test_swap_waits_for_in_flight(recorder: RecordingRunner, seed_paths: dict[int, Path]) -> None:
    entered = threading.Event()
    release = threading.Event()

    def block_first_call(name: str, variant_id: str, latency_ms: float, ok: bool) -> None:
        # The callback runs while the call still counts as in flight on its model version.
        if variant_id == "v1":
            entered.set()
            release.wait(timeout=10)

    host = ModelHost(runners={"onnx": recorder}, on_latency=block_first_call)
    host.install("linear", "1", "v1", seed_paths[0], "onnx")
    results = []
    caller = threading.Thread(target=lambda: results.append(host.infer("linear", {"x": _x()})))
    caller.start()
    assert entered.wait(timeout=10)

    host.install("linear", "2", "v2", seed_paths[1], "onnx")
    old_model, new_model = recorder.loaded
    assert not old_model.closed
    assert host.infer("linear", {"x": _x()}).model_version == "2"

    release.set()
    caller.join(timeout=10)
    assert results[0].model_version == "1"
    assert old_model.closed
    assert not new_model.closed


def test_hot_swap_under_load(recorder: RecordingRunner, seed_paths: dict[int, Path]) -> None:
    host = ModelHost(runners={"onnx": recorder})
    host.install("linear", "0", "seed-0", seed_paths[0], "onnx")
    stop = threading.Event()
    failures: list[BaseException] = []
    wrong_outputs: list[str] = []
    calls = [0] * INFER_THREADS
    x = _x(2)
    expected = {seed: linear_reference(x, seed) for seed in (0, 1)}

    def call_continuously(worker: int) -> None:
        while not stop.is_set():
            try:
                result = host.infer("linear", {"x": x})
            except Exception as error:
                failures.append(error)
                continue
            calls[worker] += 1
            seed = int(result.model_version) % 2
            if not np.allclose(result.outputs["y"], expected[seed], rtol=1e-5, atol=1e-6):
                wrong_outputs.append(result.model_version)

    workers = [threading.Thread(target=call_continuously, args=(i,)) for i in range(INFER_THREADS)]
    for worker in workers:
        worker.start()
    try:
        for version in range(1, SWAPS + 1):
            time.sleep(0.01)
            host.install("linear", str(version), f"seed-{version % 2}", seed_paths[version % 2], "onnx")
        time.sleep(0.01)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=10)

    assert failures == []
    assert wrong_outputs == []
    assert min(calls) > 0
    assert host.infer("linear", {"x": x}).model_version == str(SWAPS)
    assert [model.closed for model in recorder.loaded] == [True] * SWAPS + [False]


def test_tflite_int8_through_host(seed_paths: dict[int, Path]) -> None:
    host = ModelHost(runners={"onnx": OnnxRunner(), "tflite": LiteRTRunner(gpu_delegate_libraries=())})
    served = host.install("int8", "1", "v", tflite_linear_int8(), "tflite")
    x = calibration_inputs(1)[0]
    result = host.infer("int8", {served.inputs[0].name: x})
    assert served.providers == ("xnnpack",)
    np.testing.assert_allclose(result.outputs[served.outputs[0].name], linear_reference(x), atol=0.03)


def test_default_runners(seed_paths: dict[int, Path]) -> None:
    host = ModelHost()
    assert host.install("linear", "1", "v", seed_paths[0], "onnx").runtime == "onnxruntime"
    assert host.install("int8", "1", "v", tflite_linear_int8(), "tflite").runtime == "litert"


def test_prepared_reads_current_values(recorder: RecordingRunner, seed_paths: dict[int, Path]) -> None:
    calls: list[tuple[str, str, float, bool]] = []
    host = ModelHost(runners={"onnx": recorder}, on_latency=lambda *args: calls.append(args))
    host.install("linear", "1", "variant-a", seed_paths[0], "onnx")
    inputs = _x(3)
    prepared = host.prepare("linear", {"x": inputs})
    assert prepared is not None
    inputs[...] = inputs[::-1]

    result = host.infer_prepared(prepared)

    assert result is not None
    np.testing.assert_allclose(result.outputs["y"], linear_reference(inputs, 0), rtol=1e-5, atol=1e-6)
    assert (result.model_version, result.variant_id) == ("1", "variant-a")
    assert calls == [("linear", "variant-a", result.latency_ms, True)]


def test_prepared_after_swap(host: ModelHost, seed_paths: dict[int, Path]) -> None:
    host.install("linear", "1", "variant-a", seed_paths[0], "onnx")
    prepared = host.prepare("linear", {"x": _x()})
    assert prepared is not None
    host.install("linear", "2", "variant-b", seed_paths[1], "onnx")

    assert host.infer_prepared(prepared) is None
    assert host.infer("linear", {"x": _x()}).model_version == "2"


def test_prepare_rejects_conversion(host: ModelHost, seed_paths: dict[int, Path]) -> None:
    """float64 inputs are converted to a copy, which would not see later writes: no prepared call."""
    host.install("linear", "1", "variant-a", seed_paths[0], "onnx")

    assert host.prepare("linear", {"x": _x().astype(np.float64)}) is None
    with pytest.raises(InvalidInputError):
        host.prepare("linear", {"x": _x()[:, :3]})
    with pytest.raises(ModelNotFoundError):
        host.prepare("other", {"x": _x()})


# Swaps EfficientNet-Lite0 as the agent does: installs on one thread, a benchmark at 1 and 2 threads
# on another after each, then prints the RSS in KiB after the first swap and after each later one.
SWAP_MEMORY_SCRIPT = """
import concurrent.futures, sys
from pathlib import Path
from edgefleet.agent.benchmark import benchmark_model
from edgefleet.agent.runtime.host import ModelHost

path, swaps = Path(sys.argv[1]), int(sys.argv[2])

def resident_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))

host = ModelHost(default_threads=2)
installer = concurrent.futures.ThreadPoolExecutor(1)
benchmarker = concurrent.futures.ThreadPoolExecutor(1)
readings = []
for swap in range(swaps + 1):
    installer.submit(host.install, "effnet", str(swap), f"effnet:{swap}", path, "onnx", 2).result()
    benchmarker.submit(benchmark_model, path, "onnx", max_threads=2, runs=1, warmup=0).result()
    readings.append(resident_kib())
print(" ".join(map(str, readings)))
"""


def test_swaps_return_freed_memory() -> None:
    """RSS after many swaps stays near that after the first, as glibc gives the freed sessions back.

    Before the agent trimmed glibc's arenas, 6 swaps of this 18.7 MB model added about 90 MiB.
    """
    repo_root = Path(edgefleet.__file__).resolve().parents[1]
    completed = subprocess.run(
        [sys.executable, "-c", SWAP_MEMORY_SCRIPT, str(ensure_efficientnet_lite0_onnx()), "6"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
        check=False,
    )
    assert completed.returncode == 0, completed.stderr

    first, *later = (int(value) >> 10 for value in completed.stdout.split())
    assert len(later) == 6
    assert max(later) - first < 30, f"RSS in MiB after the first swap {first}, after each later one {later}"
