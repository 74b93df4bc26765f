"""Builder of fake /proc, /sys, /dev and /etc trees that probe_hardware reads through its root argument."""

from __future__ import annotations

import os
from pathlib import Path

GIB = 1024**3
MIB = 1024**2

MEMINFO_8_GIB = """MemTotal:        8388608 kB
MemFree:         4194304 kB
MemAvailable:    6291456 kB
Buffers:          102400 kB
Cached:          1048576 kB
"""


class FakeTree:
    """A directory laid out like the root of a Linux system, with helpers for devices and cgroups."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def write(self, path: str, text: str) -> Path:
        target = self.path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        return target

    def link(self, path: str, target: str) -> None:
        """Create a symlink at path pointing at target, relative to the link's folder like sysfs does."""
        link = self.path(path)
        link.parent.mkdir(parents=True, exist_ok=True)
        absolute_target = self.path(target)
        absolute_target.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(absolute_target, link.parent))

    def device_node(self, path: str) -> None:
        """Create a stand-in for a character device: the probe only checks that the name exists."""
        self.write(path, "")

    def add_pci_device(
        self,
        address: str,
        *,
        device_class: int,
        vendor: str,
        device: str,
        driver: str = "",
        files: dict[str, str] | None = None,
    ) -> str:
        """Add /sys/bus/pci/devices/<address>; returns the device folder's path in the tree."""
        folder = f"/sys/devices/pci0000:00/{address}"
        self.write(f"{folder}/class", f"{device_class:#08x}\n")
        self.write(f"{folder}/vendor", f"{vendor}\n")
        self.write(f"{folder}/device", f"{device}\n")
        for name, text in (files or {}).items():
            self.write(f"{folder}/{name}", text)
        if driver:
            self.link(f"{folder}/driver", f"/sys/bus/pci/drivers/{driver}")
        self.link(f"/sys/bus/pci/devices/{address}", folder)
        return folder

    def add_class_node(self, class_name: str, node: str, device_folder: str) -> None:
        """Add /dev/<dri|accel>/<node> and /sys/class/<drm|accel>/<node>/device pointing at device_folder."""
        dev_folder = "dri" if class_name == "drm" else class_name
        self.device_node(f"/dev/{dev_folder}/{node}")
        self.link(f"/sys/class/{class_name}/{node}/device", device_folder)

    def add_platform_device(self, name: str, driver: str) -> str:
        """Add a SoC device without PCI ids (a Mali GPU, say); returns its folder."""
        folder = f"/sys/devices/platform/{name}"
        self.path(folder).mkdir(parents=True, exist_ok=True)
        self.link(f"{folder}/driver", f"/sys/bus/platform/drivers/{driver}")
        return folder

    def add_nvidia_gpu(self, minor: int, address: str, model: str) -> None:
        """Add /dev/nvidia<minor> and the driver's /proc/driver/nvidia/gpus/<address>/information."""
        self.device_node(f"/dev/nvidia{minor}")
        self.write(
            f"/proc/driver/nvidia/gpus/{address}/information",
            f"Model: \t\t {model}\nIRQ:   \t\t 42\nGPU UUID: \t GPU-0\nDevice Minor: \t {minor}\n"
            f"Bus Location: \t {address}\n",
        )

    def set_cgroup_v2(self, process_path: str, files: dict[str, dict[str, str]]) -> None:
        """Mount a unified hierarchy at /sys/fs/cgroup with the process in process_path.

        files maps a cgroup path ("/" or "/agent.slice") to the interface files it contains.
        """
        self.write("/proc/self/cgroup", f"0::{process_path}\n")
        self.write(
            "/proc/self/mountinfo",
            "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw\n"
            "30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 "
            "rw,nsdelegate\n",
        )
        self.write("/sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory pids\n")
        for cgroup, contents in files.items():
            for name, text in contents.items():
                self.write(f"/sys/fs/cgroup/{cgroup.strip('/')}/{name}", text)

    def set_cgroup_v1(self, process_path: str, cpu: dict[str, str], memory: dict[str, str]) -> None:
        """Mount cpu,cpuacct and memory v1 hierarchies with the process in process_path of both.

        cpu and memory hold the interface files of the process's cgroup in each hierarchy.
        """
        self.write(
            "/proc/self/cgroup",
            f"12:memory:{process_path}\n4:cpu,cpuacct:{process_path}\n1:name=systemd:{process_path}\n",
        )
        self.write(
            "/proc/self/mountinfo",
            "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw\n"
            "31 22 0:27 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755\n"
            "33 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:10 - cgroup cgroup rw,cpu,cpuacct\n"
            "34 31 0:30 / /sys/fs/cgroup/memory rw,nosuid shared:11 - cgroup cgroup rw,memory\n",
        )
        for name, text in cpu.items():
            self.write(f"/sys/fs/cgroup/cpu,cpuacct/{process_path.strip('/')}/{name}", text)
        for name, text in memory.items():
            self.write(f"/sys/fs/cgroup/memory/{process_path.strip('/')}/{name}", text)
