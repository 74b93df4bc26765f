"""Distillation loss and training, MAC-budgeted students, and a short end-to-end digits run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgefleet.orchestrator.compress.digits import (
    DigitsConfig,
    DigitsResult,
    format_table,
    load_digits_split,
    run_digits,
)
from edgefleet.orchestrator.compress.distill import (
    TrainingHistory,
    distill,
    distillation_loss,
    evaluate_accuracy,
    train_classifier,
)
from edgefleet.orchestrator.compress.prune import count_macs
from edgefleet.orchestrator.compress.students import STUDENT_FAMILIES, build_student, build_student_with_choice

DIGITS_SHAPE = (1, 8, 8)


def logits(seed: int) -> torch.Tensor:
    return torch.randn(8, 10, generator=torch.Generator().manual_seed(seed))


def labels() -> torch.Tensor:
    return torch.arange(8) % 10


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


@pytest.fixture(scope="module")
def digits_subset() -> tuple[torch.Tensor, torch.Tensor]:
    (inputs, targets), _ = load_digits_split(DigitsConfig())
    return inputs[:256], targets[:256]


def test_loss_alpha_zero_is_cross_entropy() -> None:
    loss = distillation_loss(logits(1), logits(2), labels(), temperature=4.0, alpha=0.0)
    assert torch.allclose(loss, F.cross_entropy(logits(1), labels()))


def test_loss_alpha_one_is_scaled_kl() -> None:
    temperature = 3.0
    loss = distillation_loss(logits(1), logits(2), labels(), temperature=temperature, alpha=1.0)
    kl = F.kl_div(
        F.log_softmax(logits(1) / temperature, dim=1), F.softmax(logits(2) / temperature, dim=1), reduction="batchmean"
    )
    assert torch.allclose(loss, temperature**2 * kl)


def test_loss_zero_for_identical_logits() -> None:
    loss = distillation_loss(logits(1), logits(1), labels(), temperature=4.0, alpha=1.0)
    assert abs(float(loss)) < 1e-6


@pytest.fixture(scope="module")
def teacher(digits_subset: tuple[torch.Tensor, torch.Tensor]) -> nn.Module:
    torch.manual_seed(0)
    model = tiny_cnn()
    train_classifier(model, digits_subset, epochs=5, lr=1e-2, seed=0)
    return model


@pytest.fixture(scope="module")
def distilled(teacher: nn.Module,
              digits_subset: tuple[torch.Tensor, torch.Tensor]) -> tuple[nn.Module, TrainingHistory]:
    torch.manual_seed(1)
    student = tiny_cnn()
    history = distill(teacher, student, digits_subset, temperature=4.0, alpha=0.7, epochs=5, lr=1e-2, seed=0)
    return student, history


def test_distill_loss_decreases(distilled: tuple[nn.Module, TrainingHistory]) -> None:
    _, history = distilled
    losses = history.epoch_losses
    assert losses[-1] < losses[0]


def test_distill_student_learns(
    distilled: tuple[nn.Module, TrainingHistory], digits_subset: tuple[torch.Tensor, torch.Tensor]
) -> None:
    student, _ = distilled
    # Chance is 0.1 on ten balanced classes.
    assert evaluate_accuracy(student, *digits_subset) > 0.5


def test_distill_deterministic(digits_subset: tuple[torch.Tensor, torch.Tensor]) -> None:
    weights = []
    for _ in range(2):
        torch.manual_seed(3)
        model = tiny_cnn()
        train_classifier(model, digits_subset, epochs=1, lr=1e-2, seed=5)
        weights.append(torch.cat([parameter.detach().flatten() for parameter in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("alpha", 1.5, "alpha 1.5 is outside"),
        ("temperature", 0.0, "temperature 0.0 must be positive"),
        ("epochs", 0, "epochs 0 must be at least 1"),
        ("lr", -1.0, "learning rate -1.0 must be positive"),
        ("temperature", float("nan"), "temperature nan must be a finite number"),
        ("temperature", float("inf"), "temperature inf must be a finite number"),
        ("alpha", float("nan"), "alpha nan must be a finite number"),
        ("lr", float("nan"), "learning rate nan must be a finite number"),
    ],
)
def test_distill_rejects_argument(
    digits_subset: tuple[torch.Tensor, torch.Tensor], keyword: str, value: float, message: str
) -> None:
    arguments: dict[str, float] = {"temperature": 4.0, "alpha": 0.5, "epochs": 1, "lr": 1e-3}
    arguments[keyword] = value
    with pytest.raises(ValueError, match=message):
        distill(tiny_cnn(), tiny_cnn(), digits_subset, **arguments)  # type: ignore[arg-type]


def test_distill_requires_teacher(digits_subset: tuple[torch.Tensor, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match=r"alpha 0\.5 needs a teacher"):
        distill(None, tiny_cnn(), digits_subset, temperature=4.0, alpha=0.5, epochs=1, lr=1e-3)


@pytest.mark.parametrize("family", STUDENT_FAMILIES)
@pytest.mark.parametrize("budget", [400_000, 2_000_000])
def test_student_under_budget(family: str, budget: int) -> None:
    student = build_student(family, budget, DIGITS_SHAPE, 10)
    assert count_macs(student, torch.zeros(1, *DIGITS_SHAPE)) <= budget


@pytest.mark.parametrize("family", STUDENT_FAMILIES)
def test_student_close_to_budget(family: str) -> None:
    _, choice = build_student_with_choice(family, 2_000_000, DIGITS_SHAPE, 10)
    assert choice.macs >= 0.5 * 2_000_000


@pytest.mark.parametrize("family", STUDENT_FAMILIES)
def test_student_widths_multiple_of_eight(family: str) -> None:
    student = build_student(family, 2_000_000, DIGITS_SHAPE, 10)
    widths = [
        module.out_channels
        for module in student.modules()
        if isinstance(module, nn.Conv2d) and module.out_channels != 10
    ]  # 10: the fire classifier.
    assert all(width % 8 == 0 for width in widths), widths


@pytest.mark.parametrize("family", STUDENT_FAMILIES)
def test_student_output_shape(family: str) -> None:
    student = build_student(family, 2_000_000, DIGITS_SHAPE, 10)
    assert student(torch.zeros(3, *DIGITS_SHAPE)).shape == (3, 10)


def test_student_resize_keeps_input_shape() -> None:
    # 600k MACs is below the smallest full-resolution inverted-residual student for 32x32 inputs (1.4M).
    student, choice = build_student_with_choice("inverted_residual", 600_000, (1, 32, 32), 10, allow_resize=True)
    assert choice.resolution < (32, 32)
    assert student(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_student_rejects_tiny_budget() -> None:
    with pytest.raises(ValueError, match="mac_budget 1000 is below the smallest inverted_residual student"):
        build_student("inverted_residual", 1000, DIGITS_SHAPE, 10)


def test_student_rejects_unknown_family() -> None:
    with pytest.raises(ValueError, match="student family 'resnet' is unknown"):
        build_student("resnet", 1_000_000, DIGITS_SHAPE, 10)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DigitsResult]:
    config = DigitsConfig(
        teacher_epochs=1, finetune_epochs=1, student_epochs=1, latency_repeats=2, threads=(1,), calibration_samples=16
    )
    output = tmp_path_factory.mktemp("digits")
    return output, run_digits(config, output)


VARIANTS = [
    "teacher",
    "teacher.int8",
    "pruned",
    "student-distilled",
    "student-distilled.int8",
    "student-plain",
    "student-plain.int8",
]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_digits_variant_onnx_runs(digits_run: tuple[Path, DigitsResult], variant: str) -> None:
    output, _ = digits_run
    session = ort.InferenceSession(str(output / f"{variant}.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": np.zeros((5, *DIGITS_SHAPE), dtype=np.float32)})[0]
    assert logits.shape == (5, 10)


@pytest.mark.slow
def test_digits_rows_gated(digits_run: tuple[Path, DigitsResult]) -> None:
    _, result = digits_run
    variants = [row.variant for row in result.rows]
    assert variants == [
        "teacher-int8",
        "pruned",
        "student-distilled",
        "student-distilled-int8",
        "student-plain",
        "student-plain-int8",
    ]


@pytest.mark.slow
def test_digits_json_written(digits_run: tuple[Path, DigitsResult]) -> None:
    output, _ = digits_run
    written = json.loads((output / "digits_results.json").read_text())
    assert len(written["rows"]) == 6


@pytest.mark.slow
def test_digits_table_lists_variants(digits_run: tuple[Path, DigitsResult]) -> None:
    _, result = digits_run
    table = format_table(result)
    assert table.count("\n") == 1 + 1 + 6  # Header, separator, teacher, six variants.
