"""The analytic prior of the cost model: latency from MACs, layers and CPU features, memory from sizes."""

from __future__ import annotations

from dataclasses import dataclass

from edgefleet.common.amdahl import amdahl_speedup
from edgefleet.orchestrator.costmodel.features import DeviceFeatures, VariantFeatures

# NOTE: the constants below are rough priors for a CPU core running onnxruntime 1.32 or LiteRT 2.3
# with XNNPACK; measurements correct them per hardware class (see predictor.CalibratedPredictor).

# Effective fp32 multiply-accumulates per second of one core in convolution and matrix kernels.
FP32_MACS_PER_CORE_S = {
    "avx512": 24e9,
    "avx2": 16e9,
    "x86_64": 6e9,
    "aarch64": 6e9,
    "other": 2e9,
}
# Depthwise convolutions do little work per loaded byte and reach this share of the dense rate.
DEPTHWISE_EFFICIENCY = 0.25
# Speed of int8 kernels relative to fp32. Without integer dot-product instructions int8 is not
# assumed to be faster: onnxruntime and XNNPACK then widen int8 to int16, and the quantize and
# requantize steps cost extra, so the prior is slightly below 1 until measurements say otherwise.
INT8_SPEEDUP_WITH_DOT = 2.0
INT8_SPEEDUP_WITHOUT_DOT = 0.9
# fp16 weights run as fp32 unless the CPU has native half-precision arithmetic.
FP16_SPEEDUP_NATIVE = 1.5
FP16_SPEEDUP_EMULATED = 0.9
# Fixed cost of one call (binding, input copy) and of each operator (dispatch, memory traffic), in seconds
# on a core of the REFERENCE_RATE. Other cores take them in proportion to their fp32 rate, so the prior
# stays a per-variant cost times a per-device speed, which is the structure the calibration fits.
REFERENCE_RATE = 16e9
CALL_OVERHEAD_S = {"onnxruntime": 40e-6, "litert": 20e-6}
LAYER_OVERHEAD_S = {"onnxruntime": 5e-6, "litert": 4e-6}
# Threads: the latency at n threads is the 1-thread latency t1 times (1 - P) + P / n (Amdahl's law).
# Each layer adds SYNC_PER_LAYER_S (on a core of the REFERENCE_RATE) for handing work to the other
# threads and waiting for them. So small layers gain little from threads, and tiny models lose.
PARALLEL_FRACTION = 0.95
SYNC_PER_LAYER_S = 4e-6
# Tail of the latency distribution on an otherwise idle device.
P95_OVER_P50 = 1.10
# Memory: the runtime's own footprint, copies of the weights (onnxruntime keeps the file's
# initializers and prepacked kernels), and the activation arena.
RUNTIME_MEMORY_BYTES = {"onnxruntime": 24 * 1024 * 1024, "litert": 8 * 1024 * 1024}
WEIGHT_COPIES = {"onnxruntime": 2.0, "litert": 1.3}
ACTIVATION_COPIES = 2.0


@dataclass(frozen=True)
class AnalyticEstimate:
    """The analytic latency of one variant on one device at one thread count."""

    p50_s: float
    single_s: float  # The p50 at 1 thread: fixed_s + compute_s.
    fixed_s: float  # Call and per-layer overhead at 1 thread.
    compute_s: float  # Single-thread kernel time.
    thread_ratio: float  # p50_s / single_s.


def fp32_rate(device: DeviceFeatures) -> float:
    """Return the prior fp32 MAC rate of one core of the device, in MACs per second."""
    if device.architecture in ("x86_64", "amd64", "AMD64"):
        if device.avx512:
            return FP32_MACS_PER_CORE_S["avx512"]
        if device.avx2:
            return FP32_MACS_PER_CORE_S["avx2"]
        return FP32_MACS_PER_CORE_S["x86_64"]
    if device.architecture in ("aarch64", "arm64"):
        return FP32_MACS_PER_CORE_S["aarch64"]
    return FP32_MACS_PER_CORE_S["other"]


def precision_speedup(precision: str, device: DeviceFeatures) -> float:
    """Return the prior speed of a precision's kernels relative to fp32 on the device."""
    if precision == "int8":
        return INT8_SPEEDUP_WITH_DOT if device.int8_dot else INT8_SPEEDUP_WITHOUT_DOT
    if precision == "fp16":
        return FP16_SPEEDUP_NATIVE if device.fp16_native else FP16_SPEEDUP_EMULATED
    return 1.0


def sync_per_layer_s(device: DeviceFeatures) -> float:
    """Return the prior cost of one layer's hand-over to other threads on the device, in seconds."""
    return SYNC_PER_LAYER_S * REFERENCE_RATE / fp32_rate(device)


def effective_threads(threads: int, device: DeviceFeatures) -> float:
    """Return the threads that run in parallel: threads beyond the usable cores add no speed."""
    return max(1.0, min(float(threads), device.usable_cores))


def thread_ratio(layers: int, single_s: float, threads: int, device: DeviceFeatures) -> float:
    """Return the prior ratio of the p50 at threads threads to the p50 single_s at 1 thread.

    The ratio is 1 at one effective thread, else Amdahl's (1 - P) + P / n plus the per-layer
    synchronisation cost relative to single_s.
    """
    effective = effective_threads(threads, device)
    if effective <= 1.0:
        return 1.0
    return 1.0 / amdahl_speedup(PARALLEL_FRACTION, effective) + layers * sync_per_layer_s(device) / single_s


def estimate(variant: VariantFeatures, device: DeviceFeatures, threads: int) -> AnalyticEstimate:
    """Return the analytic p50 of variant on device with threads intra-op threads.

    Raises ValueError for threads below 1.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    rate = fp32_rate(device) * precision_speedup(variant.precision, device)
    other_macs = max(0, variant.macs - variant.dense_macs - variant.depthwise_macs)
    compute = (variant.dense_macs + other_macs) / rate + variant.depthwise_macs / (rate * DEPTHWISE_EFFICIENCY)
    overhead = CALL_OVERHEAD_S[variant.runtime] + LAYER_OVERHEAD_S[variant.runtime] * variant.layers
    fixed = overhead * REFERENCE_RATE / fp32_rate(device)
    single = fixed + compute
    ratio = thread_ratio(variant.layers, single, threads, device)
    return AnalyticEstimate(p50_s=single * ratio, single_s=single, fixed_s=fixed, compute_s=compute, thread_ratio=ratio)


def memory_bytes(variant: VariantFeatures) -> int:
    """Return the estimated peak resident memory of a loaded variant, in bytes."""
    weights = variant.size_bytes * WEIGHT_COPIES[variant.runtime]
    activations = variant.peak_activation_bytes * ACTIVATION_COPIES
    return int(RUNTIME_MEMORY_BYTES[variant.runtime] + weights + activations)
