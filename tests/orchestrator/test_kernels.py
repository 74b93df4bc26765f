"""Which CPUs get 7-bit int8 weights by default: x86 without VNNI, read from cpuinfo files."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.orchestrator.compress.kernels import int8_weights_saturate

AVX2_ONLY = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
AVX512_VNNI = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n"
AVX_VNNI = "processor\t: 0\nflags\t\t: fpu avx2 avx_vnni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\n"


@pytest.mark.parametrize(
    ("cpuinfo", "machine", "saturate"),
    [
        (AVX2_ONLY, "x86_64", True),
        (AVX512_VNNI, "x86_64", False),
        (AVX_VNNI, "AMD64", False),
        (ARM, "aarch64", False),
    ],
)
def test_saturating_cpus(tmp_path: Path, cpuinfo: str, machine: str, saturate: bool) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)

    assert int8_weights_saturate(path, machine) is saturate


def test_unreadable_cpuinfo_x86(tmp_path: Path) -> None:
    assert int8_weights_saturate(tmp_path / "missing", "x86_64") is True
