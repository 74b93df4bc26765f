"""Helpers shared by the benchmarks: machine description, process memory, limits and signal handling."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import FrameType

import psutil

MiB = 1024 * 1024


def machine_line() -> str:
    """Return one line naming the CPU, the usable cores, the memory and the Python version."""
    cpu_model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0))
    memory_gib = psutil.virtual_memory().total / 2**30
    return (
        f"{cpu_model}, {usable} usable cores of {os.cpu_count()}, {memory_gib:.1f} GiB, "
        f"Python {platform.python_version()} on {platform.system()} {platform.release()}"
    )


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit and return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        # An unlimited hard limit still needs a finite soft one; 1 << 20 is the kernel's usual nr_open.
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


@dataclass(frozen=True)
class Memory:
    """Memory of one process in bytes. USS is the memory that only this process maps."""

    rss: int
    uss: int


def memory_of(pid: int) -> Memory:
    """Return the RSS and USS of a process; raise psutil.NoSuchProcess when it has exited."""
    info = psutil.Process(pid).memory_full_info()
    return Memory(rss=info.rss, uss=info.uss)


def rss_of(pid: int) -> int:
    """Return the resident set size of a process in bytes; raise psutil.NoSuchProcess when it has exited."""
    return int(psutil.Process(pid).memory_info().rss)


def mib(value: float) -> str:
    """Format a byte count in MiB with one decimal."""
    return f"{value / MiB:.1f}"


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt inside the block, so one cleanup path handles both."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interleaved_samples(calls: Mapping[str, Callable[[], object]], warmup: int, runs: int) -> dict[str, list[int]]:
    """Time each call runs times, rotating their order every round so drift hits all calls alike.

    Returns each call's durations in nanoseconds, after warmup untimed rounds.
    """
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    samples: dict[str, list[int]] = {name: [] for name in names}
    for round_index in range(runs):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            call = calls[name]
            start = time.perf_counter_ns()
            call()
            samples[name].append(time.perf_counter_ns() - start)
    return samples
