"""Compress a handwritten-digits CNN three ways (int8, pruning, distillation) and gate every variant."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from edgefleet.orchestrator.compress.digits import DigitsConfig, format_table, format_targets, run_digits


def main() -> int:
    """Run the example, print the table and the target checks; return 1 if a target was missed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", type=Path, default=Path("build/digits"),
                        help="folder for the ONNX variants and digits_results.json (default: build/digits)")
    parser.add_argument("--quick", action="store_true",
                        help="train for a few epochs only, to check that the pipeline runs")
    parser.add_argument("--verbose", action="store_true", help="log every training epoch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = DigitsConfig()
    if args.quick:
        config = DigitsConfig(teacher_epochs=3, finetune_epochs=2, student_epochs=3, latency_repeats=5)
    result = run_digits(config, args.output_dir)
    print(format_table(result))
    print()
    print(format_targets(result))
    print(f"\n{result.seconds:.0f} s; results in {args.output_dir / 'digits_results.json'}")
    return 0 if all(check.met for check in result.targets) else 1


if __name__ == "__main__":
    sys.exit(main())
