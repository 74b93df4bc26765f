"""GPU and NPU detection from device nodes, sysfs PCI devices and NVML, merged into one list."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from edgefleet.agent.probe_files import link_name, list_dir, read_first_line, read_int, read_text, under
from edgefleet.common.hardware import Accelerator

logger = logging.getLogger(__name__)

# PCI vendor ids (as sysfs writes them) of the vendors that make GPUs and NPUs.
PCI_VENDORS = {
    "0x10de": "nvidia",
    "0x1002": "amd",
    "0x1022": "amd",
    "0x8086": "intel",
    "0x13b5": "arm",
    "0x17cb": "qualcomm",
    "0x1e60": "hailo",
    "0x1ac1": "google",  # Coral Edge TPU (Global Unichip).
    "0x1d0f": "amazon",
    "0x1da3": "habana",
}

# Kernel drivers that identify the vendor of a device without a PCI vendor id (SoC GPUs and NPUs).
DRIVER_VENDORS = {
    "nvidia": "nvidia",
    "nouveau": "nvidia",
    "tegra": "nvidia",
    "amdgpu": "amd",
    "radeon": "amd",
    "amdxdna": "amd",
    "i915": "intel",
    "xe": "intel",
    "intel_vpu": "intel",
    "panfrost": "arm",
    "panthor": "arm",
    "lima": "arm",
    "mali": "arm",
    "msm": "qualcomm",
    "qaic": "qualcomm",
    "v3d": "broadcom",
    "vc4": "broadcom",
    "etnaviv": "vivante",
    "rocket": "rockchip",
    "habanalabs": "habana",
}

# Display controllers of servers and virtual machines: they have no compute units worth reporting.
# Vendors: ASPEED, Matrox, QEMU, Cirrus Logic, VMware, Red Hat (QXL), virtio, VirtualBox.
DISPLAY_ONLY_VENDORS = frozenset(
    {"0x1a03", "0x102b", "0x1234", "0x1013", "0x15ad", "0x1b36", "0x1af4", "0x80ee"}
)
DISPLAY_ONLY_DRIVERS = frozenset(
    {
        "ast",
        "mgag200",
        "bochs",
        "bochs-drm",
        "cirrus",
        "vmwgfx",
        "qxl",
        "virtio_gpu",
        "virtio-pci",
        "vboxvideo",
        "hyperv_drm",
        "vgem",
        "vkms",
        "simpledrm",
    }
)

# The name given to a device that no pci.ids database lists: "<vendor id>:<device id>".
_PCI_ID_NAME = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{4}$")
PCI_IDS_FILES = ("/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids", "/usr/share/pci.ids")
NVML_LIBRARY = "libnvidia-ml.so.1"

# A detector's rank when merging: the earlier one's non-empty fields win.
_SOURCE_RANK = {"nvml": 0, "sysfs": 1, "devfs": 2}


def normalise_pci_address(address: str) -> str:
    """Return address as sysfs spells it (0000:01:00.0), or "" when it is not a PCI address."""
    address = address.strip().lower()
    match = re.match(r"^([0-9a-f]+):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$", address)
    if match is None:
        return ""
    domain, bus, device, function = match.groups()
    return f"{int(domain, 16):04x}:{bus}:{device}.{function}"


def pci_device_name(root: Path, vendor_id: str, device_id: str) -> str:
    """Look up a device's name in the pci.ids database; "" when no database lists it."""
    vendor_key = vendor_id.lower().removeprefix("0x")
    device_key = device_id.lower().removeprefix("0x")
    for path in PCI_IDS_FILES:
        text = read_text(root, path)
        if text is None:
            continue
        in_vendor = False
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            if not line.startswith("\t"):
                in_vendor = line[:4].lower() == vendor_key
            elif in_vendor and not line.startswith("\t\t") and line[1:5].lower() == device_key:
                return line[5:].strip()
    return ""


def _is_display_only(vendor_id: str, driver: str) -> bool:
    return vendor_id in DISPLAY_ONLY_VENDORS or driver in DISPLAY_ONLY_DRIVERS


def _vendor_name(vendor_id: str, driver: str) -> str:
    return PCI_VENDORS.get(vendor_id) or DRIVER_VENDORS.get(driver) or vendor_id


def sysfs_pci_accelerators(root: Path) -> list[Accelerator]:
    """Find GPUs (PCI class 0x03xxxx) and NPUs (class 0x1200xx) in /sys/bus/pci/devices."""
    found: list[Accelerator] = []
    for device_dir in list_dir(under(root, "/sys/bus/pci/devices")):
        device_class = read_int(device_dir, "class", 16)
        if device_class is None:
            continue
        if device_class >> 16 == 0x03:
            kind = "gpu"
        elif device_class >> 8 == 0x1200:
            kind = "npu"
        else:
            continue
        vendor_id = (read_first_line(device_dir, "vendor") or "").lower()
        device_id = (read_first_line(device_dir, "device") or "").lower()
        driver = link_name(device_dir / "driver")
        if _is_display_only(vendor_id, driver):
            logger.debug(
                "ignoring display controller %s (vendor %s, driver %s)",
                device_dir.name,
                vendor_id,
                driver or "none",
            )
            continue
        name = pci_device_name(root, vendor_id, device_id)
        if not name and vendor_id and device_id:
            name = f"{vendor_id.removeprefix('0x')}:{device_id.removeprefix('0x')}"
        found.append(
            Accelerator(
                kind=kind,
                vendor=_vendor_name(vendor_id, driver),
                name=name,
                pci_address=normalise_pci_address(device_dir.name),
                driver=driver,
                memory_bytes=read_int(device_dir, "mem_info_vram_total") or 0,  # amdgpu only.
                source="sysfs",
            )
        )
    return found


def _nvidia_proc_info(root: Path) -> dict[int, tuple[str, str]]:
    """Map NVIDIA device minors to (PCI address, model) from /proc/driver/nvidia/gpus."""
    by_minor: dict[int, tuple[str, str]] = {}
    for gpu_dir in list_dir(under(root, "/proc/driver/nvidia/gpus")):
        fields: dict[str, str] = {}
        for line in (read_text(gpu_dir, "information") or "").splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        minor = fields.get("Device Minor", "")
        if minor.isdigit():
            by_minor[int(minor)] = (normalise_pci_address(gpu_dir.name), fields.get("Model", ""))
    return by_minor


def _class_device(root: Path, kind: str, node: Path, class_dir: str) -> Accelerator | None:
    """Describe a /dev/dri or /dev/accel node from its /sys/class entry; None for display-only devices."""
    device_link = under(root, f"{class_dir}/{node.name}/device")
    driver = link_name(device_link / "driver")
    vendor_id = (read_first_line(device_link, "vendor") or "").lower()
    if _is_display_only(vendor_id, driver):
        logger.debug(
            "ignoring %s of display controller (vendor %s, driver %s)",
            node,
            vendor_id or "none",
            driver or "none",
        )
        return None
    return Accelerator(
        kind=kind,
        vendor=_vendor_name(vendor_id, driver),
        device_path=f"/dev/{node.parent.name}/{node.name}",
        pci_address=normalise_pci_address(link_name(device_link)),
        driver=driver,
        source="devfs",
    )


def devfs_accelerators(root: Path) -> list[Accelerator]:
    """Find /dev/nvidia[0-9]*, /dev/dri/renderD* (GPUs) and /dev/accel/accel* (NPUs)."""
    found: list[Accelerator] = []
    nvidia_info = _nvidia_proc_info(root)
    for node in list_dir(under(root, "/dev")):
        match = re.fullmatch(r"nvidia(\d+)", node.name)
        if match is None:
            continue
        pci_address, model = nvidia_info.get(int(match.group(1)), ("", ""))
        found.append(
            Accelerator(
                kind="gpu",
                vendor="nvidia",
                name=model,
                device_path=f"/dev/{node.name}",
                pci_address=pci_address,
                driver="nvidia",
                source="devfs",
            )
        )
    # NOTE: GPUs and NPUs that only have vendor device nodes (Jetson's /dev/nvhost-*, Coral's
    # /dev/apex_*, Hailo's /dev/hailo*) are found only through a PCI class of 0x03 or 0x1200.
    class_nodes = [("gpu", node, "/sys/class/drm") for node in list_dir(under(root, "/dev/dri"))]
    class_nodes += [("npu", node, "/sys/class/accel") for node in list_dir(under(root, "/dev/accel"))]
    for kind, node, class_dir in class_nodes:
        if not re.fullmatch(r"renderD\d+|accel\d+", node.name):
            continue
        accelerator = _class_device(root, kind, node, class_dir)
        if accelerator is not None:
            found.append(accelerator)
    return found


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _NvmlPciInfo(ctypes.Structure):
    _fields_ = [
        ("busIdLegacy", ctypes.c_char * 16),
        ("domain", ctypes.c_uint),
        ("bus", ctypes.c_uint),
        ("device", ctypes.c_uint),
        ("pciDeviceId", ctypes.c_uint),
        ("pciSubSystemId", ctypes.c_uint),
        ("busId", ctypes.c_char * 32),
    ]


def load_nvml() -> Any | None:
    """Load libnvidia-ml.so.1 with ctypes; None when the NVIDIA driver is not installed."""
    try:
        return ctypes.CDLL(NVML_LIBRARY)
    except OSError as exc:
        logger.debug("NVML not available: %s", exc)
        return None


def nvml_accelerators(load: Callable[[], Any | None] = load_nvml) -> list[Accelerator]:
    """List NVIDIA GPUs with their names, memory and PCI addresses through NVML.

    load returns the NVML library (or a stand-in with the same functions), or None. Returns an
    empty list when NVML is missing or its initialisation fails.
    """
    nvml = load()
    if nvml is None:
        return []
    status = nvml.nvmlInit_v2()
    if status != 0:
        logger.debug("nvmlInit_v2 failed with NVML status %s", status)
        return []
    found: list[Accelerator] = []
    try:
        count = ctypes.c_uint(0)
        if nvml.nvmlDeviceGetCount_v2(ctypes.pointer(count)) != 0:
            return []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            if nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.pointer(handle)) != 0:
                logger.debug("NVML cannot open GPU %d", index)
                continue
            name = ctypes.create_string_buffer(96)
            nvml.nvmlDeviceGetName(handle, name, ctypes.c_uint(len(name)))
            memory = _NvmlMemory()
            if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.pointer(memory)) != 0:
                memory.total = 0
            pci = _NvmlPciInfo()
            if nvml.nvmlDeviceGetPciInfo_v3(handle, ctypes.pointer(pci)) != 0:
                pci.busId = b""
            found.append(
                Accelerator(
                    kind="gpu",
                    vendor="nvidia",
                    name=name.value.decode(errors="replace"),
                    pci_address=normalise_pci_address(pci.busId.decode(errors="replace")),
                    driver="nvidia",
                    memory_bytes=int(memory.total),
                    source="nvml",
                )
            )
    finally:
        nvml.nvmlShutdown()
    return found


def _same_device(kept: Accelerator, new: Accelerator) -> bool:
    if kept.pci_address and new.pci_address:
        return kept.pci_address == new.pci_address
    if kept.device_path and new.device_path:
        return kept.device_path == new.device_path
    # A device node without a known PCI address pairs with a device of the same vendor that has no
    # node yet, in order: /dev/nvidia0 with the first NVIDIA GPU.
    return (
        not new.pci_address
        and kept.kind == new.kind
        and kept.vendor == new.vendor
        and not kept.device_path
        and bool(new.device_path)
    )


def _combine(kept: Accelerator, new: Accelerator) -> Accelerator:
    """Fill kept's empty fields from new; kept comes from the higher-ranked detector.

    A name that is only the PCI ids ("10de:2330") gives way to a model name from another detector.
    """
    updates = {
        field.name: getattr(new, field.name)
        for field in dataclasses.fields(Accelerator)
        if not getattr(kept, field.name) and getattr(new, field.name)
    }
    if _PCI_ID_NAME.match(kept.name) and new.name and not _PCI_ID_NAME.match(new.name):
        updates["name"] = new.name
    return dataclasses.replace(kept, **updates)


def merge_accelerators(found: Iterable[Accelerator]) -> tuple[Accelerator, ...]:
    """De-duplicate what several detectors found, matching on PCI address, then device node.

    Fields of the higher-ranked detector (nvml, then sysfs, then devfs) win and `source` names it.
    Returns the merged accelerators sorted by kind, PCI address and device node.
    """
    merged: list[Accelerator] = []
    for accelerator in sorted(found, key=lambda item: _SOURCE_RANK.get(item.source, len(_SOURCE_RANK))):
        for index, kept in enumerate(merged):
            if _same_device(kept, accelerator):
                merged[index] = _combine(kept, accelerator)
                break
        else:
            merged.append(accelerator)
    return tuple(sorted(merged, key=lambda item: (item.kind, item.pci_address, item.device_path)))


def probe_accelerators(root: Path, nvml_loader: Callable[[], Any | None] | None) -> tuple[Accelerator, ...]:
    """Run the sysfs, devfs and (when nvml_loader is set) NVML detectors and merge their results."""
    found = sysfs_pci_accelerators(root) + devfs_accelerators(root)
    if nvml_loader is not None:
        found += nvml_accelerators(nvml_loader)
    return merge_accelerators(found)
