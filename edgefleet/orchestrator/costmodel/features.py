"""Features of a device and a model variant that the cost model predicts latency and memory from."""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgefleet.common.hardware import HardwareProfile, hardware_class_of
from edgefleet.common.models import ModelMetadata

# The runtime that executes each model format.
FORMAT_RUNTIMES = {"onnx": "onnxruntime", "tflite": "litert"}
# CPU features with integer dot-product instructions that make int8 kernels faster than fp32.
INT8_DOT_FEATURES = frozenset({"avx512_vnni", "avx_vnni", "amx", "amx_int8", "dotprod", "i8mm"})
# CPU features with native half-precision arithmetic.
FP16_FEATURES = frozenset({"fp16", "asimdhp", "avx512_fp16"})
# Operator types whose MACs run in convolution or matrix kernels (ONNX and TFLite names).
_COMPUTE_OPS = frozenset(
    {
        "Conv",
        "ConvInteger",
        "QLinearConv",
        "ConvTranspose",
        "MatMul",
        "MatMulInteger",
        "QLinearMatMul",
        "Gemm",
        "CONV_2D",
        "CONV_3D",
        "TRANSPOSE_CONV",
        "FULLY_CONNECTED",
        "BATCH_MATMUL",
    }
)
# Operator types whose MACs run in depthwise kernels, which reach a lower share of peak throughput.
_DEPTHWISE_OPS = frozenset({"DEPTHWISE_CONV_2D"})
# ONNX quantize and dequantize nodes are fused into their neighbours by onnxruntime, so they are not layers.
_QDQ_LAYER_SHARE = 0.5


@dataclass(frozen=True)
class VariantFeatures:
    """What the cost model reads from a variant's graph."""

    format: str
    runtime: str
    precision: str
    macs: int  # Multiply-accumulates of one inference.
    dense_macs: int  # MACs in convolution and matrix kernels.
    depthwise_macs: int
    layers: int  # Operators after the runtime's fusions, estimated.
    parameters: int
    peak_activation_bytes: int
    size_bytes: int


@dataclass(frozen=True)
class DeviceFeatures:
    """What the cost model reads from a device's hardware profile."""

    hardware_class: str
    architecture: str
    usable_cores: float
    max_threads: int  # Thread budget: the usable cores rounded down, at least 1.
    int8_dot: bool  # The CPU has integer dot-product instructions (VNNI, AMX, dotprod, i8mm).
    fp16_native: bool
    avx512: bool
    avx2: bool
    runtimes: frozenset[str]
    memory_bytes: int


def variant_features(metadata: ModelMetadata, size_bytes: int) -> VariantFeatures:
    """Return the cost features of a model from its metadata and file size.

    ONNX graphs with quantize/dequantize pairs count half their nodes as layers, because onnxruntime
    folds those pairs into quantized kernels. Raises ValueError for an unknown format.
    """
    runtime = FORMAT_RUNTIMES.get(metadata.format)
    if runtime is None:
        raise ValueError(f"unknown model format {metadata.format!r}; expected one of {sorted(FORMAT_RUNTIMES)}")
    by_type = metadata.macs_by_op_type
    depthwise = sum(macs for op, macs in by_type.items() if op in _DEPTHWISE_OPS)
    dense = sum(macs for op, macs in by_type.items() if op in _COMPUTE_OPS)
    layers = metadata.layers
    if metadata.format == "onnx" and metadata.precision == "int8":
        layers = max(1, math.ceil(layers * _QDQ_LAYER_SHARE))
    return VariantFeatures(
        format=metadata.format,
        runtime=runtime,
        precision=metadata.precision,
        macs=max(metadata.macs, dense + depthwise),
        dense_macs=dense,
        depthwise_macs=depthwise,
        layers=max(1, layers),
        parameters=metadata.parameters,
        peak_activation_bytes=metadata.peak_activation_bytes,
        size_bytes=size_bytes,
    )


def device_features(profile: HardwareProfile) -> DeviceFeatures:
    """Return the cost features of a device; the hardware class is derived when the profile lacks one."""
    features = {name.lower() for name in profile.cpu_features}
    return DeviceFeatures(
        hardware_class=profile.hardware_class or hardware_class_of(profile),
        architecture=profile.architecture,
        usable_cores=profile.usable_cores,
        max_threads=max(1, math.floor(profile.usable_cores)),
        int8_dot=bool(features & INT8_DOT_FEATURES),
        fp16_native=bool(features & FP16_FEATURES),
        avx512=any(name.startswith("avx512") for name in features),
        avx2="avx2" in features,
        runtimes=frozenset(runtime.name for runtime in profile.runtimes),
        memory_bytes=profile.memory_total_bytes,
    )
