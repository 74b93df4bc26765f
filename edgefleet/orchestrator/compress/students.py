"""Student networks for distillation, sized by a width multiplier to fit a MAC budget."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgefleet.orchestrator.compress.prune import count_macs

logger = logging.getLogger(__name__)

# The names that DistillConfig.student_family in the compression recipe uses.
STUDENT_FAMILIES = ("inverted_residual", "fire")
WIDTH_DIVISOR = 8

# MobileNetV2-style stages (Sandler et al., 2018): expansion factor, output channels at width 1.0,
# blocks, stride of the first block. Shorter than MobileNetV2 because students here are small.
_INVERTED_RESIDUAL_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 1, 1))
_INVERTED_RESIDUAL_STEM = 32
_INVERTED_RESIDUAL_HEAD = 256
# SqueezeNet 1.1 fire modules (Iandola et al., 2016): squeeze and expand channels at width 1.0, and
# whether a 2x2 max pool comes before the module.
_FIRE_MODULES = ((16, 64, False), (16, 64, False), (32, 128, True), (32, 128, False), (48, 192, True),
                 (48, 192, False), (64, 256, False), (64, 256, False))
_FIRE_STEM = 64
# Width multipliers tried, largest first; widths are rounded to multiples of WIDTH_DIVISOR anyway.
_MULTIPLIERS = tuple(step / 40 for step in range(160, 0, -1))
# Input resolutions tried when resizing is allowed, as fractions of the given one.
_RESOLUTION_SCALES = (1.0, 0.875, 0.75, 0.625, 0.5)
# A resolution is accepted once its best width reaches this fraction of the budget.
_CLOSE_ENOUGH = 0.9


@dataclass(frozen=True)
class StudentChoice:
    """The shape `build_student` picked."""

    family: str
    width_multiplier: float
    resolution: tuple[int, int]  # The resolution the network runs at after its optional resize.
    macs: int


def make_divisible(value: float, divisor: int = WIDTH_DIVISOR) -> int:
    """Round `value` to the nearest multiple of `divisor`, at least `divisor`, never below 90% of value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBnAct(nn.Sequential):
    """Conv2d without bias, BatchNorm2d and an optional ReLU6."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
                 activation: bool = True) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if activation:
            layers.append(nn.ReLU6())
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """Expansion 1x1, depthwise 3x3, linear 1x1 bottleneck, with a skip when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = make_divisible(in_channels * expansion)
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBnAct(in_channels, hidden, 1))
        else:
            hidden = in_channels
        layers += [ConvBnAct(hidden, hidden, 3, stride, groups=hidden),
                   ConvBnAct(hidden, out_channels, 1, activation=False)]
        self.block = nn.Sequential(*layers)
        self.use_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_skip:
            return x + self.block(x)
        return self.block(x)


class Fire(nn.Module):
    """Squeeze 1x1, then expand 1x1 and 3x3 in parallel, concatenated on the channel axis."""

    def __init__(self, in_channels: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(in_channels, squeeze, 1, bias=False), nn.BatchNorm2d(squeeze),
                                     nn.ReLU())
        self.expand1x1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1, bias=False), nn.BatchNorm2d(expand),
                                       nn.ReLU())
        self.expand3x3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1, bias=False),
                                       nn.BatchNorm2d(expand), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = self.squeeze(x)
        return torch.cat([self.expand1x1(squeezed), self.expand3x3(squeezed)], dim=1)


class Student(nn.Module):
    """A feature extractor and classifier, with an optional bilinear resize of the input first."""

    def __init__(self, features: nn.Module, classifier: nn.Module, resize_to: tuple[int, int] | None) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.resize_to = resize_to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize_to is not None:
            x = F.interpolate(x, size=self.resize_to, mode="bilinear", align_corners=False)
        return self.classifier(self.features(x))


def build_student(
    family: str,
    mac_budget: int,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    allow_resize: bool = False,
) -> nn.Module:
    """Build an untrained student of `family` whose MACs per sample are at most `mac_budget`.

    "inverted_residual" stacks MobileNetV2-style blocks (1x1 expansion, depthwise 3x3, linear 1x1
    bottleneck). "fire" stacks SqueezeNet-style fire modules (1x1 squeeze, then 1x1 and 3x3 expands
    concatenated) with BatchNorm added, and classifies with a 1x1 conv and global average pooling. The
    width multiplier is the largest of 0.025 to 4.0 (steps of 0.025) whose MACs fit; every width is a
    multiple of 8. Stride-2 stages are skipped once the feature map is below 8 pixels, so 8x8 inputs
    work. With `allow_resize`, the student resizes its input (bilinear) to 100% down to 50% of the
    given resolution, still accepting `input_shape`: the first resolution whose best width reaches 90%
    of the budget is chosen, else the one closest to it.

    Raises ValueError for an unknown family, a non-positive budget or class count, an input_shape that
    is not (channels, height, width), or a budget below the smallest student.
    Returns the student in eval mode.
    """
    return build_student_with_choice(family, mac_budget, input_shape, num_classes, allow_resize=allow_resize)[0]


def build_student_with_choice(
    family: str,
    mac_budget: int,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    allow_resize: bool = False,
) -> tuple[nn.Module, StudentChoice]:
    """Build a student as `build_student` does; also return the width and resolution it picked."""
    if family not in STUDENT_FAMILIES:
        raise ValueError(f"student family {family!r} is unknown; use one of {', '.join(STUDENT_FAMILIES)}")
    if mac_budget <= 0 or num_classes <= 0:
        raise ValueError(f"mac_budget ({mac_budget}) and num_classes ({num_classes}) must be positive")
    if len(input_shape) != 3 or min(input_shape) <= 0:
        raise ValueError(f"input_shape {input_shape} must be (channels, height, width) with positive sizes")

    channels, height, width = input_shape
    example = torch.zeros(1, channels, height, width)
    scales = _RESOLUTION_SCALES if allow_resize else (1.0,)
    best: tuple[nn.Module, StudentChoice] | None = None
    for scale in scales:
        resolution = (max(1, round(height * scale)), max(1, round(width * scale)))
        found = _widest_under_budget(family, mac_budget, channels, resolution, num_classes, example,
                                     resize=scale != 1.0)
        if found is None:
            continue
        if best is None or found[1].macs > best[1].macs:
            best = found
        if found[1].macs >= _CLOSE_ENOUGH * mac_budget:
            break
    if best is None:
        smallest = _build(family, _MULTIPLIERS[-1], channels, _scaled(height, width, scales[-1]), num_classes,
                          resize=allow_resize)
        raise ValueError(f"mac_budget {mac_budget} is below the smallest {family} student "
                         f"({count_macs(smallest, example)} MACs for input {input_shape}); raise the budget"
                         + ("" if allow_resize else " or allow resizing the input"))
    logger.info("student %s: width %.3f, resolution %s, %d MACs (budget %d)", family, best[1].width_multiplier,
                best[1].resolution, best[1].macs, mac_budget)
    return best


def _scaled(height: int, width: int, scale: float) -> tuple[int, int]:
    return max(1, round(height * scale)), max(1, round(width * scale))


def _widest_under_budget(family: str, mac_budget: int, channels: int, resolution: tuple[int, int],
                         num_classes: int, example: torch.Tensor,
                         resize: bool) -> tuple[nn.Module, StudentChoice] | None:
    """Bisect the multipliers (MACs never fall as the multiplier grows) for the widest network that fits.

    Candidates are built on the meta device, which allocates no weights, so each costs microseconds.
    """
    meta_example = example.to("meta")

    def macs_at(index: int) -> int:
        with torch.device("meta"):
            model = _build(family, _MULTIPLIERS[index], channels, resolution, num_classes, resize=resize)
        return count_macs(model, meta_example)

    # _MULTIPLIERS is descending, so MACs fall as the index grows; find the first index that fits.
    low, high = 0, len(_MULTIPLIERS) - 1
    if macs_at(high) > mac_budget:
        return None
    while low < high:
        middle = (low + high) // 2
        if macs_at(middle) <= mac_budget:
            high = middle
        else:
            low = middle + 1
    multiplier = _MULTIPLIERS[low]
    model = _build(family, multiplier, channels, resolution, num_classes, resize=resize).eval()
    return model, StudentChoice(family, multiplier, resolution, count_macs(model, example))


def _build(family: str, multiplier: float, channels: int, resolution: tuple[int, int], num_classes: int,
           *, resize: bool) -> nn.Module:
    if family == "inverted_residual":
        features, width = _inverted_residual_features(multiplier, channels, min(resolution))
    else:
        features, width = _fire_features(multiplier, channels, min(resolution))
    if family == "fire":
        # SqueezeNet classifies with a 1x1 conv to the classes, then global average pooling.
        classifier: nn.Module = nn.Sequential(nn.Conv2d(width, num_classes, 1), nn.AdaptiveAvgPool2d(1),
                                              nn.Flatten())
    else:
        classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
    return Student(features, classifier, resolution if resize else None)


def _inverted_residual_features(multiplier: float, channels: int, size: int) -> tuple[nn.Module, int]:
    stem = make_divisible(_INVERTED_RESIDUAL_STEM * multiplier)
    stem_stride = 2 if size >= 64 else 1
    layers: list[nn.Module] = [ConvBnAct(channels, stem, 3, stem_stride)]
    size = (size + stem_stride - 1) // stem_stride
    width = stem
    for expansion, base, blocks, stride in _INVERTED_RESIDUAL_STAGES:
        out_channels = make_divisible(base * multiplier)
        for index in range(blocks):
            block_stride = stride if index == 0 and size >= 8 else 1
            layers.append(InvertedResidual(width, out_channels, block_stride, expansion))
            size = (size + block_stride - 1) // block_stride
            width = out_channels
    head = make_divisible(_INVERTED_RESIDUAL_HEAD * multiplier)
    layers.append(ConvBnAct(width, head, 1))
    return nn.Sequential(*layers), head


def _fire_features(multiplier: float, channels: int, size: int) -> tuple[nn.Module, int]:
    stem = make_divisible(_FIRE_STEM * multiplier)
    stem_stride = 2 if size >= 64 else 1
    layers: list[nn.Module] = [nn.Conv2d(channels, stem, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(stem),
                               nn.ReLU()]
    size = (size + stem_stride - 1) // stem_stride
    width = stem
    for squeeze_base, expand_base, pool_before in _FIRE_MODULES:
        if pool_before and size >= 8:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        squeeze = make_divisible(squeeze_base * multiplier)
        expand = make_divisible(expand_base * multiplier / 2)  # Each of the 1x1 and 3x3 halves.
        layers.append(Fire(width, squeeze, expand))
        width = 2 * expand
    return nn.Sequential(*layers), width
