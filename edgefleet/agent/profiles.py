"""Device profiles: TOML files that make an agent report and respect the limits of a smaller device."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import logging
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.agent.probe_runtimes import LITERT_BUILTIN_DELEGATES
from edgefleet.common.hardware import HardwareProfile, RuntimeInfo, hardware_class_of
from edgefleet.common.labels import label_problem

logger = logging.getLogger(__name__)

RUNTIMES = ("litert", "onnxruntime")
# Providers that run on the CPU alone; a cpu_only profile keeps only these.
CPU_PROVIDERS = {"onnxruntime": ("CPUExecutionProvider",), "litert": LITERT_BUILTIN_DELEGATES}
ALLOWED_KEYS = (
    "cores",
    "cpu_model",
    "cpu_only",
    "description",
    "labels",
    "memory_mib",
    "name",
    "runtimes",
    "threads",
)
MAX_CORES = 1024
MAX_THREADS = 1024
MAX_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB.
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_MIB = 1024 * 1024


class ProfileError(ValueError):
    """A device profile file is missing, not valid TOML or has an invalid key or value."""


@dataclass(frozen=True)
class EnforcedLimits:
    cpus: tuple[int, ...]  # CPU ids the process is pinned to.
    threads: int  # Intra-op threads a runtime session may use.
    # Memory the loaded models may use (the profile's memory_mib), or None for no budget. The agent
    # rejects a model whose estimated memory, added to that of the models loaded, exceeds it. RLIMIT_AS
    # is not used because runtimes reserve far more virtual address space than they touch.
    memory_budget_bytes: int | None
    # The cgroup memory limit of the whole process, or None: the agent also rejects a model whose
    # estimate, added to the loaded models and the agent's own memory, exceeds it.
    memory_limit_bytes: int | None = None


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str = ""
    cores: float | None = None  # CPU budget; may be fractional. None keeps what the probe found.
    memory_bytes: int | None = None
    runtimes: tuple[str, ...] | None = None  # Allowed runtimes from RUNTIMES; None allows all.
    labels: dict[str, str] = field(default_factory=dict)
    cpu_model: str | None = None  # Reported in place of the probed CPU model.
    threads: int | None = None  # Intra-op threads; None means one per pinned CPU.
    cpu_only: bool = False  # Hide accelerators and keep only the CPU providers.

    def apply(self, probed: HardwareProfile) -> HardwareProfile:
        """Return probed with this profile's limits applied and hardware_class recomputed.

        Cores and memory are capped by what the probe found, because a profile cannot add hardware.
        Runtimes are filtered to the allowed ones and profile_name is set.
        """
        usable_cores = probed.usable_cores
        logical_cores = probed.logical_cores
        if self.cores is not None:
            if self.cores > probed.usable_cores:
                logger.warning(
                    "profile %s requests %g cores but only %g are usable; using %g",
                    self.name,
                    self.cores,
                    probed.usable_cores,
                    probed.usable_cores,
                )
            usable_cores = min(self.cores, probed.usable_cores)
            logical_cores = min(probed.logical_cores, math.ceil(self.cores))

        memory_total = probed.memory_total_bytes
        if self.memory_bytes is not None:
            memory_total = min(self.memory_bytes, memory_total) if memory_total else self.memory_bytes

        runtimes = tuple(
            self._allowed_runtime(runtime)
            for runtime in probed.runtimes
            if self.runtimes is None or runtime.name in self.runtimes
        )
        for missing in sorted(set(self.runtimes or ()) - {runtime.name for runtime in runtimes}):
            logger.warning("profile %s allows runtime %s, which is not installed", self.name, missing)

        profile = dataclasses.replace(
            probed,
            cpu_model=self.cpu_model if self.cpu_model is not None else probed.cpu_model,
            logical_cores=logical_cores,
            usable_cores=usable_cores,
            memory_total_bytes=memory_total,
            # A probe that could not read /proc/meminfo reports 0, so the profile's memory is used.
            memory_available_bytes=min(probed.memory_available_bytes or memory_total, memory_total),
            accelerators=() if self.cpu_only else probed.accelerators,
            runtimes=runtimes,
            profile_name=self.name,
        )
        return dataclasses.replace(profile, hardware_class=hardware_class_of(profile))

    def _allowed_runtime(self, runtime: RuntimeInfo) -> RuntimeInfo:
        if not self.cpu_only:
            return runtime
        cpu_providers = CPU_PROVIDERS.get(runtime.name, ())
        return dataclasses.replace(
            runtime, providers=tuple(p for p in runtime.providers if p in cpu_providers)
        )

    def enforce(self, cpu_quota: float | None = None, memory_limit_bytes: int | None = None) -> EnforcedLimits:
        """Pin this process to ceil(cores) of the CPUs it may run on, lowest ids first.

        Sets the affinity of every thread listed in /proc/self/task with os.sched_setaffinity
        (threads created later inherit it); a profile without cores leaves the affinity alone.
        cpu_quota is the cgroup CPU quota in CPUs (probe_cgroup.cpu_quota), or None when unlimited.
        memory_limit_bytes is the cgroup memory limit (probe_cgroup.memory_limit), or None when unlimited.
        The profile's memory_mib becomes the budget for the loaded models. The cgroup limit is kept apart
        as the bound of the whole process, the agent's own memory included, because the kernel kills the
        agent there.
        Without `threads` in the profile, the agent runs one thread per pinned CPU. Either way it runs no more
        than the quota rounded up, because the kernel throttles a cgroup that has used its quota, so more
        threads only wait.
        Returns the CPUs, the thread count, the memory budget and the memory limit that the agent must respect.
        """
        usable = sorted(os.sched_getaffinity(0))
        cpus = usable
        if self.cores is not None:
            requested = math.ceil(self.cores)
            if requested > len(usable):
                logger.warning(
                    "profile %s requests %d CPUs but the process may use only %d",
                    self.name,
                    requested,
                    len(usable),
                )
            cpus = usable[:requested]
            _pin_all_threads(cpus)
            logger.info("profile %s pinned the agent to CPUs %s", self.name, cpus)
        threads = self.threads if self.threads is not None else default_threads(len(cpus), cpu_quota)
        quota_threads = default_threads(threads, cpu_quota)
        if threads > quota_threads:
            # An explicit value may exceed the pinned CPUs, but not the quota: the kernel throttles the extra threads.
            logger.warning(
                "profile %s sets threads = %d, more than the cgroup CPU quota of %g CPUs allows; using %d",
                self.name,
                threads,
                cpu_quota,
                quota_threads,
            )
            threads = quota_threads
        return EnforcedLimits(
            cpus=tuple(cpus),
            threads=threads,
            memory_budget_bytes=self.memory_bytes,
            memory_limit_bytes=memory_limit_bytes,
        )


def default_threads(cpu_count: int, cpu_quota: float | None) -> int:
    """Return the intra-op threads for cpu_count CPUs under a cgroup quota of cpu_quota CPUs (None: no quota)."""
    if cpu_quota is None:
        return cpu_count
    return max(1, min(cpu_count, math.ceil(cpu_quota)))


def _pin_all_threads(cpus: list[int]) -> None:
    """Set the CPU affinity of every thread of this process; sched_setaffinity(0) sets only the caller's."""
    os.sched_setaffinity(0, cpus)
    try:
        thread_ids = [int(name) for name in os.listdir("/proc/self/task")]
    except OSError as exc:
        logger.warning("cannot list the threads of the agent, so only new threads are pinned: %s", exc)
        return
    for thread_id in thread_ids:
        with contextlib.suppress(ProcessLookupError):  # The thread exited after the listing.
            os.sched_setaffinity(thread_id, cpus)


def profiles_dir() -> Path:
    """Return the directory of the profiles that ship with the agent."""
    return Path(str(importlib.resources.files("edgefleet.agent").joinpath("profiles")))


def shipped_profiles() -> tuple[str, ...]:
    """Return the names of the profiles that ship with the agent, sorted."""
    return tuple(sorted(path.stem for path in profiles_dir().glob("*.toml")))


def load_profile(name_or_path: str) -> DeviceProfile:
    """Load a shipped profile by bare name ("camera") or a profile file by path.

    Raises ProfileError naming the file, the key and the allowed values when the file is missing,
    is not valid TOML, or has an unknown key, a value of the wrong type or out of range.
    """
    is_path = os.sep in name_or_path or name_or_path.endswith(".toml")
    path = Path(name_or_path) if is_path else profiles_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        if is_path:
            raise ProfileError(f"device profile file {path} not found")
        raise ProfileError(
            f"unknown device profile {name_or_path!r}; shipped profiles: "
            f"{', '.join(shipped_profiles())}, or pass the path of a .toml file"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read device profile {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: invalid TOML: {exc}") from exc
    return parse_profile(data, source=str(path), default_name=path.stem)


def _number(data: dict[str, Any], key: str, source: str, low: float, high: float, integer: bool) -> Any:
    """Validate data[key] as a number in (low, high]; None when the key is absent."""
    value = data.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and isinstance(value, float))
    ):
        kind = "an integer" if integer else "a number"
        raise ProfileError(f"{source}: key {key!r} must be {kind}, got {value!r} ({type(value).__name__})")
    if not low < value <= high:  # Also rejects nan, which compares false.
        raise ProfileError(
            f"{source}: key {key!r} must be greater than {low:g} and at most {high:g}, got {value!r}"
        )
    return value


def _string(data: dict[str, Any], key: str, source: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ProfileError(f"{source}: key {key!r} must be a string, got {value!r} ({type(value).__name__})")
    return value


def _runtimes(data: dict[str, Any], source: str) -> tuple[str, ...] | None:
    value = data.get("runtimes")
    if value is None:
        return None
    allowed = ", ".join(RUNTIMES)
    if not isinstance(value, list) or not value:
        raise ProfileError(
            f"{source}: key 'runtimes' must be a non-empty list of runtime names ({allowed}), got {value!r}"
        )
    for name in value:
        if name not in RUNTIMES:
            raise ProfileError(
                f"{source}: key 'runtimes' contains unknown runtime {name!r}; allowed values: {allowed}"
            )
    return tuple(dict.fromkeys(value))


def _labels(data: dict[str, Any], source: str) -> dict[str, str]:
    value = data.get("labels", {})
    if not isinstance(value, dict):
        raise ProfileError(
            f"{source}: key 'labels' must be a table of strings, such as [labels] kind = "
            f'"camera", got {value!r}'
        )
    for key, label in value.items():
        if not isinstance(label, str):
            raise ProfileError(
                f"{source}: label {key!r} must be a string, got {label!r} ({type(label).__name__})"
            )
    problem = label_problem(value)
    if problem:
        raise ProfileError(f"{source}: invalid [labels]: {problem}; the orchestrator would reject the device")
    return dict(value)


def parse_profile(data: dict[str, Any], *, source: str, default_name: str) -> DeviceProfile:
    """Validate the parsed TOML of a profile; source names the file in errors.

    Raises ProfileError for unknown keys and for values of the wrong type or out of range.
    """
    for key in data:
        if key not in ALLOWED_KEYS:
            raise ProfileError(f"{source}: unknown key {key!r}; allowed keys: {', '.join(ALLOWED_KEYS)}")

    name = _string(data, "name", source) or default_name
    if not _NAME.match(name):
        raise ProfileError(
            f"{source}: key 'name' must be lower-case letters, digits, '.', '_' or '-', got {name!r}"
        )
    cpu_only = data.get("cpu_only", False)
    if not isinstance(cpu_only, bool):
        raise ProfileError(f"{source}: key 'cpu_only' must be true or false, got {cpu_only!r}")
    cores = _number(data, "cores", source, 0, MAX_CORES, integer=False)
    memory_mib = _number(data, "memory_mib", source, 0, MAX_MEMORY_MIB, integer=True)
    return DeviceProfile(
        name=name,
        description=_string(data, "description", source) or "",
        cores=float(cores) if cores is not None else None,
        memory_bytes=memory_mib * _MIB if memory_mib is not None else None,
        runtimes=_runtimes(data, source),
        labels=_labels(data, source),
        cpu_model=_string(data, "cpu_model", source),
        threads=_number(data, "threads", source, 0, MAX_THREADS, integer=True),
        cpu_only=cpu_only,
    )
