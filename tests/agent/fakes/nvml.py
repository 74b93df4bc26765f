"""Stand-in for libnvidia-ml.so.1 with the NVML functions the probe calls, for machines without a GPU."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

NVML_SUCCESS = 0
NVML_ERROR_DRIVER_NOT_LOADED = 9


@dataclass(frozen=True)
class FakeGpu:
    name: str
    memory_bytes: int
    bus_id: str  # As NVML spells it: "00000000:01:00.0".


class FakeNvml:
    """Implements NVML calls like the real library: returns status codes, writes results through pointers."""

    def __init__(self, gpus: list[FakeGpu], init_status: int = NVML_SUCCESS) -> None:
        self.gpus = gpus
        self.init_status = init_status
        self.shutdown_calls = 0

    def nvmlInit_v2(self) -> int:
        return self.init_status

    def nvmlShutdown(self) -> int:
        self.shutdown_calls += 1
        return NVML_SUCCESS

    def nvmlDeviceGetCount_v2(self, count: Any) -> int:
        count.contents.value = len(self.gpus)
        return NVML_SUCCESS

    def nvmlDeviceGetHandleByIndex_v2(self, index: ctypes.c_uint, handle: Any) -> int:
        handle.contents.value = index.value + 1
        return NVML_SUCCESS

    def _gpu(self, handle: ctypes.c_void_p) -> FakeGpu:
        return self.gpus[(handle.value or 0) - 1]

    def nvmlDeviceGetName(self, handle: ctypes.c_void_p, name: Any, length: ctypes.c_uint) -> int:
        name.value = self._gpu(handle).name.encode()[: length.value - 1]
        return NVML_SUCCESS

    def nvmlDeviceGetMemoryInfo(self, handle: ctypes.c_void_p, memory: Any) -> int:
        memory.contents.total = self._gpu(handle).memory_bytes
        return NVML_SUCCESS

    def nvmlDeviceGetPciInfo_v3(self, handle: ctypes.c_void_p, pci: Any) -> int:
        pci.contents.busId = self._gpu(handle).bus_id.encode()
        return NVML_SUCCESS
