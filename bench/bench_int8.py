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

from efficientnet_int8 import build_inputs, split_photos  # noqa: E402

from edgefleet.demo.assets import ensure_efficientnet_lite0_onnx  # noqa: E402
from edgefleet.demo.images import demo_photos  # noqa: E402
from edgefleet.orchestrator.compress.gate import evaluate_variant  # noqa: E402
from edgefleet.orchestrator.compress.quantize import quantize_static_qdq  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=100, help="timed runs per model and thread count")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts")
    args = parser.parse_args(argv)

    source = ensure_efficientnet_lite0_onnx()
    calibration_photos, eval_photos = split_photos(demo_photos())
    calibration = build_inputs(source, calibration_photos, 32, seed=1)
    eval_inputs = build_inputs(source, eval_photos, 16, seed=2)
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as scratch:
        candidate = quantize_static_qdq(
            source, Path(scratch) / "int8.onnx", calibration
        )
        result = evaluate_variant(candidate, source, eval_inputs, labels=None, max_accuracy_drop=100.0,
                                  threads=tuple(args.threads), repeats=args.repeats, warmup=10)
    print(f"size_ratio {result.source_size_bytes / result.size_bytes:.2f}")
    for key, speedup in result.speedup.items():
        print(f"speedup_{key.replace('=', '_')} {speedup:.2f} "
              f"(fp32 {result.source_latency_p50_ms[key]:.2f} ms, int8 {result.latency_p50_ms[key]:.2f} ms)")
    print(f"top1_agreement {result.accuracy:.4f} on {eval_inputs.shape[0]} held-out crops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
