"""Tests of the hardware probe against the real machine and fake /proc, /sys and /dev trees."""

from __future__ import annotations

import ctypes.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
from ai_edge_litert.interpreter import Interpreter

from edgefleet.agent.probe import CPU_FEATURES, parse_cpu_list, parse_cpuinfo, probe_hardware
from edgefleet.agent.probe_accelerators import merge_accelerators, normalise_pci_address
from edgefleet.agent.probe_cgroup import cpu_quota
from edgefleet.agent.probe_runtimes import (
    TINY_ONNX_MODEL,
    TINY_TFLITE_MODEL,
    DelegateLibrary,
    litert_delegate_loads,
    onnxruntime_provider_loads,
    probe_litert,
    probe_onnxruntime,
)
from edgefleet.common.hardware import Accelerator, HardwareProfile, hardware_class_of
from edgefleet.common.serde import hardware_from_proto, hardware_to_proto
from tests.agent.fakes.cpuinfo import ARMV7_CORTEX_A72, RASPBERRY_PI_5, RK3588, XEON_SAPPHIRE_RAPIDS
from tests.agent.fakes.nvml import NVML_ERROR_DRIVER_NOT_LOADED, FakeGpu, FakeNvml
from tests.agent.fakes.tiny_models import build_tiny_onnx_model, build_tiny_tflite_model
from tests.agent.fakes.tree import GIB, MEMINFO_8_GIB, MIB, FakeTree

H100_ADDRESS = "0000:01:00.0"


@pytest.fixture
def tree(tmp_path: Path) -> FakeTree:
    fake = FakeTree(tmp_path / "root")
    fake.write("/proc/meminfo", MEMINFO_8_GIB)
    fake.write("/sys/devices/system/cpu/online", "0-3\n")
    return fake


def probe(tree: FakeTree, **overrides: Any) -> HardwareProfile:
    """Probe a fake tree with 4 CPUs in the affinity mask and no runtimes."""
    arguments: dict[str, Any] = {
        "root": tree.root,
        "store_dir": tree.root,
        "machine": "x86_64",
        "kernel": "6.1.0",
        "affinity": range(4),
        "runtimes": lambda: (),
    }
    arguments.update(overrides)
    return probe_hardware(**arguments)


def add_h100(tree: FakeTree) -> None:
    tree.add_pci_device(H100_ADDRESS, device_class=0x030200, vendor="0x10de", device="0x2330", driver="nvidia")
    tree.add_nvidia_gpu(0, H100_ADDRESS, "NVIDIA H100 80GB HBM3")
    tree.device_node("/dev/nvidiactl")
    tree.device_node("/dev/nvidia-uvm")


# The real machine.


def test_probe_real_machine(tmp_path: Path) -> None:
    profile = probe_hardware(store_dir=tmp_path / "not-created-yet")
    affinity = os.sched_getaffinity(0)
    quota = cpu_quota(Path("/"))
    expected_cores = float(len(affinity)) if quota is None else min(float(len(affinity)), quota)
    assert profile.usable_cores == expected_cores
    assert profile.logical_cores >= len(affinity)
    assert profile.memory_total_bytes > 0
    assert 0 < profile.memory_available_bytes <= profile.memory_total_bytes
    assert profile.disk_free_bytes > 0
    assert profile.kernel != ""
    assert profile.hardware_class == hardware_class_of(profile)
    assert set(profile.cpu_features) <= set(CPU_FEATURES)
    for accelerator in profile.accelerators:
        assert Path(accelerator.device_path or f"/sys/bus/pci/devices/{accelerator.pci_address}").exists()


def test_probe_real_runtimes(tmp_path: Path) -> None:
    profile = probe_hardware(store_dir=tmp_path)
    onnx_runtime = profile.runtime("onnxruntime")
    litert = profile.runtime("litert")
    assert onnx_runtime is not None
    assert "CPUExecutionProvider" in onnx_runtime.providers
    assert "AzureExecutionProvider" not in onnx_runtime.providers
    assert litert is not None
    assert "XNNPACK" in litert.providers


# CPUs.


def test_cpuinfo_avx512_vnni() -> None:
    info = parse_cpuinfo(XEON_SAPPHIRE_RAPIDS)
    assert info.model == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert info.processors == 2
    for feature in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx", "avx512_fp16"):
        assert feature in info.features
    assert "amx_tile" not in info.features


def test_cpuinfo_aarch64_dotprod() -> None:
    info = parse_cpuinfo(RASPBERRY_PI_5)
    assert info.model == "Cortex-A76"
    assert info.features == ("dotprod", "fp16", "neon")
    assert info.processors == 4


def test_cpuinfo_big_little() -> None:
    info = parse_cpuinfo(RK3588)
    assert info.model == "Cortex-A55 + Cortex-A76"
    assert "dotprod" not in info.features
    assert "neon" in info.features


def test_cpuinfo_armv7_neon() -> None:
    info = parse_cpuinfo(ARMV7_CORTEX_A72)
    assert info.model == "ARMv7 Processor rev 3 (v7l)"
    assert info.features == ("neon",)


def test_probe_arm_tree(tree: FakeTree) -> None:
    tree.write("/proc/cpuinfo", RASPBERRY_PI_5)
    tree.write("/etc/os-release", 'NAME="Debian GNU/Linux"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n')
    profile = probe(tree, machine="aarch64")
    assert profile.architecture == "aarch64"
    assert profile.cpu_model == "Cortex-A76"
    assert "dotprod" in profile.cpu_features
    assert profile.os == "Debian GNU/Linux 12 (bookworm)"
    assert profile.hardware_class.startswith("aarch64-4c-8192m-")


@pytest.mark.parametrize(("text", "expected"), [("0-3", {0, 1, 2, 3}), ("0,2-3,7", {0, 2, 3, 7}), ("5", {5})])
def test_cpu_list_parse(text: str, expected: set[int]) -> None:
    assert parse_cpu_list(text) == expected


def test_logical_cores_online(tree: FakeTree) -> None:
    tree.write("/sys/devices/system/cpu/online", "0-7\n")
    profile = probe(tree, affinity={0, 1})
    assert profile.logical_cores == 8
    assert profile.usable_cores == 2.0


# cgroups.


def test_cgroup_v2_quota(tree: FakeTree) -> None:
    tree.set_cgroup_v2(
        "/agent.slice/agent.service",
        {
            "/agent.slice": {"cpu.max": "max 100000\n"},
            "/agent.slice/agent.service": {"cpu.max": "150000 100000\n"},
        },
    )
    assert probe(tree).usable_cores == 1.5


def test_cgroup_v2_parent_quota(tree: FakeTree) -> None:
    tree.set_cgroup_v2(
        "/agent.slice/agent.service",
        {
            "/agent.slice": {"cpu.max": "50000 100000\n"},
            "/agent.slice/agent.service": {"cpu.max": "max 100000\n"},
        },
    )
    assert probe(tree).usable_cores == 0.5


def test_cgroup_quota_above_affinity(tree: FakeTree) -> None:
    tree.set_cgroup_v2("/", {"/": {"cpu.max": "800000 100000\n"}})
    assert probe(tree, affinity={0, 1, 2}).usable_cores == 3.0


def test_cgroup_v1_quota(tree: FakeTree) -> None:
    tree.set_cgroup_v1("/docker/abc", cpu={"cpu.cfs_quota_us": "250000\n", "cpu.cfs_period_us": "100000\n"}, memory={})
    assert probe(tree).usable_cores == 2.5


def test_cgroup_v1_unlimited(tree: FakeTree) -> None:
    tree.set_cgroup_v1(
        "/docker/abc",
        cpu={"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n"},
        memory={"memory.limit_in_bytes": "9223372036854771712\n", "memory.usage_in_bytes": "1000\n"},
    )
    profile = probe(tree)
    assert profile.usable_cores == 4.0
    assert profile.memory_total_bytes == 8 * GIB


def test_cgroup_v2_memory_limit(tree: FakeTree) -> None:
    tree.set_cgroup_v2(
        "/agent",
        {
            "/agent": {
                "memory.max": f"{GIB}\n",
                "memory.current": f"{300 * MIB}\n",
                "memory.stat": f"anon {200 * MIB}\ninactive_file {100 * MIB}\nactive_file 0\n",
            }
        },
    )
    profile = probe(tree)
    assert profile.memory_total_bytes == GIB
    assert profile.memory_available_bytes == GIB - 200 * MIB


def test_cgroup_v2_memory_unlimited(tree: FakeTree) -> None:
    tree.set_cgroup_v2("/agent", {"/agent": {"memory.max": "max\n", "memory.current": f"{GIB}\n"}})
    profile = probe(tree)
    assert profile.memory_total_bytes == 8 * GIB
    assert profile.memory_available_bytes == 6 * GIB


def test_cgroup_v1_memory_limit(tree: FakeTree) -> None:
    tree.set_cgroup_v1(
        "/docker/abc",
        cpu={},
        memory={
            "memory.limit_in_bytes": f"{2 * GIB}\n",
            "memory.usage_in_bytes": f"{GIB}\n",
            "memory.stat": f"cache {GIB}\ninactive_file 0\ntotal_inactive_file {512 * MIB}\n",
        },
    )
    profile = probe(tree)
    assert profile.memory_total_bytes == 2 * GIB
    assert profile.memory_available_bytes == 2 * GIB - 512 * MIB


def test_cgroup_without_mountinfo(tree: FakeTree) -> None:
    tree.write("/proc/self/cgroup", "0::/\n")
    tree.write("/sys/fs/cgroup/cgroup.controllers", "cpu memory\n")
    tree.write("/sys/fs/cgroup/cpu.max", "150000 100000\n")
    assert probe(tree).usable_cores == 1.5


# Accelerators.


def test_nvidia_gpu(tree: FakeTree) -> None:
    add_h100(tree)
    accelerators = probe(tree).accelerators
    assert len(accelerators) == 1
    gpu = accelerators[0]
    assert gpu.kind == "gpu"
    assert gpu.vendor == "nvidia"
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.device_path == "/dev/nvidia0"
    assert gpu.pci_address == H100_ADDRESS
    assert gpu.driver == "nvidia"
    assert gpu.source == "sysfs"


def test_nvidia_gpu_nvml(tree: FakeTree) -> None:
    add_h100(tree)
    nvml = FakeNvml([FakeGpu("NVIDIA H100 80GB HBM3", 80 * GIB, "00000000:01:00.0")])
    accelerators = probe(tree, nvml_loader=lambda: nvml).accelerators
    assert len(accelerators) == 1
    assert accelerators[0].memory_bytes == 80 * GIB
    assert accelerators[0].source == "nvml"
    assert accelerators[0].device_path == "/dev/nvidia0"
    assert nvml.shutdown_calls == 1


def test_nvml_init_failure(tree: FakeTree) -> None:
    add_h100(tree)
    nvml = FakeNvml([], init_status=NVML_ERROR_DRIVER_NOT_LOADED)
    accelerators = probe(tree, nvml_loader=lambda: nvml).accelerators
    assert [gpu.source for gpu in accelerators] == ["sysfs"]


def test_nvidia_node_without_proc(tree: FakeTree) -> None:
    tree.add_pci_device(H100_ADDRESS, device_class=0x030200, vendor="0x10de", device="0x2330", driver="nvidia")
    tree.device_node("/dev/nvidia0")
    accelerators = probe(tree).accelerators
    assert len(accelerators) == 1
    assert accelerators[0].device_path == "/dev/nvidia0"
    assert accelerators[0].name == "10de:2330"


def test_amd_render_node(tree: FakeTree) -> None:
    folder = tree.add_pci_device(
        "0000:03:00.0",
        device_class=0x030000,
        vendor="0x1002",
        device="0x73bf",
        driver="amdgpu",
        files={"mem_info_vram_total": f"{16 * GIB}\n"},
    )
    tree.add_class_node("drm", "renderD128", folder)
    tree.device_node("/dev/dri/card0")
    tree.write(
        "/usr/share/hwdata/pci.ids",
        "# comment\n1002  Advanced Micro Devices, Inc. [AMD/ATI]\n"
        "\t73bf  Navi 21 [Radeon RX 6800/6800 XT / 6900 XT]\n\t\t1002 0e3a  Radeon RX 6900 XT\n",
    )
    accelerators = probe(tree).accelerators
    assert len(accelerators) == 1
    gpu = accelerators[0]
    assert gpu.vendor == "amd"
    assert gpu.name == "Navi 21 [Radeon RX 6800/6800 XT / 6900 XT]"
    assert gpu.device_path == "/dev/dri/renderD128"
    assert gpu.driver == "amdgpu"
    assert gpu.memory_bytes == 16 * GIB


def test_intel_render_node_beside_bmc(tree: FakeTree) -> None:
    igpu = tree.add_pci_device("0000:00:02.0", device_class=0x030000, vendor="0x8086", device="0x46a6", driver="i915")
    bmc = tree.add_pci_device("0000:05:00.0", device_class=0x030000, vendor="0x1a03", device="0x2000", driver="ast")
    tree.add_class_node("drm", "renderD128", igpu)
    tree.add_class_node("drm", "renderD129", bmc)
    accelerators = probe(tree).accelerators
    assert [(gpu.vendor, gpu.device_path) for gpu in accelerators] == [("intel", "/dev/dri/renderD128")]


def test_soc_render_node(tree: FakeTree) -> None:
    folder = tree.add_platform_device("fb000000.gpu", "panfrost")
    tree.add_class_node("drm", "renderD128", folder)
    accelerators = probe(tree, machine="aarch64").accelerators
    assert len(accelerators) == 1
    assert accelerators[0].vendor == "arm"
    assert accelerators[0].pci_address == ""
    assert accelerators[0].source == "devfs"


def test_npu_accel_node(tree: FakeTree) -> None:
    folder = tree.add_pci_device(
        "0000:00:0b.0", device_class=0x120000, vendor="0x8086", device="0x7d1d", driver="intel_vpu"
    )
    tree.add_class_node("accel", "accel0", folder)
    accelerators = probe(tree).accelerators
    assert len(accelerators) == 1
    npu = accelerators[0]
    assert npu.kind == "npu"
    assert npu.vendor == "intel"
    assert npu.device_path == "/dev/accel/accel0"
    assert npu.pci_address == "0000:00:0b.0"
    assert npu.driver == "intel_vpu"


def test_merge_pairs_node_with_pci() -> None:
    merged = merge_accelerators(
        [
            Accelerator(kind="gpu", vendor="nvidia", device_path="/dev/nvidia0", source="devfs"),
            Accelerator(kind="gpu", vendor="nvidia", name="A", pci_address="0000:01:00.0", source="sysfs"),
            Accelerator(kind="gpu", vendor="nvidia", name="B", pci_address="0000:02:00.0", source="sysfs"),
        ]
    )
    assert [(gpu.name, gpu.device_path) for gpu in merged] == [("A", "/dev/nvidia0"), ("B", "")]


@pytest.mark.parametrize(
    ("address", "expected"),
    [("00000000:01:00.0", "0000:01:00.0"), ("0000:3B:00.1", "0000:3b:00.1"), ("fb000000.gpu", "")],
)
def test_pci_address_normalise(address: str, expected: str) -> None:
    assert normalise_pci_address(address) == expected


# Missing and broken files.


def test_empty_tree(tmp_path: Path) -> None:
    profile = probe(FakeTree(tmp_path), affinity=set())
    assert profile.cpu_model == ""
    assert profile.cpu_features == ()
    assert profile.logical_cores == 0
    assert profile.usable_cores == 0.0
    assert profile.memory_total_bytes == 0
    assert profile.accelerators == ()
    assert profile.os == ""


def test_unreadable_files(tree: FakeTree) -> None:
    tree.path("/proc/meminfo").unlink()
    tree.path("/proc/meminfo").mkdir()
    tree.path("/proc/cpuinfo").write_bytes(b"model name\t: \xff\xfe\n")
    tree.write("/proc/self/cgroup", "garbage\n")
    tree.write("/sys/fs/cgroup/cpu.max", "lots 100000\n")
    profile = probe(tree)
    assert profile.memory_total_bytes == 0
    assert profile.cpu_model == ""
    assert profile.usable_cores == 4.0


# Runtimes.


def test_tiny_onnx_model_rebuilds() -> None:
    assert build_tiny_onnx_model() == TINY_ONNX_MODEL


def test_tiny_onnx_model_runs() -> None:
    session = onnxruntime.InferenceSession(TINY_ONNX_MODEL, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"x": np.array([2.0], dtype=np.float32)})
    assert output.tolist() == [4.0]


def test_tiny_tflite_model_rebuilds() -> None:
    assert build_tiny_tflite_model() == TINY_TFLITE_MODEL


def test_tiny_tflite_model_runs() -> None:
    interpreter = Interpreter(model_content=TINY_TFLITE_MODEL)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], np.array([2.0], dtype=np.float32))
    interpreter.invoke()
    assert interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).tolist() == [4.0]


def test_onnxruntime_listed_cuda_not_loadable() -> None:
    runtime = probe_onnxruntime(available=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert runtime is not None
    assert runtime.providers == ("CPUExecutionProvider",)


def test_onnxruntime_fake_cuda() -> None:
    listed = [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "AzureExecutionProvider",
        "CPUExecutionProvider",
    ]
    runtime = probe_onnxruntime(
        available=lambda: listed, loads=lambda provider: provider != "TensorrtExecutionProvider"
    )
    assert runtime is not None
    assert runtime.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")


def test_onnxruntime_provider_unknown() -> None:
    assert onnxruntime_provider_loads("NoSuchExecutionProvider") is False


def test_litert_fake_gpu_delegate() -> None:
    delegates = (DelegateLibrary("GPU", "libgpu.so"), DelegateLibrary("EdgeTPU", "libedgetpu.so.1"))
    runtime = probe_litert(delegates, loads=lambda delegate: delegate.name == "GPU")
    assert runtime is not None
    assert runtime.providers == ("XNNPACK", "GPU")


def test_litert_package_named() -> None:
    """The orchestrator needs the package: ai-edge-litert and tflite-runtime number their releases differently."""
    import ai_edge_litert

    runtime = probe_litert(())
    assert runtime is not None
    assert (runtime.package, runtime.version) == ("ai-edge-litert", ai_edge_litert.__version__)
    profile = HardwareProfile("cpu", "x86_64", 2, 2.0, (), 1 << 30, 1 << 30, 1 << 30, runtimes=(runtime,))
    assert hardware_from_proto(hardware_to_proto(profile)).runtimes == (runtime,)


def test_litert_delegate_missing_library() -> None:
    assert litert_delegate_loads(DelegateLibrary("GPU", "libedgefleet_no_such_delegate.so")) is False


def test_litert_delegate_not_a_plugin() -> None:
    libc = ctypes.util.find_library("c")
    assert libc is not None
    assert litert_delegate_loads(DelegateLibrary("libc", libc)) is False
