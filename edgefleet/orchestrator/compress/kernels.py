"""Default int8 weight width for the orchestrator's CPU, where onnxruntime builds and gates int8 variants.

onnxruntime's x86 int8 kernels multiply uint8 activations by int8 weights. Without VNNI (AVX512-VNNI
or AVX-VNNI) they use vpmaddubsw, which adds two products into a signed 16-bit lane and saturates
when both are large. With 8-bit weights that happens on real models: on an AVX2-only AMD EPYC,
EfficientNet-Lite0's int8 variant agreed with fp32 on 0.66 of the gate's crops, and with 7-bit
weights (reduce_range) the same job passed its gate. onnxruntime's quantization docs give the same
advice for machines without VNNI.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path

log = logging.getLogger(__name__)

_X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686"})
# /proc/cpuinfo flags of the x86 instructions that sum uint8 x int8 products in 32 bits.
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_weights_saturate(cpuinfo: Path = Path("/proc/cpuinfo"), machine: str | None = None) -> bool:
    """Return whether 8-bit weights can saturate onnxruntime's int8 kernels on this CPU (x86 without VNNI).

    An unreadable cpuinfo on x86 counts as no VNNI, the safe side: 7-bit weights cost little accuracy.
    """
    if (machine or platform.machine()).lower() not in _X86_MACHINES:
        return False
    try:
        text = cpuinfo.read_text()
    except OSError as error:
        log.debug("cannot read %s (%s); assuming an x86 CPU without VNNI", cpuinfo, error)
        return True
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return not _VNNI_FLAGS.intersection(value.split())
    return True


@functools.cache
def default_reduce_range() -> bool:
    """Return the default reduce_range of int8 quantization: true (7-bit weights) where 8-bit weights saturate."""
    saturate = int8_weights_saturate()
    if saturate:
        log.info(
            "this x86 CPU has no VNNI, so int8 variants get 7-bit weights (reduce_range) unless the recipe sets "
            "quantize.reduce_range: onnxruntime's uint8 x int8 kernels here can saturate 16-bit sums of 8-bit weights"
        )
    return saturate
