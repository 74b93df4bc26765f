"""Domain types for a device's hardware, as probed by the agent and stored by the orchestrator."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

# Accelerator kinds, matching edgefleet.v1.AcceleratorKind without the prefix.
ACCELERATOR_KINDS = ("gpu", "npu", "dsp")
# Steps, in MiB, to which a hardware class rounds memory down. The first applies from 256 MiB up and
# the second below it.
MEMORY_STEP_MIB = 256
SMALL_MEMORY_STEP_MIB = 16


@dataclass(frozen=True)
class Accelerator:
    kind: str  # One of ACCELERATOR_KINDS.
    vendor: str
    name: str = ""
    device_path: str = ""
    pci_address: str = ""
    driver: str = ""
    memory_bytes: int = 0
    source: str = ""  # The detector that found it: "sysfs", "devfs" or "nvml".


@dataclass(frozen=True)
class RuntimeInfo:
    name: str  # "onnxruntime" or "litert".
    version: str
    providers: tuple[str, ...] = ()  # Execution providers or delegates that actually load.
    package: str = ""  # Python distribution: "ai-edge-litert" or "tflite-runtime" for LiteRT. "" when unknown.


@dataclass(frozen=True)
class HardwareProfile:
    cpu_model: str
    architecture: str
    logical_cores: int
    usable_cores: float
    cpu_features: tuple[str, ...]
    memory_total_bytes: int
    memory_available_bytes: int
    disk_free_bytes: int
    accelerators: tuple[Accelerator, ...] = ()
    runtimes: tuple[RuntimeInfo, ...] = ()
    os: str = ""
    kernel: str = ""
    profile_name: str = ""
    hardware_class: str = field(default="")

    def runtime(self, name: str) -> RuntimeInfo | None:
        """Return the installed runtime called name, or None."""
        for runtime in self.runtimes:
            if runtime.name == name:
                return runtime
        return None


def memory_class_mib(memory_bytes: int) -> int:
    """Round memory down to the step of its hardware class, in MiB.

    The step is 256 MiB from 256 MiB up. Below that it is 16 MiB, so that small devices such as PLCs
    with 32 to 128 MiB get distinct classes; under 16 MiB it is 1 MiB. Existing classes of 256 MiB
    and more keep their names.
    """
    mib = memory_bytes // (1024 * 1024)
    if mib >= MEMORY_STEP_MIB:
        return (mib // MEMORY_STEP_MIB) * MEMORY_STEP_MIB
    if mib >= SMALL_MEMORY_STEP_MIB:
        return (mib // SMALL_MEMORY_STEP_MIB) * SMALL_MEMORY_STEP_MIB
    return int(mib)


def hardware_class_of(profile: HardwareProfile) -> str:
    """Derive a stable key that groups devices whose inference speed should match.

    Devices of one class share the architecture, the usable cores rounded to a half, the memory
    rounded down (memory_class_mib), the inference-relevant CPU features, the accelerators and the
    runtimes with their providers. The key starts with a readable part and ends with a short hash of
    the rest.
    """
    cores = round(profile.usable_cores * 2) / 2
    memory_mib = memory_class_mib(profile.memory_total_bytes)
    parts = [
        profile.architecture,
        profile.cpu_model,
        f"cores={cores:g}",
        f"mem={memory_mib}",
        ",".join(sorted(profile.cpu_features)),
        ",".join(sorted(f"{a.kind}:{a.vendor}:{a.name}" for a in profile.accelerators)),
        ",".join(sorted(f"{r.name}:{'+'.join(r.providers)}" for r in profile.runtimes)),
    ]
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:8]
    label = profile.profile_name or profile.architecture
    return f"{label}-{cores:g}c-{memory_mib}m-{digest}"
