"""Compare onnxruntime latency of a CNN pruned to SIMD-friendly and to unrounded channel widths."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgefleet.orchestrator.compress.digits import DigitsTeacher, export_onnx
from edgefleet.orchestrator.compress.gate import evaluate_variant
from edgefleet.orchestrator.compress.prune import PruneReport, prune_model


def main() -> None:
    """Prune the digits teacher at each round_to, then time every variant against the unpruned model."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of MACs to remove (default 0.5)")
    parser.add_argument("--size", type=int, default=8, help="input height and width in pixels (default 8)")
    parser.add_argument("--batch", type=int, default=32, help="samples per timed run (default 32)")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per model and thread count")
    parser.add_argument("--round-to", type=int, nargs="+", default=[1, 8, 16],
                        help="channel rounding to compare; 1 means unrounded (default 1 8 16)")
    args = parser.parse_args()

    torch.manual_seed(0)
    teacher = DigitsTeacher().eval()  # Random weights: latency does not depend on their values.
    example = torch.randn(args.batch, 1, args.size, args.size)
    inputs = example.numpy().astype(np.float32)
    print(f"digits teacher, input {args.size}x{args.size}, batch {args.batch}, ratio {args.ratio}, "
          f"onnxruntime p50 of {args.repeats} interleaved runs")
    print(f"{'round_to':>8} {'widths':<28} {'MAC ratio':>9} {'1t ms':>8} {'speed-up 1t':>11} {'2t ms':>8} "
          f"{'speed-up 2t':>11} {'speed-up/MAC':>12}")
    with tempfile.TemporaryDirectory() as folder:
        source = export_onnx(teacher, Path(folder) / "teacher.onnx", example)
        for round_to in args.round_to:
            pruned, report = prune_model(teacher, args.ratio, round_to=round_to, example_input=example[:1])
            candidate = export_onnx(pruned, Path(folder) / f"pruned-{round_to}.onnx", example)
            gate = evaluate_variant(candidate, source, inputs, labels=None, max_accuracy_drop=100.0,
                                    threads=(1, 2), latency_samples=args.batch, repeats=args.repeats)
            mac_ratio = report.macs_before / report.macs_after
            one, two = gate.speedup["threads=1"], gate.speedup["threads=2"]
            print(f"{round_to:>8} {_widths(report):<28} {mac_ratio:>9.2f} {gate.latency_p50_ms['threads=1']:>8.3f} "
                  f"{one:>11.2f} {gate.latency_p50_ms['threads=2']:>8.3f} {two:>11.2f} {one / mac_ratio:>12.2f}")
        print(f"unpruned p50: 1t {gate.source_latency_p50_ms['threads=1']:.3f} ms, "
              f"2t {gate.source_latency_p50_ms['threads=2']:.3f} ms")


def _widths(report: PruneReport) -> str:
    return "/".join(str(group.channels_after) for group in report.groups if not group.reason_kept)


if __name__ == "__main__":
    main()
