"""CPU quota and memory limit of the current process's cgroups, for cgroup v1, v2 and hybrid hosts."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.probe_files import read_first_line, read_int, read_text, under

logger = logging.getLogger(__name__)

# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX times the page size, 0x7FFFFFFFFFFFF000 on
# 4 KiB pages; anything this large is treated as unlimited.
V1_UNLIMITED_THRESHOLD = 1 << 62

# Conventional mount points, used when /proc/self/mountinfo cannot be read.
_FALLBACK_MOUNTS = (
    (2, "/sys/fs/cgroup", frozenset[str]()),
    (2, "/sys/fs/cgroup/unified", frozenset[str]()),
    (1, "/sys/fs/cgroup/cpu,cpuacct", frozenset({"cpu", "cpuacct"})),
    (1, "/sys/fs/cgroup/cpu", frozenset({"cpu"})),
    (1, "/sys/fs/cgroup/memory", frozenset({"memory"})),
)


@dataclass(frozen=True)
class CgroupMount:
    version: int  # 1 or 2.
    mount_point: str  # Absolute path in the probed tree.
    cgroup_root: str  # The cgroup path that the mount point shows (the mountinfo "root" field).
    controllers: frozenset[str]  # v1 controllers of this hierarchy; empty for v2.


@dataclass(frozen=True)
class CgroupMemory:
    limit_bytes: int  # Tightest memory limit of the cgroup and its ancestors.
    available_bytes: int  # Smallest headroom: limit minus the working set, over the limited levels.


def _unescape_mount_path(path: str) -> str:
    """Decode the octal escapes (\\040 for a space) that /proc/self/mountinfo uses in paths."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), path)


def read_cgroup_mounts(root: Path) -> list[CgroupMount]:
    """List the cgroup v1 and v2 mounts from /proc/self/mountinfo.

    Falls back to the conventional mount points under /sys/fs/cgroup that exist when mountinfo
    cannot be read.
    """
    text = read_text(root, "/proc/self/mountinfo")
    if text is None:
        return [
            CgroupMount(version, mount_point, "/", controllers)
            for version, mount_point, controllers in _FALLBACK_MOUNTS
            if under(root, mount_point).is_dir()
        ]

    mounts: list[CgroupMount] = []
    for line in text.splitlines():
        fields, separator, tail = line.partition(" - ")
        parts = fields.split()
        tail_parts = tail.split()
        if not separator or len(parts) < 5 or len(tail_parts) < 3:
            continue
        fstype, super_options = tail_parts[0], tail_parts[2]
        cgroup_root, mount_point = _unescape_mount_path(parts[3]), _unescape_mount_path(parts[4])
        if fstype == "cgroup2":
            mounts.append(CgroupMount(2, mount_point, cgroup_root, frozenset()))
        elif fstype == "cgroup":
            controllers = frozenset(super_options.split(",")) - {"rw", "ro"}
            mounts.append(CgroupMount(1, mount_point, cgroup_root, controllers))
    return mounts


def read_cgroup_membership(root: Path) -> tuple[dict[str, str], str | None]:
    """Parse /proc/self/cgroup into the v1 path of each controller and the v2 path (None if absent)."""
    v1_paths: dict[str, str] = {}
    v2_path: str | None = None
    text = read_text(root, "/proc/self/cgroup") or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy_id, controllers, path = parts
        if hierarchy_id == "0" and controllers == "":
            v2_path = path
            continue
        for controller in controllers.split(","):
            v1_paths[controller] = path
    return v1_paths, v2_path


def _levels(root: Path, mount: CgroupMount, cgroup_path: str) -> list[Path]:
    """Return the cgroup directories from the process's cgroup up to the mount point, leaf first."""
    mount_dir = under(root, mount.mount_point)
    prefix = mount.cgroup_root.rstrip("/")
    if cgroup_path == prefix or cgroup_path.startswith(prefix + "/"):
        relative = cgroup_path[len(prefix) :].strip("/")
    else:
        # A cgroup namespace shows the container's cgroup as the mount root.
        relative = ""
    leaf = mount_dir / relative if relative else mount_dir
    if not leaf.is_dir():
        logger.debug("cgroup directory %s not found; using %s", leaf, mount_dir)
        leaf = mount_dir

    levels = [leaf]
    while levels[-1] != mount_dir and mount_dir in levels[-1].parents:
        levels.append(levels[-1].parent)
    return levels


def _cgroup_levels(root: Path, controller: str) -> Iterator[tuple[int, Path]]:
    """Yield (version, directory) for every cgroup level that may limit controller."""
    v1_paths, v2_path = read_cgroup_membership(root)
    for mount in read_cgroup_mounts(root):
        if mount.version == 2:
            path = v2_path if v2_path is not None else "/"
        elif controller in mount.controllers:
            path = v1_paths.get(controller, "/")
        else:
            continue
        for level in _levels(root, mount, path):
            yield mount.version, level


def _v2_cpu_max(level: Path) -> float | None:
    line = read_first_line(level, "cpu.max")
    if line is None:
        return None
    parts = line.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        logger.debug("invalid cpu.max in %s: %r", level, line)
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_cfs_quota(level: Path) -> float | None:
    quota = read_int(level, "cpu.cfs_quota_us")
    period = read_int(level, "cpu.cfs_period_us")
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None
    return quota / period


def cpu_quota(root: Path) -> float | None:
    """Return the tightest CPU quota, in CPUs (150000/100000 gives 1.5), or None when unlimited.

    Checks the process's cgroup and its ancestors in every hierarchy: v2 `cpu.max`, v1
    `cpu.cfs_quota_us` over `cpu.cfs_period_us`.
    """
    quotas: list[float] = []
    for version, level in _cgroup_levels(root, "cpu"):
        quota = _v2_cpu_max(level) if version == 2 else _v1_cfs_quota(level)
        if quota is not None:
            logger.debug("cgroup v%d CPU quota %.3f in %s", version, quota, level)
            quotas.append(quota)
    return min(quotas) if quotas else None


def _inactive_file_bytes(level: Path, version: int) -> int:
    """Return the reclaimable page cache of a cgroup from memory.stat, or 0 when unknown."""
    text = read_text(level, "memory.stat") or ""
    keys = ("inactive_file",) if version == 2 else ("total_inactive_file", "inactive_file")
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in keys and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    for key in keys:
        if key in values:
            return values[key]
    return 0


def _memory_limit_at(level: Path, version: int) -> tuple[int, int] | None:
    """Return (limit, usage) of one cgroup level, or None when it sets no memory limit."""
    if version == 2:
        line = read_first_line(level, "memory.max")
        if line is None or line == "max" or not line.isdigit():
            return None
        limit = int(line)
        usage = read_int(level, "memory.current")
    else:
        v1_limit = read_int(level, "memory.limit_in_bytes")
        if v1_limit is None or v1_limit >= V1_UNLIMITED_THRESHOLD:
            return None
        limit = v1_limit
        usage = read_int(level, "memory.usage_in_bytes")
    return limit, usage or 0


def memory_limit(root: Path) -> CgroupMemory | None:
    """Return the tightest cgroup memory limit and the headroom below it, or None when unlimited.

    Reads v2 `memory.max`/`memory.current` and v1 `memory.limit_in_bytes`/`memory.usage_in_bytes`
    of the process's cgroup and its ancestors. Headroom counts the inactive page cache from
    `memory.stat` as free, as the kernel reclaims it before the limit triggers the OOM killer.
    """
    limits: list[int] = []
    headrooms: list[int] = []
    for version, level in _cgroup_levels(root, "memory"):
        found = _memory_limit_at(level, version)
        if found is None:
            continue
        limit, usage = found
        working_set = max(0, usage - _inactive_file_bytes(level, version))
        logger.debug("cgroup v%d memory limit %d, working set %d in %s", version, limit, working_set, level)
        limits.append(limit)
        headrooms.append(max(0, limit - working_set))
    if not limits:
        return None
    return CgroupMemory(limit_bytes=min(limits), available_bytes=min(headrooms))
