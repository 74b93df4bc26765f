"""Knowledge distillation and plain supervised training of small PyTorch classifiers on CPU."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# Inputs of shape (N, ...) and integer class labels of shape (N,).
TensorPair = tuple[torch.Tensor, torch.Tensor]
# Maps a batch of inputs and a seeded generator to an augmented batch of the same shape.
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class TrainingHistory:
    """Mean training loss of each epoch, in order."""

    epoch_losses: tuple[float, ...]
    temperature: float
    alpha: float  # Weight of the distillation term; 0 means plain cross-entropy training.


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Compute alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(labels).

    The T^2 factor keeps the gradient scale of the soft term independent of T (Hinton et al., 2015,
    "Distilling the Knowledge in a Neural Network"). KL is averaged over the batch.
    """
    soft_targets = F.softmax(teacher_logits / temperature, dim=1)
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    kl = F.kl_div(log_student, soft_targets, reduction="batchmean")
    ce = F.cross_entropy(student_logits, labels)
    return alpha * temperature * temperature * kl + (1.0 - alpha) * ce


def distill(
    teacher: nn.Module | None,
    student: nn.Module,
    train_data: TensorPair,
    *,
    temperature: float,
    alpha: float,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 1e-4,
    augment: Augment | None = None,
) -> TrainingHistory:
    """Train `student` in place on `train_data`, matching the teacher's softened outputs.

    The teacher runs in eval mode without gradients. With alpha == 0 the teacher is not needed (pass
    None) and this is plain cross-entropy training, so a distilled and a non-distilled student can be
    trained with the same seed, data order and schedule. Training uses AdamW with a cosine learning
    rate decay over all steps; torch's global RNG and the shuffling order are seeded with `seed`, so
    two runs with equal arguments on the same machine produce equal weights.

    Raises ValueError for a non-positive temperature, epochs, lr or batch size, an alpha outside
    [0, 1], mismatched input and label counts, or alpha > 0 without a teacher.
    Returns the mean loss of each epoch.
    """
    inputs, labels = train_data
    _check_arguments(teacher, inputs, labels, temperature=temperature, alpha=alpha, epochs=epochs, lr=lr,
                     batch_size=batch_size)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(inputs) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    if teacher is not None:
        teacher.eval()

    epoch_losses: list[float] = []
    for epoch in range(epochs):
        student.train()
        order = torch.randperm(len(inputs), generator=generator)
        total = 0.0
        for start in range(0, len(inputs), batch_size):
            index = order[start:start + batch_size]
            batch = inputs[index]
            if augment is not None:
                batch = augment(batch, generator)
            batch_labels = labels[index]
            student_logits = student(batch)
            if alpha > 0.0:
                assert teacher is not None  # Checked above.
                with torch.no_grad():
                    teacher_logits = teacher(batch)
                loss = distillation_loss(student_logits, teacher_logits, batch_labels,
                                         temperature=temperature, alpha=alpha)
            else:
                loss = F.cross_entropy(student_logits, batch_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(index)
        epoch_losses.append(total / len(inputs))
        logger.debug("epoch %d/%d: loss %.4f (alpha %.2f, T %.1f)", epoch + 1, epochs, epoch_losses[-1],
                     alpha, temperature)
    student.eval()
    return TrainingHistory(epoch_losses=tuple(epoch_losses), temperature=temperature, alpha=alpha)


def train_classifier(
    model: nn.Module,
    train_data: TensorPair,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 1e-4,
    augment: Augment | None = None,
) -> TrainingHistory:
    """Train `model` in place with cross-entropy: `distill` with alpha 0 and no teacher.

    Raises ValueError as `distill` does. Returns the mean loss of each epoch.
    """
    return distill(None, model, train_data, temperature=1.0, alpha=0.0, epochs=epochs, lr=lr,
                   batch_size=batch_size, seed=seed, weight_decay=weight_decay, augment=augment)


def evaluate_accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                      *, batch_size: int = 256) -> float:
    """Run `model` in eval mode over `inputs` and return the top-1 accuracy as a fraction in [0, 1].

    Raises ValueError when inputs and labels differ in length or are empty.
    """
    if len(inputs) != len(labels) or len(inputs) == 0:
        raise ValueError(f"inputs ({len(inputs)}) and labels ({len(labels)}) must be non-empty and of equal "
                         "length")
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            predicted = model(inputs[start:start + batch_size]).argmax(dim=1)
            correct += int((predicted == labels[start:start + batch_size]).sum())
    return correct / len(inputs)


def _check_arguments(teacher: nn.Module | None, inputs: torch.Tensor, labels: torch.Tensor, *,
                     temperature: float, alpha: float, epochs: int, lr: float, batch_size: int) -> None:
    # A NaN passes every comparison below that is written as a rejection, and trains to NaN weights.
    for name, value in (("temperature", temperature), ("alpha", alpha), ("learning rate", lr)):
        if not math.isfinite(value):
            raise ValueError(f"{name} {value} must be a finite number")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha} is outside [0, 1]; use 0 for plain training, 1 for soft targets only")
    if alpha > 0.0 and teacher is None:
        raise ValueError(f"alpha {alpha} needs a teacher; pass a teacher model or set alpha to 0")
    if temperature <= 0.0:
        raise ValueError(f"temperature {temperature} must be positive; 2 to 8 is usual for distillation")
    if epochs < 1:
        raise ValueError(f"epochs {epochs} must be at least 1")
    if lr <= 0.0:
        raise ValueError(f"learning rate {lr} must be positive")
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be at least 1")
    if len(inputs) != len(labels) or len(inputs) == 0:
        raise ValueError(f"train inputs ({len(inputs)}) and labels ({len(labels)}) must be non-empty and of "
                         "equal length")
