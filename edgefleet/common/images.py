"""Resize and centre-crop of photos for image models, shared by the demo and edgefleet-agent infer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

# Standard ImageNet evaluation: resize so that the crop covers 87.5 % of the shorter side (256 -> 224).
DEFAULT_CROP_FRACTION = 0.875


def check_crop_fraction(crop_fraction: float) -> None:
    """Raise ValueError naming crop_fraction when it is outside (0, 1]."""
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"invalid crop fraction {crop_fraction}: expected a value in (0, 1], such as 0.875")


def resize_and_crop(
    rgb: Image.Image, height: int, width: int, crop_fraction: float = DEFAULT_CROP_FRACTION
) -> np.ndarray:
    """Resize an RGB image so that a height x width window covers crop_fraction of it, then centre-crop.

    Uses Pillow's bilinear filter, which antialiases when it scales down. Returns a height x width x 3
    uint8 array. Raises ValueError for a crop_fraction outside (0, 1].
    """
    from PIL import Image

    check_crop_fraction(crop_fraction)
    scale = max(height / rgb.height, width / rgb.width) / crop_fraction
    resized_width = max(width, round(rgb.width * scale))
    resized_height = max(height, round(rgb.height * scale))
    resized = rgb.resize((resized_width, resized_height), Image.Resampling.BILINEAR)
    left = (resized_width - width) // 2
    top = (resized_height - height) // 2
    return np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.uint8)
