"""Time select_for_fleet on a synthetic fleet: devices x variants, with a calibrated predictor."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

# Run from a checkout without `pip install -e .`: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_line
from edgefleet.common.hardware import HardwareProfile, RuntimeInfo, hardware_class_of
from edgefleet.common.models import ModelMetadata, TensorSpec
from edgefleet.orchestrator.costmodel.predictor import CalibratedPredictor, Measurement
from edgefleet.orchestrator.domain import Device, Variant
from edgefleet.orchestrator.selection import select_for_fleet

NOW = datetime(2026, 1, 1, tzinfo=UTC)
TARGET_S = 1.0
# Device shapes of the synthetic fleet: (architecture, CPU features, usable cores, memory GiB, runtimes).
SHAPES = (
    ("aarch64", ("neon", "dotprod"), 4.0, 8, ("onnxruntime", "litert")),
    ("aarch64", ("neon",), 4.0, 4, ("litert",)),
    ("aarch64", ("neon", "dotprod", "fp16"), 8.0, 16, ("onnxruntime", "litert")),
    ("armv7l", ("neon",), 2.0, 1, ("litert",)),
    ("x86_64", ("avx2", "fma"), 2.0, 4, ("onnxruntime",)),
    ("x86_64", ("avx2", "avx512f", "avx512_vnni"), 8.0, 32, ("onnxruntime", "litert")),
)


def fleet(count: int, classes: int) -> list[Device]:
    """Return count devices spread over about `classes` hardware classes (shape x core budget)."""
    profiles = []
    for i in range(classes):
        arch, features, cores, memory_gib, runtimes = SHAPES[i % len(SHAPES)]
        profile = HardwareProfile(
            cpu_model=f"cpu-{i}",
            architecture=arch,
            logical_cores=int(cores),
            usable_cores=cores,
            cpu_features=features,
            memory_total_bytes=memory_gib << 30,
            memory_available_bytes=memory_gib << 29,
            disk_free_bytes=10 << 30,
            runtimes=tuple(RuntimeInfo(name, "1.0") for name in runtimes),
        )
        profiles.append(dataclasses.replace(profile, hardware_class=hardware_class_of(profile)))
    return [
        Device(
            device_id=f"dev-{i:05d}",
            instance_key_hash="0" * 64,
            hardware=profiles[i % classes],
            labels={},
            agent_version="0.1.0",
            registered_at=NOW,
            last_seen=NOW,
            connected=True,
            profile_revisions=1,
            desired_generation=0,
            reported_generation=0,
        )
        for i in range(count)
    ]


def variants(count: int) -> list[Variant]:
    result = []
    for i in range(count):
        fmt = "onnx" if i % 2 == 0 else "tflite"
        precision = ("fp32", "int8", "fp16")[i % 3]
        macs = 20_000_000 * (1 + i)
        metadata = ModelMetadata(
            format=fmt,
            inputs=(TensorSpec("image", "float32", (1, 3, 224, 224)),),
            outputs=(TensorSpec("logits", "float32", (1, 1000)),),
            opset=17,
            parameters=macs // 50,
            macs=macs,
            peak_activation_bytes=2_000_000,
            macs_by_op_type={"Conv": macs},
            precision=precision,
            layers=40 + i,
        )
        result.append(
            Variant(
                variant_id=f"v{i:02d}",
                model_name="net",
                model_version="1",
                kind="source" if i == 0 else f"kind-{i}",
                format=fmt,
                precision=precision,
                digest="",
                size_bytes=macs // 10,
                metadata=metadata,
                accuracy=0.60 + i / 100,
                accuracy_metric="top1",
            )
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--variants", type=int, default=20)
    parser.add_argument("--classes", type=int, default=60, help="distinct hardware classes in the fleet")
    parser.add_argument("--budget-ms", type=float, default=50.0)
    args = parser.parse_args(argv)

    print(f"machine: {machine_line()}")
    devices = fleet(args.devices, args.classes)
    catalog = variants(args.variants)
    profiles = {d.hardware.hardware_class: d.hardware for d in devices}
    # Two benchmarks per class and variant pair on a third of the classes, so the fit has work to do.
    measurements = [
        Measurement(
            v.variant_id, hardware_class, threads, 5.0 * (i + 1) / threads, 6.0 * (i + 1) / threads, 30, "benchmark"
        )
        for i, v in enumerate(catalog)
        for hardware_class in list(profiles)[::3]
        for threads in (1, 2)
    ]

    started = time.perf_counter()
    predictor = CalibratedPredictor(measurements, profiles=profiles, variants={v.variant_id: v for v in catalog})
    fitted = time.perf_counter() - started
    started = time.perf_counter()
    selections = select_for_fleet(devices, catalog, budget_ms=args.budget_ms, predictor=predictor)
    elapsed = time.perf_counter() - started

    chosen = sum(1 for s in selections.values() if s.chosen is not None)
    print(
        f"calibration on {len(measurements)} measurements: {fitted * 1000:.0f} ms "
        f"({len(profiles)} hardware classes, {len(catalog)} variants)"
    )
    print(
        f"select_for_fleet: {len(devices)} devices x {len(catalog)} variants in {elapsed * 1000:.0f} ms "
        f"(target <= {TARGET_S * 1000:.0f} ms); {chosen} devices got a variant"
    )
    return 0 if elapsed <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
