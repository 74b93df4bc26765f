"""Tests of the store's JSON codec for domain dataclasses."""

from __future__ import annotations

import pytest

from edgefleet.common.hardware import Accelerator, HardwareProfile, RuntimeInfo
from edgefleet.orchestrator.store.codec import hardware_from_dict, hardware_to_dict

PROFILE = HardwareProfile(
    cpu_model="ARM Cortex-A72",
    architecture="aarch64",
    logical_cores=4,
    usable_cores=2.5,
    cpu_features=("neon", "asimd"),
    memory_total_bytes=4 << 30,
    memory_available_bytes=3 << 30,
    disk_free_bytes=16 << 30,
    accelerators=(Accelerator(kind="npu", vendor="rockchip", name="rknpu"),),
    runtimes=(
        RuntimeInfo("onnxruntime", "1.20.0", ("CPUExecutionProvider",)),
        RuntimeInfo("litert", "1.4.0", ("XNNPACK",), package="ai-edge-litert"),
    ),
    profile_name="camera",
)


def test_hardware_round_trip() -> None:
    data = hardware_to_dict(PROFILE)

    assert hardware_from_dict(data) == PROFILE
    assert hardware_from_dict(data) == PROFILE  # The per-class field cache gives the same result again.


def test_missing_field_takes_default() -> None:
    data = hardware_to_dict(PROFILE)
    del data["kernel"]
    del data["accelerators"]

    profile = hardware_from_dict(data)

    assert profile.kernel == ""
    assert profile.accelerators == ()


def test_unknown_key_ignored() -> None:
    data = hardware_to_dict(PROFILE) | {"written_by_a_newer_version": 1}

    assert hardware_from_dict(data) == PROFILE


def test_missing_required_field_named() -> None:
    data = hardware_to_dict(PROFILE)
    del data["logical_cores"]

    with pytest.raises(ValueError, match=r"HardwareProfile: required field 'logical_cores' is missing"):
        hardware_from_dict(data)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("logical_cores", "4", r"HardwareProfile\.logical_cores: expected int, got '4'"),
        ("logical_cores", True, r"HardwareProfile\.logical_cores: expected int, got True"),
        ("cpu_features", "neon", r"HardwareProfile\.cpu_features: expected a list"),
        ("cpu_features", ["neon", 3], r"HardwareProfile\.cpu_features\[1\]: expected str, got 3"),
        ("accelerators", [{"kind": "npu"}], r"HardwareProfile\.accelerators\[0\]: required field 'vendor'"),
    ],
)
def test_wrong_type_named(key: str, value: object, message: str) -> None:
    data = hardware_to_dict(PROFILE) | {key: value}

    with pytest.raises(ValueError, match=message):
        hardware_from_dict(data)


def test_integer_json_float_loads() -> None:
    data = hardware_to_dict(PROFILE) | {"usable_cores": 2}

    profile = hardware_from_dict(data)

    assert profile.usable_cores == 2.0
    assert isinstance(profile.usable_cores, float)
