"""Reading, resizing and centre-cropping of photos for image models, shared by the demo, infer and calibration."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

# Standard ImageNet evaluation: resize so that the crop covers 87.5 % of the shorter side (256 -> 224).
DEFAULT_CROP_FRACTION = 0.875

# Pillow modes of 16-bit grayscale images. Pillow opens 16-bit grayscale PNG files as "I;16" or, in
# older releases, as the 32-bit mode "I" with values up to 65535.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def upright_rgb(image: Image.Image) -> Image.Image:
    """Apply image's EXIF orientation, as image viewers do, and convert it to 8-bit RGB.

    16-bit grayscale is scaled to 8 bits. Returns a new image and leaves image open.
    """
    from PIL import Image, ImageOps

    # Cameras store the pixels as the sensor read them and the rotation to show them in EXIF.
    upright = ImageOps.exif_transpose(image)
    if upright.mode in SIXTEEN_BIT_MODES:
        # convert("RGB") clips 16-bit values at 255, which turns most pixels white.
        scaled = np.asarray(upright).astype(np.float32) / 257.0
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L").convert("RGB")
    return upright.convert("RGB")


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
