"""Hardware probe of the agent: CPU, memory, disk, accelerators and runtimes as a HardwareProfile."""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shutil
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from edgefleet.agent.probe_accelerators import load_nvml, probe_accelerators
from edgefleet.agent.probe_cgroup import cpu_quota, memory_limit
from edgefleet.agent.probe_files import read_first_line, read_text
from edgefleet.agent.probe_runtimes import probe_runtimes
from edgefleet.common.hardware import HardwareProfile, RuntimeInfo, hardware_class_of

logger = logging.getLogger(__name__)

# /proc/cpuinfo flags (x86) and Features (ARM) that change inference speed, mapped to the names in
# HardwareProfile.cpu_features. The ARM names follow the kernel's HWCAP names: asimd is NEON on
# AArch64, asimddp the SDOT/UDOT dot product, asimdhp and fphp half-precision arithmetic.
X86_FEATURES = {
    "sse4_2": "sse4_2",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512_vnni": "avx512_vnni",
    "avx512_bf16": "avx512_bf16",
    "avx512_fp16": "avx512_fp16",
    "avx_vnni": "avx_vnni",
    "amx_tile": "amx",
    "amx_int8": "amx",
    "amx_bf16": "amx",
}
ARM_FEATURES = {
    "neon": "neon",  # 32-bit ARM.
    "asimd": "neon",
    "asimddp": "dotprod",
    "asimdhp": "fp16",
    "fphp": "fp16",
    "i8mm": "i8mm",
    "bf16": "bf16",
    "sve": "sve",
    "sve2": "sve2",
    "sme": "sme",
}
# Every name that HardwareProfile.cpu_features can contain.
CPU_FEATURES = tuple(sorted(set(X86_FEATURES.values()) | set(ARM_FEATURES.values())))

# "CPU part" ids of Arm Ltd cores (implementer 0x41), from the Linux kernel's asm/cputype.h.
ARM_CORES = {
    0xD03: "Cortex-A53",
    0xD04: "Cortex-A35",
    0xD05: "Cortex-A55",
    0xD07: "Cortex-A57",
    0xD08: "Cortex-A72",
    0xD09: "Cortex-A73",
    0xD0A: "Cortex-A75",
    0xD0B: "Cortex-A76",
    0xD0C: "Neoverse-N1",
    0xD0D: "Cortex-A77",
    0xD40: "Neoverse-V1",
    0xD41: "Cortex-A78",
    0xD42: "Cortex-A78AE",
    0xD44: "Cortex-X1",
    0xD46: "Cortex-A510",
    0xD47: "Cortex-A710",
    0xD48: "Cortex-X2",
    0xD49: "Neoverse-N2",
    0xD4B: "Cortex-A78C",
    0xD4F: "Neoverse-V2",
}


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    model: str
    features: tuple[str, ...]  # Normalised names from CPU_FEATURES present on every processor.
    processors: int  # "processor" entries in /proc/cpuinfo.


def _arm_core_name(implementer: str, part: str) -> str:
    try:
        implementer_id, part_id = int(implementer, 16), int(part, 16)
    except ValueError:
        return ""
    if implementer_id == 0x41 and part_id in ARM_CORES:
        return ARM_CORES[part_id]
    return f"ARM implementer {implementer_id:#x} part {part_id:#x}"


def parse_cpuinfo(text: str) -> CpuInfo:
    """Parse /proc/cpuinfo of an x86 or ARM kernel into a model name and normalised features.

    The model is "model name" (x86, some ARM kernels), else the distinct ARM core names joined with
    " + " (big.LITTLE), else "Hardware". A feature counts only when every processor lists it.
    """
    blocks = [block for block in text.split("\n\n") if block.strip()]
    model_names: list[str] = []
    core_names: list[str] = []
    hardware = ""
    feature_sets: list[set[str]] = []
    processors = 0
    for block in blocks:
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, separator, value = line.partition(":")
            if separator:
                fields[key.strip()] = value.strip()
        if "processor" in fields:
            processors += 1
        if fields.get("model name"):
            model_names.append(fields["model name"])
        if "CPU implementer" in fields and "CPU part" in fields:
            core_names.append(_arm_core_name(fields["CPU implementer"], fields["CPU part"]))
        hardware = fields.get("Hardware", hardware)
        flags = fields.get("flags", fields.get("Features"))
        if flags is not None:
            mapping = X86_FEATURES if "flags" in fields else ARM_FEATURES
            feature_sets.append({mapping[flag] for flag in flags.split() if flag in mapping})

    distinct_cores = list(dict.fromkeys(name for name in core_names if name))
    if model_names:
        model = model_names[0]
    elif distinct_cores:
        model = " + ".join(distinct_cores)
    else:
        model = hardware
    features = set.intersection(*feature_sets) if feature_sets else set()
    return CpuInfo(model=model, features=tuple(sorted(features)), processors=processors)


def parse_cpu_list(text: str) -> set[int]:
    """Parse a kernel CPU list such as "0-3,8,10-11" into CPU ids; ValueError when malformed."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def _online_cpus(root: Path, cpuinfo: CpuInfo, affinity: Collection[int]) -> int:
    line = read_first_line(root, "/sys/devices/system/cpu/online")
    if line:
        try:
            return len(parse_cpu_list(line))
        except ValueError:
            logger.debug("invalid online CPU list %r", line)
    return cpuinfo.processors or len(affinity)


def parse_meminfo(text: str) -> tuple[int, int]:
    """Return (MemTotal, MemAvailable) in bytes from /proc/meminfo; 0 for a missing field.

    Kernels older than 3.14 lack MemAvailable; MemFree + Buffers + Cached is used in its place.
    """
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            unit = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
            values[key.strip()] = int(parts[0]) * unit
    total = values.get("MemTotal", 0)
    if "MemAvailable" in values:
        available = values["MemAvailable"]
    else:
        available = values.get("MemFree", 0) + values.get("Buffers", 0) + values.get("Cached", 0)
    return total, available


def _memory(root: Path) -> tuple[int, int]:
    """Return physical (total, available) memory capped by the cgroup limit and its headroom."""
    text = read_text(root, "/proc/meminfo")
    total, available = parse_meminfo(text) if text is not None else (0, 0)
    limit = memory_limit(root)
    if limit is not None:
        total = min(total, limit.limit_bytes) if total else limit.limit_bytes
        available = min(available, limit.available_bytes) if available else limit.available_bytes
    return total, min(available, total)


def resident_bytes() -> int:
    """Return the resident set size of this process from /proc/self/statm, or 0 where it cannot be read."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def available_memory_bytes(root: Path = Path("/")) -> int:
    """Return the memory this process can use now: MemAvailable capped by its cgroup's headroom; 0 if unknown."""
    return _memory(root)[1]


def _os_name(root: Path) -> str:
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        text = read_text(root, path)
        if text is None:
            continue
        for line in text.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "PRETTY_NAME":
                return value.strip().strip("\"'")
    return ""


@dataclasses.dataclass(frozen=True)
class DiskUsage:
    """Size and free space of a file system, in bytes. Both are 0 when they could not be read."""

    total_bytes: int
    free_bytes: int

    @property
    def reported_free_bytes(self) -> int:
        """Free bytes as the orchestrator stores them. 0 means unknown, so a full file system reports 1.

        Variant selection treats an unknown free space as fitting every file, so a full model store
        must not send 0.
        """
        if not self.total_bytes:
            return 0
        return max(self.free_bytes, 1)


def disk_usage(store_dir: Path) -> DiskUsage:
    """Return the size and free bytes of the file system holding store_dir (or its nearest existing parent)."""
    directory = store_dir.absolute()
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        usage = shutil.disk_usage(directory)
    except OSError as exc:
        logger.debug("cannot read free disk space of %s: %s", directory, exc)
        return DiskUsage(0, 0)
    return DiskUsage(usage.total, usage.free)


def disk_free_bytes(store_dir: Path) -> int:
    """Return the free bytes of the file system holding store_dir (or its nearest existing parent).

    Returns 0 when they could not be read and at least 1 otherwise, as DiskUsage.reported_free_bytes.
    """
    return disk_usage(store_dir).reported_free_bytes


def probe_hardware(
    *,
    root: Path = Path("/"),
    store_dir: Path,
    machine: str | None = None,
    kernel: str | None = None,
    affinity: Collection[int] | None = None,
    runtimes: Callable[[], tuple[RuntimeInfo, ...]] = probe_runtimes,
    nvml_loader: Callable[[], Any | None] | None = None,
) -> HardwareProfile:
    """Probe this device's hardware, reading every /proc, /sys, /dev and /etc path below root.

    machine and kernel default to platform.machine() and platform.release(), affinity to
    os.sched_getaffinity(0). NVML is queried through nvml_loader, which defaults to loading
    libnvidia-ml.so.1 when root is "/" and to skipping NVML for a fake tree. runtimes probes the
    inference runtimes. Missing or unreadable files give empty or zero values and a debug log line.
    Returns the profile with hardware_class filled in.
    """
    cpus = set(affinity) if affinity is not None else os.sched_getaffinity(0)
    cpuinfo_text = read_text(root, "/proc/cpuinfo")
    cpuinfo = parse_cpuinfo(cpuinfo_text) if cpuinfo_text is not None else CpuInfo("", (), 0)

    quota = cpu_quota(root)
    usable_cores = float(len(cpus)) if quota is None else min(float(len(cpus)), quota)
    if usable_cores <= 0:
        logger.debug("no usable CPUs found (affinity %s, quota %s)", sorted(cpus), quota)
    memory_total, memory_available = _memory(root)

    if nvml_loader is None and root == Path("/"):
        nvml_loader = load_nvml

    profile = HardwareProfile(
        cpu_model=cpuinfo.model,
        architecture=machine if machine is not None else platform.machine(),
        logical_cores=_online_cpus(root, cpuinfo, cpus),
        usable_cores=usable_cores,
        cpu_features=cpuinfo.features,
        memory_total_bytes=memory_total,
        memory_available_bytes=memory_available,
        disk_free_bytes=disk_free_bytes(store_dir),
        accelerators=probe_accelerators(root, nvml_loader),
        runtimes=runtimes(),
        os=_os_name(root),
        kernel=kernel if kernel is not None else platform.release(),
    )
    return dataclasses.replace(profile, hardware_class=hardware_class_of(profile))
