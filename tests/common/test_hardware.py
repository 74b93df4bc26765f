"""Tests of the hardware class name that the agent and the orchestrator derive from a hardware profile."""

from __future__ import annotations

import pytest

from edgefleet.common.hardware import HardwareProfile, RuntimeInfo, hardware_class_of, memory_class_mib

MIB = 1024 * 1024


def plc(memory_bytes: int) -> HardwareProfile:
    return HardwareProfile(
        cpu_model="Test CPU",
        architecture="armv7l",
        logical_cores=1,
        usable_cores=1.0,
        cpu_features=("neon",),
        memory_total_bytes=memory_bytes,
        memory_available_bytes=0,
        disk_free_bytes=0,
        runtimes=(RuntimeInfo("onnxruntime", "1.32.0"),),
        profile_name="plc",
    )


@pytest.mark.parametrize(
    ("memory_mib", "expected"),
    [(8, "plc-1c-8m-"), (32, "plc-1c-32m-"), (64, "plc-1c-64m-"), (128, "plc-1c-128m-"), (250, "plc-1c-240m-")],
)
def test_small_memory_class_readable(memory_mib: int, expected: str) -> None:
    assert hardware_class_of(plc(memory_mib * MIB)).startswith(expected)


def test_small_memory_classes_distinct() -> None:
    classes = {hardware_class_of(plc(mib * MIB)) for mib in (32, 64, 128, 250)}
    assert len(classes) == 4


@pytest.mark.parametrize(
    ("memory_bytes", "expected"),
    [
        (256 * MIB, "plc-1c-256m-0aa46c2a"),
        (300 * MIB + 12345, "plc-1c-256m-0aa46c2a"),
        (512 * MIB, "plc-1c-512m-9ea2ba88"),
        (2048 * MIB, "plc-1c-2048m-911a971a"),
    ],
)
def test_large_memory_class_unchanged(memory_bytes: int, expected: str) -> None:
    """Classes of 256 MiB and more keep the names that existing fleets and their baselines use."""
    assert hardware_class_of(plc(memory_bytes)) == expected


@pytest.mark.parametrize(
    ("memory_bytes", "expected_mib"),
    [(0, 0), (15 * MIB + 1, 15), (31 * MIB, 16), (255 * MIB, 240), (256 * MIB - 1, 240), (767 * MIB, 512)],
)
def test_memory_class_steps(memory_bytes: int, expected_mib: int) -> None:
    assert memory_class_mib(memory_bytes) == expected_mib
