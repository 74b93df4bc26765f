"""Image files with the properties of camera photos, written for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# EXIF tag 0x0112 (Orientation), value 6: the stored pixels must turn 90 degrees clockwise to show upright.
ORIENTATION_TAG = 0x0112
ROTATE_CLOCKWISE = 6


def write_sideways_photo(path: Path) -> None:
    """Write a 64x32 JPEG, red on the left half and blue on the right, tagged to show turned clockwise.

    A viewer that applies the tag shows a 32x64 image, red on top and blue below, as a phone held
    upright took it.
    """
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :32, 0] = 255
    pixels[:, 32:, 2] = 255
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = ROTATE_CLOCKWISE
    Image.fromarray(pixels).save(path, "JPEG", quality=95, exif=exif)
