"""Worked compression example on scikit-learn's handwritten digits: int8, pruning and distillation."""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from edgefleet.orchestrator.compress.distill import TensorPair, distill, evaluate_accuracy, train_classifier
from edgefleet.orchestrator.compress.gate import GateResult, evaluate_variant
from edgefleet.orchestrator.compress.prune import count_macs, fine_tune, prune_model
from edgefleet.orchestrator.compress.quantize import quantize_static_qdq
from edgefleet.orchestrator.compress.students import build_student_with_choice

logger = logging.getLogger(__name__)

NUM_CLASSES = 10
PIXEL_MAX = 16.0  # load_digits stores gray levels 0..16.


@dataclass(frozen=True)
class DigitsConfig:
    """Settings of the digits example; the defaults are the documented run."""

    image_size: int = 8  # Inputs are upsampled (bilinear) from 8x8 to this size.
    test_size: float = 0.25
    split_seed: int = 0  # random_state of the stratified train/test split.
    seed: int = 0
    batch_size: int = 64
    lr: float = 3e-3
    teacher_epochs: int = 15
    prune_ratio: float = 0.5  # Fraction of the teacher's MACs to remove.
    round_to: int = 16
    finetune_epochs: int = 10
    student_family: str = "inverted_residual"
    student_mac_fraction: float = 0.125  # Student MAC budget as a fraction of the teacher's MACs.
    student_epochs: int = 30
    temperature: float = 4.0
    alpha: float = 0.7
    calibration_samples: int = 256
    latency_batch: int = 32  # Samples per timed run, so compute outweighs per-call overhead.
    latency_repeats: int = 30
    threads: tuple[int, ...] = (1, 2)


@dataclass(frozen=True)
class VariantRow:
    """One compressed variant as the gate measured it against its source."""

    variant: str
    source: str
    path: str
    torch_accuracy: float | None
    gate: dict[str, Any]  # GateResult.to_dict().

    @property
    def result(self) -> GateResult:
        return GateResult(**self.gate)


@dataclass(frozen=True)
class TargetCheck:
    """A target of the example with the measured figure and whether it was met."""

    name: str
    measured: float
    required: float
    met: bool


@dataclass(frozen=True)
class DigitsResult:
    """Everything the example measured."""

    config: DigitsConfig
    teacher_accuracy: float
    teacher_macs: int
    teacher_size_bytes: int
    teacher_latency_p50_ms: dict[str, float]
    rows: tuple[VariantRow, ...]
    targets: tuple[TargetCheck, ...]
    prune_widths: dict[str, tuple[int, int]] = field(default_factory=dict)
    student_shape: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-serializable dict."""
        return asdict(self)


class DigitsTeacher(nn.Module):
    """A small CNN with a residual block and a depthwise separable stage: widths 32, 64, 128."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        first, second, third = widths
        self.conv1 = nn.Conv2d(1, first, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(first)
        self.conv2 = nn.Conv2d(first, second, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(second)
        self.res1 = nn.Conv2d(second, second, 3, padding=1, bias=False)
        self.res_bn1 = nn.BatchNorm2d(second)
        self.res2 = nn.Conv2d(second, second, 3, padding=1, bias=False)
        self.res_bn2 = nn.BatchNorm2d(second)
        self.depthwise = nn.Conv2d(second, second, 3, padding=1, groups=second, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(second)
        self.pointwise = nn.Conv2d(second, third, 1, bias=False)
        self.pointwise_bn = nn.BatchNorm2d(third)
        self.conv3 = nn.Conv2d(third, third, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(third)
        self.fc = nn.Linear(third, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        residual = F.relu(self.res_bn1(self.res1(x)))
        x = F.relu(x + self.res_bn2(self.res2(residual)))
        x = F.relu(self.depthwise_bn(self.depthwise(x)))
        x = F.relu(self.pointwise_bn(self.pointwise(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


def load_digits_split(config: DigitsConfig) -> tuple[TensorPair, TensorPair]:
    """Load the 1797 digits, scale pixels to [0, 1], upsample to config.image_size and split.

    The split is stratified by class with random_state config.split_seed, so every run sees the same
    test set. Returns ((train inputs, train labels), (test inputs, test labels)); inputs are float32
    (N, 1, image_size, image_size) and labels int64.
    """
    digits = load_digits()
    images = digits.images.astype(np.float32) / PIXEL_MAX
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=config.test_size, random_state=config.split_seed, stratify=labels)
    return ((_to_tensor(train_x, config.image_size), torch.from_numpy(train_y)),
            (_to_tensor(test_x, config.image_size), torch.from_numpy(test_y)))


def _to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(images))[:, None]
    if size != tensor.shape[-1]:
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    return tensor.contiguous()


def shift_augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift every image of the batch by up to one pixel (8x8 scale) in x and y, padding with zeros."""
    limit = max(1, batch.shape[-1] // 8)
    padded = F.pad(batch, (limit, limit, limit, limit))
    offsets = torch.randint(0, 2 * limit + 1, (len(batch), 2), generator=generator)
    size = batch.shape[-1]
    return torch.stack([padded[i, :, dy:dy + size, dx:dx + size]
                        for i, (dy, dx) in enumerate(offsets.tolist())])


def export_onnx(model: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """Export `model` in eval mode to ONNX with a dynamic batch axis (input "input", output "logits").

    Uses the TorchScript-based exporter, which handles these small CNNs in well under a second, and
    silences its DeprecationWarning. Returns `path`.
    """
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example[:1],), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def run_digits(config: DigitsConfig, output_dir: Path) -> DigitsResult:
    """Train the teacher, build every compressed variant, gate each one and check the targets.

    Writes the ONNX files and `digits_results.json` to `output_dir`. Returns the measurements.
    """
    started = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    train, test = load_digits_split(config)
    test_x, test_y = test[0].numpy(), test[1].numpy()
    example = train[0][:1]

    torch.manual_seed(config.seed)
    teacher = DigitsTeacher()
    train_classifier(teacher, train, epochs=config.teacher_epochs, lr=config.lr, batch_size=config.batch_size,
                     seed=config.seed, augment=shift_augment)
    teacher_accuracy = evaluate_accuracy(teacher, *test)
    teacher_macs = count_macs(teacher, example)
    teacher_path = export_onnx(teacher, output_dir / "teacher.onnx", example)
    logger.info("teacher: accuracy %.4f, %d MACs", teacher_accuracy, teacher_macs)

    rows: list[VariantRow] = []

    def gate(name: str, candidate: Path, source: Path, source_name: str, max_drop: float,
             torch_accuracy: float | None) -> GateResult:
        result = evaluate_variant(candidate, source, test_x, labels=test_y, max_accuracy_drop=max_drop,
                                  threads=config.threads, latency_samples=config.latency_batch,
                                  repeats=config.latency_repeats)
        rows.append(VariantRow(name, source_name, str(candidate), torch_accuracy, result.to_dict()))
        return result

    def quantize(path: Path) -> Path:
        calibration = train[0][:config.calibration_samples].numpy()
        return quantize_static_qdq(path, path.with_suffix(".int8.onnx"), calibration)

    # The teacher against itself gives its own latency on the same footing as the variants.
    teacher_row = evaluate_variant(teacher_path, teacher_path, test_x, labels=test_y, max_accuracy_drop=0.0,
                                   threads=config.threads, latency_samples=config.latency_batch,
                                   repeats=config.latency_repeats)
    int8 = gate("teacher-int8", quantize(teacher_path), teacher_path, "teacher", 0.5, None)

    pruned, report = prune_model(teacher, config.prune_ratio, round_to=config.round_to, example_input=example)
    fine_tune(pruned, train, epochs=config.finetune_epochs, lr=config.lr, teacher=teacher,
              temperature=config.temperature, alpha=config.alpha, batch_size=config.batch_size,
              seed=config.seed, augment=shift_augment)
    pruned_path = export_onnx(pruned, output_dir / "pruned.onnx", example)
    pruned_result = gate("pruned", pruned_path, teacher_path, "teacher", 1.0, evaluate_accuracy(pruned, *test))

    budget = int(teacher_macs * config.student_mac_fraction)
    input_shape = (1, config.image_size, config.image_size)
    students: dict[str, GateResult] = {}
    choice = None
    for name, alpha in (("student-distilled", config.alpha), ("student-plain", 0.0)):
        torch.manual_seed(config.seed)  # Both students start from the same initial weights.
        student, choice = build_student_with_choice(config.student_family, budget, input_shape, NUM_CLASSES)
        distill(teacher if alpha > 0 else None, student, train, temperature=config.temperature, alpha=alpha,
                epochs=config.student_epochs, lr=config.lr, batch_size=config.batch_size, seed=config.seed,
                augment=shift_augment)
        student_path = export_onnx(student, output_dir / f"{name}.onnx", example)
        students[name] = gate(name, student_path, teacher_path, "teacher", 1.5, evaluate_accuracy(student, *test))
        gate(f"{name}-int8", quantize(student_path), student_path, name, 0.5, None)

    targets = _check_targets(int8, pruned_result, report.macs_before, report.macs_after, students)
    result = DigitsResult(
        config=config, teacher_accuracy=teacher_accuracy, teacher_macs=teacher_macs,
        teacher_size_bytes=teacher_path.stat().st_size, teacher_latency_p50_ms=teacher_row.latency_p50_ms,
        rows=tuple(rows), targets=targets,
        prune_widths={group.name: (group.channels_before, group.channels_after) for group in report.groups},
        student_shape=asdict(choice) if choice is not None else {},
        seconds=time.perf_counter() - started,
    )
    (output_dir / "digits_results.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _check_targets(int8: GateResult, pruned: GateResult, macs_before: int, macs_after: int,
                   students: dict[str, GateResult]) -> tuple[TargetCheck, ...]:
    def drop(result: GateResult) -> float:
        return (result.source_accuracy or 0.0) * 100 - (result.accuracy or 0.0) * 100

    mac_reduction = macs_before / macs_after
    pruned_speedup = pruned.speedup.get("threads=1", 0.0)
    distilled, plain = students["student-distilled"], students["student-plain"]
    checks = [
        TargetCheck("int8 teacher accuracy drop (points)", drop(int8), 0.5, drop(int8) <= 0.5),
        TargetCheck("pruned accuracy drop (points)", drop(pruned), 1.0, drop(pruned) <= 1.0),
        TargetCheck("pruned speed-up at 1 thread / MAC reduction", pruned_speedup / mac_reduction, 0.8,
                    pruned_speedup >= 0.8 * mac_reduction),
        TargetCheck("distilled minus plain student accuracy (points)",
                    ((distilled.accuracy or 0.0) - (plain.accuracy or 0.0)) * 100, 0.0,
                    (distilled.accuracy or 0.0) > (plain.accuracy or 0.0)),
        TargetCheck("distilled student accuracy drop (points)", drop(distilled), 1.5, drop(distilled) <= 1.5),
    ]
    return tuple(checks)


def format_table(result: DigitsResult) -> str:
    """Format the variants as a Markdown table with the teacher first."""
    threads = result.config.threads
    header = ["variant", "source", "accuracy", "size (KB)", "MACs"]
    header += [f"p50 {count}t (ms)" for count in threads]
    header += [f"speed-up {count}t" for count in threads] + ["status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    teacher = ["teacher", "-", f"{result.teacher_accuracy:.4f}", f"{result.teacher_size_bytes / 1024:.1f}",
               f"{result.teacher_macs:,}"]
    teacher += [f"{result.teacher_latency_p50_ms.get(f'threads={count}', 0.0):.3f}" for count in threads]
    teacher += ["1.00"] * len(threads) + ["source"]
    lines.append("| " + " | ".join(teacher) + " |")
    for row in result.rows:
        gate = row.result
        status = gate.status + (", SLOWER than source" if gate.slower_than_source else "")
        cells = [row.variant, row.source, f"{gate.accuracy or 0.0:.4f}", f"{gate.size_bytes / 1024:.1f}",
                 f"{gate.macs:,}" if gate.macs is not None else "n/a"]
        cells += [f"{gate.latency_p50_ms.get(f'threads={count}', 0.0):.3f}" for count in threads]
        cells += [f"{gate.speedup.get(f'threads={count}', 0.0):.2f}" for count in threads] + [status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_targets(result: DigitsResult) -> str:
    """Format the target checks, one line each."""
    return "\n".join(f"{'met   ' if check.met else 'MISSED'} {check.name}: {check.measured:.3f} "
                     f"(target {check.required:g})" for check in result.targets)
