"""Tests of the onnxruntime runner on real sessions: options, providers, input checks and threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgefleet.agent.runtime import InvalidInputError, ModelClosedError, ModelLoadError, check_feeds, choose_threads
from edgefleet.agent.runtime.onnx import OnnxRunner, select_providers
from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.models import TensorSpec
from tests.agent.models import linear_reference, onnx_linear, onnx_two_inputs

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@pytest.fixture(scope="module")
def linear_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return onnx_linear(tmp_path_factory.mktemp("onnx") / "linear.onnx")


@pytest.fixture(scope="module")
def two_inputs_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return onnx_two_inputs(tmp_path_factory.mktemp("onnx") / "two_inputs.onnx")


def _profile(usable_cores: float) -> HardwareProfile:
    return HardwareProfile(
        cpu_model="test",
        architecture="x86_64",
        logical_cores=4,
        usable_cores=usable_cores,
        cpu_features=(),
        memory_total_bytes=1 << 30,
        memory_available_bytes=1 << 30,
        disk_free_bytes=1 << 30,
    )


def test_session_options_values() -> None:
    options = OnnxRunner().session_options(3)
    assert options.intra_op_num_threads == 3
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_session_options_spin_duration() -> None:
    options = OnnxRunner().session_options(2)
    assert options.get_session_config_entry("session.intra_op.spin_duration_us") == "50"


def test_session_options_default_spin() -> None:
    options = OnnxRunner().session_options(2, spin_duration_us=None)
    with pytest.raises(RuntimeError, match="does not have configuration"):
        options.get_session_config_entry("session.intra_op.spin_duration_us")


def test_session_options_negative_spin() -> None:
    with pytest.raises(ValueError, match="spin_duration_us must be at least 0, got -1"):
        OnnxRunner().session_options(2, spin_duration_us=-1)


def test_session_options_zero_threads() -> None:
    with pytest.raises(ValueError, match="threads must be at least 1"):
        OnnxRunner().session_options(0)


@pytest.mark.parametrize(
    ("usable_cores", "requested", "expected"),
    [(2.5, 0, 2), (0.5, 0, 1), (8.0, 3, 3), (1.0, 0, 1)],
)
def test_choose_threads_cases(usable_cores: float, requested: int, expected: int) -> None:
    assert choose_threads(_profile(usable_cores), requested) == expected


def test_choose_threads_negative() -> None:
    with pytest.raises(ValueError, match="got -1"):
        choose_threads(None, -1)


def test_select_providers_order() -> None:
    available = [CPU, CUDA, "AzureExecutionProvider", "TensorrtExecutionProvider"]
    assert select_providers(available, None) == ("TensorrtExecutionProvider", CUDA, CPU)


def test_select_providers_allow_list() -> None:
    available = [CPU, CUDA, "TensorrtExecutionProvider", "OpenVINOExecutionProvider"]
    assert select_providers(available, ["cuda", "OpenVINOExecutionProvider"]) == (
        CUDA,
        "OpenVINOExecutionProvider",
        CPU,
    )


def test_select_providers_cpu_always_last() -> None:
    assert select_providers([CUDA, CPU], []) == (CPU,)


def test_load_specs(linear_path: Path) -> None:
    model = OnnxRunner().load(linear_path, threads=1)
    (spec,) = model.inputs
    assert spec.name == "x"
    assert spec.dtype == "float32"
    assert spec.shape == (-1, 4)
    assert spec.dim_names == ("batch", "")
    assert [output.name for output in model.outputs] == ["y"]


def test_load_reports_runtime(linear_path: Path) -> None:
    model = OnnxRunner().load(linear_path, threads=2)
    assert model.runtime == "onnxruntime"
    assert model.threads == 2
    assert model.providers == (CPU,)
    assert model.fallback_reason == ""


def test_run_matches_numpy(linear_path: Path) -> None:
    model = OnnxRunner().load(linear_path, threads=1)
    x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    outputs = model.run({"x": x})
    np.testing.assert_allclose(outputs["y"], linear_reference(x), rtol=1e-5, atol=1e-6)


def test_run_converts_float64(linear_path: Path) -> None:
    model = OnnxRunner().load(linear_path, threads=1)
    x = np.random.default_rng(4).standard_normal((2, 4))
    outputs = model.run({"x": x})
    assert outputs["y"].dtype == np.float32
    np.testing.assert_allclose(outputs["y"], linear_reference(x), rtol=1e-5, atol=1e-6)


def test_run_converts_int32(two_inputs_path: Path) -> None:
    model = OnnxRunner().load(two_inputs_path, threads=1)
    ids = np.array([[1, 2], [3, 4]], dtype=np.int32)
    outputs = model.run({"ids": ids, "offset": np.array([0.5], dtype=np.float32)})
    np.testing.assert_array_equal(outputs["total"], np.array([3.5, 7.5], dtype=np.float32))


def test_run_rejects_dtype(linear_path: Path) -> None:
    model = OnnxRunner().load(linear_path, threads=1)
    with pytest.raises(InvalidInputError) as caught:
        model.run({"x": np.zeros((1, 4), dtype=np.int8)})
    message = str(caught.value)
    assert "'x'" in message
    assert "expected float32 with shape (-1, 4)" in message
    assert "received int8 with shape (1, 4)" in message


def test_run_rejects_float64_for_int64(two_inputs_path: Path) -> None:
    model = OnnxRunner().load(two_inputs_path, threads=1)
    with pytest.raises(InvalidInputError, match=r"'ids'.*received float64"):
        model.run({"ids": np.zeros((1, 2)), "offset": np.zeros(1, dtype=np.float32)})


@pytest.mark.filterwarnings("error")  # A numpy RuntimeWarning would reach the agent's stderr.
@pytest.mark.parametrize("value", [1e300, -1e39])
def test_run_rejects_float32_overflow(linear_path: Path, value: float) -> None:
    model = OnnxRunner().load(linear_path, threads=1)
    x = np.full((2, 4), 0.5)
    x[1, 2] = value

    with pytest.raises(InvalidInputError) as caught:
        model.run({"x": x})

    message = str(caught.value)
    assert f"invalid input 'x': the float64 value {value!r} is finite but outside the float32 range" in message
    assert "-3.40282347e+38 to 3.40282347e+38" in message
    assert "scale the values into that range" in message


@pytest.mark.filterwarnings("error")
def test_run_keeps_float64_inf_and_nan(linear_path: Path) -> None:
    """Infinities and NaN exist in float32 too, so they pass unchanged; only finite values can overflow."""
    model = OnnxRunner().load(linear_path, threads=1)
    x = np.array([[np.inf, 0.0, 0.0, 0.0], [np.nan, 0.0, 0.0, 0.0]])

    outputs = model.run({"x": x})

    assert outputs["y"].shape == (2, 3)


def test_run_converts_int8_to_int64(two_inputs_path: Path) -> None:
    model = OnnxRunner().load(two_inputs_path, threads=1)
    ids = np.array([[-128, 127], [3, 4]], dtype=np.int8)

    outputs = model.run({"ids": ids, "offset": np.array([0.5], dtype=np.float32)})

    np.testing.assert_array_equal(outputs["total"], np.array([-0.5, 7.5], dtype=np.float32))


def test_run_converts_uint64_in_range(two_inputs_path: Path) -> None:
    model = OnnxRunner().load(two_inputs_path, threads=1)
    ids = np.array([[1, 2], [3, 2**62]], dtype=np.uint64)

    outputs = model.run({"ids": ids, "offset": np.array([0.0], dtype=np.float32)})

    np.testing.assert_array_equal(outputs["total"], np.array([3.0, 3.0 + 2**62], dtype=np.float32))


def test_run_rejects_uint64_out_of_range(two_inputs_path: Path) -> None:
    model = OnnxRunner().load(two_inputs_path, threads=1)
    ids = np.array([[1, 2**64 - 1]], dtype=np.uint64)

    with pytest.raises(InvalidInputError) as caught:
        model.run({"ids": ids, "offset": np.array([0.0], dtype=np.float32)})

    message = str(caught.value)
    assert f"invalid input 'ids': uint64 values from 1 to {2**64 - 1} do not fit in int64" in message
    assert f"whose range is {-(2**63)} to {2**63 - 1}" in message


@pytest.mark.parametrize(
    ("values", "dtype", "expected"),
    [
        ([0, 2**31 - 1, -(2**31)], "int32", None),
        ([0, 2**31], "int32", "int64 values from 0 to 2147483648 do not fit in int32"),
        ([0, 255], "uint8", None),
        ([-1, 255], "uint8", "int64 values from -1 to 255 do not fit in uint8, whose range is 0 to 255"),
    ],
)
def test_check_feeds_narrows_integers(values: list[int], dtype: str, expected: str | None) -> None:
    """int64 data, numpy's default, narrows to a smaller integer input only when every value fits."""
    spec = TensorSpec(name="ids", dtype=dtype, shape=(-1,))
    array = np.array(values, dtype=np.int64)

    if expected is None:
        converted = check_feeds([spec], {"ids": array})["ids"]
        assert converted.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(converted, array)
    else:
        with pytest.raises(InvalidInputError, match=f"invalid input 'ids': {expected}"):
            check_feeds([spec], {"ids": array})


def test_run_rejects_shape(linear_path: Path) -> None:
    model = OnnxRunner().load(linear_path, threads=1)
    with pytest.raises(InvalidInputError, match=r"received float32 with shape \(2, 5\)"):
        model.run({"x": np.zeros((2, 5), dtype=np.float32)})


def test_run_rejects_rank(linear_path: Path) -> None:
    model = OnnxRunner().load(linear_path, threads=1)
    with pytest.raises(InvalidInputError, match=r"received float32 with shape \(4,\)"):
        model.run({"x": np.zeros(4, dtype=np.float32)})


def test_run_rejects_names(two_inputs_path: Path) -> None:
    model = OnnxRunner().load(two_inputs_path, threads=1)
    with pytest.raises(InvalidInputError) as caught:
        model.run({"ids": np.zeros((1, 2), dtype=np.int64), "extra": np.zeros(1)})
    message = str(caught.value)
    assert "missing ['offset']" in message
    assert "unexpected ['extra']" in message


def test_fallback_to_cpu_recorded(linear_path: Path) -> None:
    runner = OnnxRunner(provider_discovery=lambda: [CUDA, CPU])
    model = runner.load(linear_path, threads=1)
    assert model.requested_providers == (CUDA, CPU)
    assert model.providers == (CPU,)
    assert CUDA in model.fallback_reason


def test_fallback_model_still_runs(linear_path: Path) -> None:
    model = OnnxRunner(provider_discovery=lambda: [CUDA, CPU]).load(linear_path, threads=1)
    x = np.ones((1, 4), dtype=np.float32)
    np.testing.assert_allclose(model.run({"x": x})["y"], linear_reference(x), rtol=1e-5, atol=1e-6)


def test_allow_list_skips_cuda(linear_path: Path) -> None:
    runner = OnnxRunner(provider_discovery=lambda: [CUDA, CPU])
    model = runner.load(linear_path, threads=1, allowed_providers=["cpu"])
    assert model.requested_providers == (CPU,)
    assert model.fallback_reason == ""


def test_available_providers_real() -> None:
    assert OnnxRunner().available_providers()[-1] == CPU


def test_load_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not an onnx protobuf")
    with pytest.raises(ModelLoadError, match="INVALID_PROTOBUF"):
        OnnxRunner().load(broken, threads=1)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"missing\.onnx"):
        OnnxRunner().load(tmp_path / "missing.onnx", threads=1)


def test_closed_model_rejects_run(linear_path: Path) -> None:
    model = OnnxRunner().load(linear_path, threads=1)
    model.close()
    with pytest.raises(ModelClosedError, match="closed"):
        model.run({"x": np.zeros((1, 4), dtype=np.float32)})


def test_concurrent_equals_sequential(linear_path: Path) -> None:
    model = OnnxRunner().load(linear_path, threads=2)
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(200)]
    sequential = [model.run({"x": x})["y"] for x in inputs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda x: model.run({"x": x})["y"], inputs))
    mismatches = [i for i, (a, b) in enumerate(zip(sequential, concurrent, strict=True)) if not np.array_equal(a, b)]
    assert mismatches == []


def test_dtypes_match_catalog_check() -> None:
    """The catalog rejects models with other tensor types, so the two lists must agree."""
    from edgefleet.agent.runtime.onnx import _ONNX_DTYPES
    from edgefleet.common.models import SERVED_DTYPES

    assert sorted(_ONNX_DTYPES.values()) == sorted(SERVED_DTYPES)
