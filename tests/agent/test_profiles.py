"""Tests of device profiles: the shipped files, validation errors, apply() and enforce()."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import edgefleet
from edgefleet.agent.profiles import DeviceProfile, ProfileError, load_profile, shipped_profiles
from edgefleet.common.hardware import Accelerator, HardwareProfile, RuntimeInfo, hardware_class_of
from tests.agent.fakes.tree import GIB, MIB, FakeTree

REPO_ROOT = Path(edgefleet.__file__).resolve().parents[1]


def gpu_server() -> HardwareProfile:
    """A probed host with more of everything than any shipped profile, plus a GPU."""
    profile = HardwareProfile(
        cpu_model="AMD EPYC 9654",
        architecture="x86_64",
        logical_cores=16,
        usable_cores=16.0,
        cpu_features=("avx2", "avx512f", "fma"),
        memory_total_bytes=64 * GIB,
        memory_available_bytes=60 * GIB,
        disk_free_bytes=100 * GIB,
        accelerators=(Accelerator(kind="gpu", vendor="nvidia", name="NVIDIA H100", source="nvml"),),
        runtimes=(
            RuntimeInfo("onnxruntime", "1.32.0", ("CUDAExecutionProvider", "CPUExecutionProvider")),
            RuntimeInfo("litert", "2.3.0", ("XNNPACK", "GPU")),
        ),
    )
    return dataclasses.replace(profile, hardware_class=hardware_class_of(profile))


def write_profile(tmp_path: Path, text: str, name: str = "custom.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# Shipped profiles.


def test_shipped_profiles_listed() -> None:
    assert {"camera", "car-ecu", "plc"} <= set(shipped_profiles())


@pytest.mark.parametrize(
    ("name", "cores", "memory", "runtimes"),
    [
        ("camera", 1.0, 512 * MIB, ("litert",)),
        ("car-ecu", 2.0, 2 * GIB, ("onnxruntime", "litert")),
        ("plc", 1.0, 256 * MIB, ("onnxruntime",)),
    ],
)
def test_shipped_profile_applies(name: str, cores: float, memory: int, runtimes: tuple[str, ...]) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.labels == {"kind": name}
    assert profile.description != ""

    applied = profile.apply(gpu_server())
    assert applied.usable_cores == cores
    assert applied.logical_cores == math.ceil(cores)
    assert applied.memory_total_bytes == memory
    assert applied.memory_available_bytes == memory
    # apply() keeps the probed order: onnxruntime, then litert.
    assert tuple(runtime.name for runtime in applied.runtimes) == runtimes
    assert applied.accelerators == ()
    assert applied.profile_name == name
    assert applied.hardware_class == hardware_class_of(applied)
    assert applied.hardware_class.startswith(f"{name}-")


def test_cpu_only_keeps_cpu_providers() -> None:
    applied = load_profile("car-ecu").apply(gpu_server())
    providers = {runtime.name: runtime.providers for runtime in applied.runtimes}
    assert providers == {"onnxruntime": ("CPUExecutionProvider",), "litert": ("XNNPACK",)}


# apply().


def test_apply_caps_cores_by_probe() -> None:
    probed = dataclasses.replace(gpu_server(), usable_cores=1.5, logical_cores=2)
    applied = DeviceProfile(name="big", cores=4).apply(probed)
    assert applied.usable_cores == 1.5
    assert applied.logical_cores == 2


def test_apply_fractional_cores() -> None:
    applied = DeviceProfile(name="half", cores=0.5).apply(gpu_server())
    assert applied.usable_cores == 0.5
    assert applied.logical_cores == 1


def test_apply_caps_memory_by_probe() -> None:
    applied = DeviceProfile(name="big", memory_bytes=128 * GIB).apply(gpu_server())
    assert applied.memory_total_bytes == 64 * GIB
    assert applied.memory_available_bytes == 60 * GIB


def test_apply_keeps_accelerators() -> None:
    probed = gpu_server()
    applied = DeviceProfile(name="gpu-box", runtimes=("onnxruntime",)).apply(probed)
    assert applied.accelerators == probed.accelerators
    assert applied.runtimes == probed.runtimes[:1]
    assert applied.cpu_model == probed.cpu_model


def test_apply_cpu_model_override() -> None:
    applied = DeviceProfile(name="ecu", cpu_model="Cortex-A53").apply(gpu_server())
    assert applied.cpu_model == "Cortex-A53"
    assert applied.hardware_class != gpu_server().hardware_class


# Loading files.


def test_load_path_defaults_name(tmp_path: Path) -> None:
    path = write_profile(
        tmp_path,
        """
        description = "A gateway"
        cores = 1.5
        memory_mib = 768
        threads = 3
        cpu_model = "Cortex-A72"
        [labels]
        site = "plant-7"
    """,
        name="gateway.toml",
    )
    profile = load_profile(str(path))
    assert profile == DeviceProfile(
        name="gateway",
        description="A gateway",
        cores=1.5,
        memory_bytes=768 * MIB,
        runtimes=None,
        labels={"site": "plant-7"},
        cpu_model="Cortex-A72",
        threads=3,
        cpu_only=False,
    )


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("cores = [", ("invalid TOML",)),
        ("coress = 2", ("unknown key 'coress'", "allowed keys: cores, cpu_model")),
        ("cores = -1", ("key 'cores'", "greater than 0", "-1")),
        ("cores = 0", ("key 'cores'", "greater than 0")),
        ("cores = 'two'", ("key 'cores' must be a number", "'two'")),
        ("cores = true", ("key 'cores' must be a number",)),
        ("cores = nan", ("key 'cores'",)),
        ("memory_mib = 1.5", ("key 'memory_mib' must be an integer",)),
        ("threads = 0", ("key 'threads'", "greater than 0")),
        (
            "runtimes = ['onnxruntime', 'tensorrt']",
            ("unknown runtime 'tensorrt'", "allowed values: litert, onnxruntime"),
        ),
        ("runtimes = []", ("key 'runtimes' must be a non-empty list",)),
        ("runtimes = 'litert'", ("key 'runtimes' must be a non-empty list",)),
        ("cpu_only = 'yes'", ("key 'cpu_only' must be true or false",)),
        ("name = 'My Camera'", ("key 'name' must be lower-case",)),
        ("labels = 'kind=camera'", ("key 'labels' must be a table",)),
        ("[labels]\nrack = 7", ("label 'rack' must be a string",)),
    ],
)
def test_load_rejects_malformed(tmp_path: Path, text: str, fragments: tuple[str, ...]) -> None:
    path = write_profile(tmp_path, text + "\n")
    with pytest.raises(ProfileError) as raised:
        load_profile(str(path))
    assert str(path) in str(raised.value)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_load_unknown_name() -> None:
    with pytest.raises(ProfileError, match=r"unknown device profile 'toaster'.*camera, car-ecu.*plc"):
        load_profile("toaster")


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="not found"):
        load_profile(str(tmp_path / "missing.toml"))


# enforce(), in a child process so that this process keeps its CPU affinity.


def enforce_in_child(tmp_path: Path, profile_text: str, probe_root: Path = Path("/")) -> dict[str, object]:
    """Run enforce() in a child with the cgroup CPU quota read below probe_root; return what it set."""
    path = write_profile(tmp_path, profile_text)
    script = textwrap.dedent(f"""
        import json, os, threading
        from pathlib import Path
        from edgefleet.agent.probe_cgroup import cpu_quota
        from edgefleet.agent.profiles import load_profile
        before = sorted(os.sched_getaffinity(0))
        started, stop = threading.Event(), threading.Event()
        worker = threading.Thread(target=lambda: (started.set(), stop.wait()))
        worker.start()
        started.wait()
        limits = load_profile({str(path)!r}).enforce(cpu_quota(Path({str(probe_root)!r})))
        worker_affinity = sorted(os.sched_getaffinity(worker.native_id))
        stop.set()
        worker.join()
        print(json.dumps({{
            "before": before,
            "after": sorted(os.sched_getaffinity(0)),
            "worker": worker_affinity,
            "cpus": list(limits.cpus),
            "threads": limits.threads,
            "memory": limits.memory_budget_bytes,
        }}))
    """)
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result: dict[str, object] = json.loads(completed.stdout)
    return result


def test_enforce_memory_budget_and_cgroup_limit() -> None:
    # memory_mib budgets the models; the cgroup limit bounds the whole process, the agent included.
    profile = DeviceProfile(name="ecu", memory_bytes=2 * GIB)

    assert profile.enforce(None, 300 * MIB).memory_budget_bytes == 2 * GIB
    assert profile.enforce(None, 300 * MIB).memory_limit_bytes == 300 * MIB
    assert profile.enforce(None, None).memory_budget_bytes == 2 * GIB
    assert profile.enforce(None, None).memory_limit_bytes is None
    assert DeviceProfile(name="").enforce(None, 300 * MIB).memory_budget_bytes is None
    assert DeviceProfile(name="").enforce(None, 300 * MIB).memory_limit_bytes == 300 * MIB


def test_enforce_pins_one_cpu(tmp_path: Path) -> None:
    result = enforce_in_child(tmp_path, "cores = 1\nmemory_mib = 128\n")
    before = result["before"]
    assert isinstance(before, list)
    assert result["after"] == before[:1]
    assert result["worker"] == before[:1]
    assert result["cpus"] == before[:1]
    assert result["threads"] == 1
    assert result["memory"] == 128 * MIB


def test_enforce_rounds_cores_up(tmp_path: Path) -> None:
    result = enforce_in_child(tmp_path, "cores = 1.5\nthreads = 3\n")
    before = result["before"]
    assert isinstance(before, list)
    assert result["after"] == before[:2]
    assert result["threads"] == 3
    assert result["memory"] is None


def test_enforce_without_cores(tmp_path: Path) -> None:
    result = enforce_in_child(tmp_path, "memory_mib = 64\n")
    assert result["after"] == result["before"]
    assert result["cpus"] == result["before"]
    assert result["threads"] == len(os.sched_getaffinity(0))


def test_enforce_threads_capped_by_quota(tmp_path: Path) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs, so that a quota of 0.5 CPUs allows fewer threads than CPUs")
    tree = FakeTree(tmp_path / "root")
    tree.set_cgroup_v2("/agent.service", {"/agent.service": {"cpu.max": "50000 100000\n"}})

    result = enforce_in_child(tmp_path, "memory_mib = 64\n", probe_root=tree.root)

    assert result["cpus"] == result["before"]
    assert result["threads"] == 1


def test_enforce_threads_quota_rounded_up(tmp_path: Path) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to tell 2 threads from 1")
    tree = FakeTree(tmp_path / "root")
    tree.set_cgroup_v2("/agent.service", {"/agent.service": {"cpu.max": "150000 100000\n"}})

    result = enforce_in_child(tmp_path, "memory_mib = 64\n", probe_root=tree.root)

    assert result["threads"] == 2


def test_enforce_profile_threads_capped_by_quota(tmp_path: Path) -> None:
    tree = FakeTree(tmp_path / "root")
    tree.set_cgroup_v2("/agent.service", {"/agent.service": {"cpu.max": "50000 100000\n"}})

    result = enforce_in_child(tmp_path, "threads = 3\n", probe_root=tree.root)

    assert result["threads"] == 1
