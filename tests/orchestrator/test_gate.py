"""Tests for the variant gate and TFLite variants, on real onnxruntime and LiteRT sessions."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgefleet.orchestrator.compress.gate import GateError, evaluate_variant
from edgefleet.orchestrator.compress.quantize import quantize_static_qdq
from edgefleet.orchestrator.compress.tflite import TfliteExportError, export_tflite

SIZE = 32
FAST: dict[str, Any] = {"warmup": 1, "repeats": 3}


def conv_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    ).eval()


def samples(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, SIZE, SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def module() -> torch.nn.Module:
    return conv_net()


@pytest.fixture(scope="module")
def source(module: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gate") / "source.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module, (torch.zeros(1, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}},
        )
    return path


@pytest.fixture(scope="module")
def int8(source: Path) -> Path:
    return quantize_static_qdq(source, source.with_name("int8.onnx"), samples(32, seed=1))


def test_gate_accepts_int8(source: Path, int8: Path) -> None:
    result = evaluate_variant(int8, source, samples(64, seed=2), labels=None, max_accuracy_drop=10.0, **FAST)
    assert result.status == "accepted", result.reason
    assert result.accuracy_metric == "top1_agreement"
    assert result.accuracy is not None and result.accuracy >= 0.9
    assert result.source_accuracy == 1.0
    assert result.runtime == "onnxruntime"


def test_gate_measures_latency(source: Path, int8: Path) -> None:
    result = evaluate_variant(int8, source, samples(8, seed=2), labels=None, max_accuracy_drop=100.0, **FAST)
    assert set(result.latency_p50_ms) == {"threads=1", "threads=2"}
    assert set(result.source_latency_p50_ms) == {"threads=1", "threads=2"}
    assert all(value > 0 for value in result.latency_p50_ms.values())
    expected = result.source_latency_p50_ms["threads=1"] / result.latency_p50_ms["threads=1"]
    assert result.speedup["threads=1"] == pytest.approx(expected)
    assert result.slower_than_source == any(
        result.latency_p50_ms[k] > result.source_latency_p50_ms[k] for k in result.latency_p50_ms
    )


def test_gate_rejects_too_few_samples(source: Path) -> None:
    """On 3 samples one changed top-1 costs 33 points, so a 1-point limit cannot be measured."""
    result = evaluate_variant(source, source, samples(3, seed=2), labels=None, max_accuracy_drop=1.0,
                              threads=(1,), **FAST)

    assert result.status == "rejected"
    assert result.reason.startswith("too few evaluation samples: on 3 samples one sample is worth 33.33 points")
    assert "give at least 100 evaluation samples or raise max_accuracy_drop to 33.34" in result.reason
    assert result.evaluation_samples == 3
    assert result.accuracy == 1.0


def test_gate_sample_worth_limit_accepted(source: Path) -> None:
    """One sample worth exactly the limit is enough: 100 samples measure a 1-point drop."""
    result = evaluate_variant(source, source, samples(100, seed=2), labels=None, max_accuracy_drop=1.0,
                              threads=(1,), **FAST)

    assert result.status == "accepted", result.reason
    assert result.evaluation_samples == 100


def test_gate_zero_limit_few_samples(source: Path) -> None:
    """A limit of 0 allows no changed sample, which any number of samples checks."""
    result = evaluate_variant(source, source, samples(3, seed=2), labels=None, max_accuracy_drop=0.0,
                              threads=(1,), **FAST)

    assert result.status == "accepted", result.reason


def test_gate_drop_reason_before_sample_count(source: Path, tmp_path: Path) -> None:
    """A measured drop over the limit is the reason given, even on too few samples."""
    broken = randomize_weights(source, tmp_path / "broken.onnx")
    result = evaluate_variant(broken, source, samples(8, seed=2), labels=None, max_accuracy_drop=5.0,
                              threads=(1,), **FAST)

    assert result.status == "rejected"
    assert "exceeds max_accuracy_drop 5" in result.reason


def test_gate_reports_sizes(source: Path, int8: Path) -> None:
    result = evaluate_variant(int8, source, samples(4, seed=2), labels=None, max_accuracy_drop=100.0,
                              threads=(1,), **FAST)
    assert result.size_bytes == int8.stat().st_size
    assert result.source_size_bytes == source.stat().st_size


def test_gate_top1_with_labels(source: Path, int8: Path, module: torch.nn.Module) -> None:
    inputs = samples(32, seed=3)
    with torch.no_grad():
        labels = module(torch.from_numpy(inputs)).argmax(dim=1).numpy()
    labels[:4] = (labels[:4] + 1) % 10  # The source is now wrong on 4 of 32 samples.
    result = evaluate_variant(
        int8, source, inputs, labels=labels, max_accuracy_drop=10.0, threads=(1,), **FAST
    )
    assert result.accuracy_metric == "top1"
    assert result.source_accuracy == pytest.approx(28 / 32)


def randomize_weights(source: Path, target: Path) -> Path:
    model = onnx.load(str(source))
    rng = np.random.default_rng(0)
    for index, initializer in enumerate(model.graph.initializer):
        values = numpy_helper.to_array(initializer)
        if values.dtype == np.float32 and values.ndim >= 2:
            noise = rng.standard_normal(values.shape).astype(np.float32)
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(noise, initializer.name))
    onnx.save(model, str(target))
    return target


def test_gate_rejects_random_weights(source: Path, tmp_path: Path) -> None:
    broken = randomize_weights(source, tmp_path / "broken.onnx")
    result = evaluate_variant(broken, source, samples(64, seed=2), labels=None, max_accuracy_drop=5.0, **FAST)
    assert result.status == "rejected"
    assert "exceeds max_accuracy_drop 5" in result.reason
    assert result.accuracy_drop_points is not None and result.accuracy_drop_points > 5.0


def test_gate_rejects_unloadable(source: Path, tmp_path: Path) -> None:
    broken = tmp_path / "truncated.onnx"
    broken.write_bytes(source.read_bytes()[:200])
    result = evaluate_variant(broken, source, samples(4, seed=2), labels=None, max_accuracy_drop=5.0, **FAST)
    assert result.status == "rejected"
    assert result.reason.startswith("failed to load on onnxruntime")


def test_gate_rejects_wrong_runtime(source: Path, int8: Path) -> None:
    result = evaluate_variant(
        int8, source, samples(4, seed=2), labels=None, runtimes=("onnxruntime", "litert"),
        max_accuracy_drop=5.0, **FAST,
    )
    assert result.status == "rejected"
    assert "onnx models load on onnxruntime, not on litert" in result.reason


def test_gate_invalid_drop(source: Path, int8: Path) -> None:
    with pytest.raises(GateError, match="max_accuracy_drop -1"):
        evaluate_variant(int8, source, samples(4, seed=2), labels=None, max_accuracy_drop=-1)


def test_gate_labels_mismatch(source: Path, int8: Path) -> None:
    with pytest.raises(GateError, match="labels has 3 entries"):
        evaluate_variant(int8, source, samples(4, seed=2), labels=np.zeros(3), max_accuracy_drop=1)


@pytest.mark.parametrize("wrong", [10, -1])
def test_gate_labels_out_of_range(source: Path, int8: Path, wrong: int) -> None:
    labels = np.array([0, 1, wrong, 2])

    with pytest.raises(GateError, match=f"class {wrong} at sample 2 .1 of 4 out of range.*from 0 to 9"):
        evaluate_variant(int8, source, samples(4, seed=2), labels=labels, max_accuracy_drop=1)


@pytest.fixture(scope="module")
def tflite_fp32(module: torch.nn.Module, source: Path) -> Path:
    return export_tflite(module, samples(1, seed=0), source.with_name("fp32.tflite"))


@pytest.fixture(scope="module")
def tflite_int8(module: torch.nn.Module, source: Path) -> Path:
    return export_tflite(
        module, samples(1, seed=0), source.with_name("int8.tflite"), precision="int8",
        calibration=samples(32, seed=1),
    )


@pytest.mark.slow
def test_tflite_fp32_matches_source(source: Path, tflite_fp32: Path) -> None:
    result = evaluate_variant(tflite_fp32, source, samples(32, seed=2), labels=None, runtimes=("litert",),
                              max_accuracy_drop=0.0, threads=(1,), **FAST)
    assert result.status == "accepted", result.reason
    assert result.runtime == "litert"
    assert result.accuracy == 1.0


@pytest.mark.slow
def test_tflite_int8_agrees(source: Path, tflite_int8: Path) -> None:
    result = evaluate_variant(tflite_int8, source, samples(64, seed=2), labels=None, runtimes=("litert",),
                              max_accuracy_drop=10.0, threads=(1,), **FAST)
    assert result.status == "accepted", result.reason


@pytest.mark.slow
def test_tflite_int8_smaller(tflite_fp32: Path, tflite_int8: Path) -> None:
    assert tflite_int8.stat().st_size < tflite_fp32.stat().st_size


@pytest.mark.slow
def test_tflite_fp16(module: torch.nn.Module, source: Path, tmp_path: Path) -> None:
    path = export_tflite(module, samples(1, seed=0), tmp_path / "fp16.tflite", precision="fp16")
    result = evaluate_variant(path, source, samples(16, seed=2), labels=None, runtimes=("litert",),
                              max_accuracy_drop=0.0, threads=(1,), **FAST)
    assert result.status == "accepted", result.reason


class _ChannelsLast(torch.nn.Module):
    """The same network taking NHWC input, as TFLite models converted from TensorFlow do."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 3, 1, 2))


@pytest.mark.slow
def test_tflite_nhwc_of_nchw_source(module: torch.nn.Module, source: Path, tmp_path: Path) -> None:
    """A channels-last TFLite variant of a channels-first ONNX source gets the samples in its own layout."""
    nhwc_sample = samples(1, seed=0).transpose(0, 2, 3, 1).copy()
    path = export_tflite(_ChannelsLast(module).eval(), nhwc_sample, tmp_path / "nhwc.tflite")

    result = evaluate_variant(path, source, samples(16, seed=2), labels=None, runtimes=("litert",),
                              max_accuracy_drop=0.0, threads=(1,), **FAST)

    assert result.status == "accepted", result.reason
    assert result.accuracy == 1.0


def test_tflite_int8_needs_calibration(module: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(TfliteExportError, match="calibration"):
        export_tflite(module, samples(1, seed=0), tmp_path / "x.tflite", precision="int8")


def test_tflite_invalid_precision(module: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(TfliteExportError, match="invalid precision 'int4'"):
        export_tflite(module, samples(1, seed=0), tmp_path / "x.tflite", precision="int4")
