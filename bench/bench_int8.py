"""Benchmark int8 QDQ EfficientNet-Lite0 against fp32: size ratio, p50 speed-up per thread count, agreement."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

# Run from a checkout without `pip install -e .`: make the repository root and examples/ importable.
_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(_ROOT / "examples"))

from efficientnet_int8 import (  # noqa: E402
    agreement_figures,
    build_inputs,
    leading_conv_nodes,
    logit_sqnr_db,
    photo_sources,
    predict,
    split_sources,
)

from edgefleet.demo.assets import ensure_efficientnet_lite0_onnx  # noqa: E402
from edgefleet.orchestrator.compress.gate import evaluate_variant  # noqa: E402
from edgefleet.orchestrator.compress.quantize import quantize_static_qdq  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=100, help="timed runs per model and thread count")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts")
    parser.add_argument("--eval-crops", type=int, default=16, help="crops per evaluation photo")
    parser.add_argument(
        "--weight-rounding",
        choices=("nearest", "adaround"),
        default="nearest",
        help="int8 weight rounding: onnxruntime's nearest, or AdaRound learned on the calibration crops (minutes)",
    )
    args = parser.parse_args(argv)

    source = ensure_efficientnet_lite0_onnx()
    calibration_sources, eval_sources = split_sources(photo_sources())
    imagenet = {s.photo.name for s in eval_sources if s.has_imagenet_class}
    # The example's default settings: 24 jittered crops per calibration photo, bias correction, and the
    # stem and first depthwise convolution kept in fp32.
    calibration, _ = build_inputs(source, calibration_sources, 24, seed=1, jitter=0.1)
    eval_inputs, eval_names = build_inputs(source, eval_sources, args.eval_crops, seed=2)
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as scratch:
        candidate = quantize_static_qdq(
            source,
            Path(scratch) / "int8.onnx",
            calibration,
            bias_correction=True,
            weight_rounding=args.weight_rounding,
            nodes_to_exclude=leading_conv_nodes(source, 2),
        )
        result = evaluate_variant(
            candidate,
            source,
            eval_inputs,
            labels=None,
            max_accuracy_drop=100.0,
            threads=tuple(args.threads),
            repeats=args.repeats,
            warmup=10,
        )
        candidate_logits = predict(candidate, eval_inputs)
    source_logits = predict(source, eval_inputs)
    figures = agreement_figures(source_logits, candidate_logits, eval_names, imagenet)
    print(f"size_ratio {result.source_size_bytes / result.size_bytes:.2f}")
    for key, speedup in result.speedup.items():
        print(
            f"speedup_{key.replace('=', '_')} {speedup:.2f} "
            f"(fp32 {result.source_latency_p50_ms[key]:.2f} ms, int8 {result.latency_p50_ms[key]:.2f} ms)"
        )
    print(f"top1_agreement {result.accuracy:.4f} on {eval_inputs.shape[0]} held-out crops")
    print(
        f"top1_agreement_imagenet_class_photos {figures['imagenet_class_photos']:.4f} "
        f"on {sum(name in imagenet for name in eval_names)} crops"
    )
    print(f"logit_sqnr_db {logit_sqnr_db(source_logits, candidate_logits):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
