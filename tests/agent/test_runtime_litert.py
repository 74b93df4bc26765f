"""Tests of the LiteRT runner on real float32 and int8 TFLite models: delegates, pool and quantization."""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.runtime import InvalidInputError, ModelClosedError, ModelLoadError
from edgefleet.agent.runtime.litert import LiteRTModel, LiteRTRunner, dequantize, quantize
from edgefleet.common.models import TensorSpec
from tests.agent.models import calibration_inputs, linear_reference, tflite_linear, tflite_linear_int8

# Input quantization error propagated through |W| plus half an output step: measured max 0.011 on
# the calibration inputs.
INT8_TOLERANCE = 0.03


@pytest.fixture(scope="module")
def float_path() -> Path:
    return tflite_linear()


@pytest.fixture(scope="module")
def int8_path() -> Path:
    return tflite_linear_int8()


def _cpu_runner(pool_size: int = 1) -> LiteRTRunner:
    """Return a runner that tries no GPU delegate, as on a device without one."""
    return LiteRTRunner(pool_size=pool_size, gpu_delegate_libraries=())


def _input_name(model: LiteRTModel) -> str:
    return model.inputs[0].name


def _output_name(model: LiteRTModel) -> str:
    return model.outputs[0].name


def test_quantize_uint8() -> None:
    spec = TensorSpec(name="x", dtype="uint8", shape=(4,), scale=0.5, zero_point=128)
    values = np.array([-100.0, 0.0, 0.74, 100.0], dtype=np.float32)
    np.testing.assert_array_equal(quantize(values, spec), np.array([0, 128, 129, 255], dtype=np.uint8))


def test_quantize_int8() -> None:
    spec = TensorSpec(name="x", dtype="int8", shape=(3,), scale=0.1, zero_point=-10)
    values = np.array([-20.0, 0.26, 20.0], dtype=np.float32)
    np.testing.assert_array_equal(quantize(values, spec), np.array([-128, -7, 127], dtype=np.int8))


def test_quantize_rejects_nan() -> None:
    spec = TensorSpec(name="x", dtype="int8", shape=(3,), scale=0.1, zero_point=0)

    with pytest.raises(InvalidInputError, match="input 'x' contains NaN"):
        quantize(np.array([0.0, np.nan, 1.0], dtype=np.float32), spec)


def test_quantize_huge_values_clip_silently() -> None:
    """Values whose quotient by the scale overflows float32 clip to the range's ends, without a numpy warning."""
    spec = TensorSpec(name="x", dtype="int8", shape=(4,), scale=1e-30, zero_point=0)
    values = np.array([3e38, -3e38, np.inf, -np.inf], dtype=np.float32)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = quantize(values, spec)

    np.testing.assert_array_equal(result, np.array([127, -128, 127, -128], dtype=np.int8))


def test_dequantize_int8() -> None:
    spec = TensorSpec(name="y", dtype="int8", shape=(3,), scale=0.25, zero_point=-128)
    values = np.array([-128, 0, 127], dtype=np.int8)
    result = dequantize(values, spec)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, np.array([0.0, 32.0, 63.75], dtype=np.float32))


def test_load_float_specs(float_path: Path) -> None:
    model = _cpu_runner().load(float_path, threads=1)
    (spec,) = model.inputs
    assert spec.dtype == "float32"
    assert spec.shape == (1, 4)
    assert spec.scale == 0.0
    assert model.outputs[0].shape == (1, 3)


def test_load_reports_xnnpack(float_path: Path) -> None:
    model = _cpu_runner().load(float_path, threads=2)
    assert model.runtime == "litert"
    assert model.threads == 2
    assert model.requested_providers == ("xnnpack", "cpu")
    assert model.providers == ("xnnpack",)
    assert model.fallback_reason == ""


def test_run_float_matches_numpy(float_path: Path) -> None:
    model = _cpu_runner().load(float_path, threads=1)
    x = np.array([[0.3, -1.2, 0.8, 2.0]], dtype=np.float32)
    outputs = model.run({_input_name(model): x})
    np.testing.assert_allclose(outputs[_output_name(model)], linear_reference(x), rtol=1e-5, atol=1e-6)


def test_run_without_xnnpack(float_path: Path) -> None:
    model = _cpu_runner().load(float_path, threads=1, allowed_providers=["cpu"])
    x = np.array([[0.3, -1.2, 0.8, 2.0]], dtype=np.float32)
    outputs = model.run({_input_name(model): x})
    assert model.providers == ("cpu",)
    np.testing.assert_allclose(outputs[_output_name(model)], linear_reference(x), rtol=1e-5, atol=1e-6)


def test_gpu_fallback_default_libraries(float_path: Path) -> None:
    model = LiteRTRunner().load(float_path, threads=1)
    assert model.requested_providers == ("gpu", "xnnpack", "cpu")
    assert model.providers == ("xnnpack",)
    assert "libtensorflowlite_gpu_delegate.so" in model.fallback_reason


def test_gpu_fallback_invalid_library(float_path: Path, tmp_path: Path) -> None:
    fake = tmp_path / "libfake_gpu_delegate.so"
    fake.write_bytes(b"not a shared library")
    model = LiteRTRunner(gpu_delegate_libraries=[str(fake)]).load(float_path, threads=1)
    assert model.providers == ("xnnpack",)
    assert str(fake) in model.fallback_reason


def test_gpu_not_allowed(float_path: Path) -> None:
    model = LiteRTRunner().load(float_path, threads=1, allowed_providers=["xnnpack"])
    assert model.requested_providers == ("xnnpack", "cpu")
    assert model.fallback_reason == ""


def test_run_rejects_shape(float_path: Path) -> None:
    model = _cpu_runner().load(float_path, threads=1)
    with pytest.raises(InvalidInputError, match=r"received float32 with shape \(2, 4\)"):
        model.run({_input_name(model): np.zeros((2, 4), dtype=np.float32)})


def test_load_int8_specs(int8_path: Path) -> None:
    model = _cpu_runner().load(int8_path, threads=1)
    (spec,) = model.inputs
    (output,) = model.outputs
    assert spec.dtype == "int8"
    assert spec.scale > 0.0
    assert output.dtype == "int8"
    assert output.scale > 0.0


def test_run_int8_quantizes_float(int8_path: Path) -> None:
    model = _cpu_runner().load(int8_path, threads=1)
    for x in calibration_inputs(8):
        result = model.run({_input_name(model): x})[_output_name(model)]
        assert result.dtype == np.float32
        np.testing.assert_allclose(result, linear_reference(x), atol=INT8_TOLERANCE)


def test_run_int8_accepts_quantized(int8_path: Path) -> None:
    model = _cpu_runner().load(int8_path, threads=1)
    x = calibration_inputs(1)[0]
    from_float = model.run({_input_name(model): x})[_output_name(model)]
    from_int8 = model.run({_input_name(model): quantize(x, model.inputs[0])})[_output_name(model)]
    np.testing.assert_array_equal(from_int8, from_float)


def test_run_int8_rejects_int32(int8_path: Path) -> None:
    model = _cpu_runner().load(int8_path, threads=1)
    with pytest.raises(InvalidInputError, match=r"int8 \(or float32 to quantize\)"):
        model.run({_input_name(model): np.zeros((1, 4), dtype=np.int32)})


def test_load_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"this is not a flatbuffer")
    with pytest.raises(ModelLoadError, match="LiteRT failed to load"):
        _cpu_runner().load(broken, threads=1)


def test_pool_size_invalid() -> None:
    with pytest.raises(ValueError, match="pool_size must be at least 1"):
        LiteRTRunner(pool_size=0)


def test_closed_model_rejects_run(float_path: Path) -> None:
    model = _cpu_runner().load(float_path, threads=1)
    model.close()
    with pytest.raises(ModelClosedError, match="closed"):
        model.run({_input_name(model): np.zeros((1, 4), dtype=np.float32)})


def test_close_releases_waiting_call(float_path: Path) -> None:
    model = _cpu_runner().load(float_path, threads=1)
    slot = model._acquire()  # Hold the only interpreter so the next call waits.
    errors: list[BaseException] = []

    def call() -> None:
        try:
            model.run({_input_name(model): np.zeros((1, 4), dtype=np.float32)})
        except ModelClosedError as error:
            errors.append(error)

    waiter = threading.Thread(target=call)
    waiter.start()
    model.close()
    model._release(slot)
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert len(errors) == 1


@pytest.mark.parametrize("pool_size", [1, 2])
def test_concurrent_equals_sequential(int8_path: Path, pool_size: int) -> None:
    model = _cpu_runner(pool_size).load(int8_path, threads=1)
    name = _input_name(model)
    output = _output_name(model)
    rng = np.random.default_rng(7)
    inputs = [rng.uniform(-1.0, 1.0, size=(1, 4)).astype(np.float32) for _ in range(300)]
    sequential = [model.run({name: x})[output] for x in inputs]
    with ThreadPoolExecutor(max_workers=6) as pool:
        concurrent = list(pool.map(lambda x: model.run({name: x})[output], inputs))
    mismatches = [
        i for i, (a, b) in enumerate(zip(sequential, concurrent, strict=True)) if not np.array_equal(a, b)
    ]
    assert model.pool_size == pool_size
    assert mismatches == []
