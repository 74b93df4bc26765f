"""Quantize pretrained EfficientNet-Lite0 to int8 QDQ on real photos and gate it against fp32."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Run from a checkout without `pip install -e .`: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgefleet.demo.assets import ensure_efficientnet_lite0_onnx
from edgefleet.demo.images import Photo, demo_photos, preprocess
from edgefleet.orchestrator.compress.calibration import model_input_spec
from edgefleet.orchestrator.compress.gate import GateResult, evaluate_variant
from edgefleet.orchestrator.compress.quantize import quantize_static_qdq

logger = logging.getLogger(__name__)

TARGETS = {"top1_agreement": 0.99, "size_ratio": 3.5, "speedup_threads_1": 2.0}


def split_photos(photos: Sequence[Photo]) -> tuple[list[Photo], list[Photo]]:
    """Split photos by source, alternating, so no calibration crop comes from an evaluation photo."""
    return list(photos[0::2]), list(photos[1::2])


def augmented_crops(photo: Photo, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Cut count random crops (35-100 % of the shorter side, aspect 3:4 to 4:3), half of them mirrored."""
    image = photo.image
    height, width = image.shape[:2]
    crops = [image]
    while len(crops) < count:
        side = rng.uniform(0.35, 1.0) * min(height, width)
        aspect = rng.uniform(0.75, 4 / 3)
        crop_h = int(min(height, side * np.sqrt(aspect)))
        crop_w = int(min(width, side / np.sqrt(aspect)))
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        crop = image[top:top + crop_h, left:left + crop_w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crops.append(np.ascontiguousarray(crop))
    return crops


def build_inputs(model: Path, photos: Sequence[Photo], per_photo: int, seed: int) -> np.ndarray:
    """Preprocess per_photo crops of each photo into one float32 array with the batch axis first."""
    spec = model_input_spec(model)
    rng = np.random.default_rng(seed)
    batches = [
        preprocess(crop, spec) for photo in photos for crop in augmented_crops(photo, per_photo, rng)
    ]
    return np.concatenate(batches)


def format_table(result: GateResult, ratios: dict[str, float]) -> str:
    """Render the gate's figures for fp32 and int8 as a plain-text table."""
    rows = [("figure", "fp32", "int8", "ratio / target")]
    rows.append(("size (MB)", f"{result.source_size_bytes / 1e6:.2f}", f"{result.size_bytes / 1e6:.2f}",
                 f"{ratios['size_ratio']:.2f}x smaller / >= {TARGETS['size_ratio']}x"))
    for key in result.latency_p50_ms:
        target = f" / >= {TARGETS['speedup_threads_1']}x" if key == "threads=1" else ""
        rows.append((f"p50 {key} (ms)", f"{result.source_latency_p50_ms[key]:.2f}",
                     f"{result.latency_p50_ms[key]:.2f}", f"{result.speedup[key]:.2f}x faster{target}"))
    rows.append(("top-1 agreement", "1.0000", f"{result.accuracy:.4f}",
                 f">= {TARGETS['top1_agreement']}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=Path("efficientnet_int8.json"),
                        help="JSON report path (default: efficientnet_int8.json)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="where to keep the int8 model (default: a temporary directory)")
    parser.add_argument("--calibration-crops", type=int, default=32, help="crops per calibration photo")
    parser.add_argument("--eval-crops", type=int, default=64, help="crops per evaluation photo")
    # docs/compression.md lists what the other activation types and calibration methods measured.
    parser.add_argument("--activation-type", choices=("uint8", "int8"), default="uint8")
    parser.add_argument("--calibration-method", choices=("minmax", "entropy", "percentile"),
                        default="minmax")
    parser.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weights")
    parser.add_argument("--reduce-range", action="store_true", help="7-bit weights (for CPUs without VNNI)")
    parser.add_argument("--no-preprocess", action="store_true", help="skip quant_pre_process")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per model and thread count")
    args = parser.parse_args(argv)
    # onnxruntime's quantizer logs one INFO line per adjusted weight scale on the root logger.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("edgefleet").setLevel(logging.INFO)
    logger.setLevel(logging.INFO)

    source = ensure_efficientnet_lite0_onnx()
    calibration_photos, eval_photos = split_photos(demo_photos())
    logger.info("calibration photos: %s", [p.name for p in calibration_photos])
    logger.info("evaluation photos: %s", [p.name for p in eval_photos])
    calibration = build_inputs(source, calibration_photos, args.calibration_crops, seed=1)
    eval_inputs = build_inputs(source, eval_photos, args.eval_crops, seed=2)

    with tempfile.TemporaryDirectory(prefix="edgefleet-int8-") as scratch:
        model_dir = args.model_dir or Path(scratch)
        candidate = quantize_static_qdq(
            source, model_dir / "efficientnet_lite0.int8.onnx", calibration,
            per_channel=not args.per_tensor, activation_type=args.activation_type,
            calibration_method=args.calibration_method, reduce_range=args.reduce_range,
            preprocess=not args.no_preprocess,
        )
        result = evaluate_variant(candidate, source, eval_inputs, labels=None, max_accuracy_drop=1.0,
                                  threads=(1, 2), repeats=args.repeats, warmup=10)

    ratios = {
        "size_ratio": result.source_size_bytes / result.size_bytes,
        "speedup_threads_1": result.speedup["threads=1"],
        "top1_agreement": float(result.accuracy or 0.0),
    }
    met = {
        "top1_agreement": ratios["top1_agreement"] >= TARGETS["top1_agreement"],
        "size_ratio": ratios["size_ratio"] >= TARGETS["size_ratio"],
        "speedup_threads_1": ratios["speedup_threads_1"] >= TARGETS["speedup_threads_1"],
    }
    print(format_table(result, ratios))
    print(f"gate: {result.status} ({result.reason})")
    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "calibration_photos": [p.name for p in calibration_photos],
        "evaluation_photos": [p.name for p in eval_photos],
        "calibration_samples": int(calibration.shape[0]),
        "evaluation_samples": int(eval_inputs.shape[0]),
        "gate": result.to_dict(),
        "ratios": ratios,
        "targets": TARGETS,
        "targets_met": met,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    missed = [name for name, ok in met.items() if not ok]
    print(f"targets missed: {', '.join(missed)}" if missed else "all targets met")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
