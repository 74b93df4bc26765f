"""Image files with the properties of camera photos, written for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# EXIF tag 0x0112 (Orientation), value 6: the stored pixels must turn 90 degrees clockwise to show upright.
ORIENTATION_TAG = 0x0112
ROTATE_CLOCKWISE = 6
# EXIF tag 0x8298 (Copyright), an ASCII text.
COPYRIGHT_TAG = 0x8298
# An EXIF block (APP1 payload in JPEG, eXIf chunk in PNG) whose data is not a TIFF structure.
NOT_TIFF_EXIF = b"Exif\x00\x00not a TIFF header"


def corrupt_exif() -> bytes:
    """Return EXIF data that ends in the middle of its second entry, as a file cut short does.

    Pillow reads the first entry, Orientation 6, and then warns "Corrupt EXIF data.  Expecting to read
    12 bytes but only got 5."
    """
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = ROTATE_CLOCKWISE
    exif[COPYRIGHT_TAG] = "Example Photographer"
    data = exif.tobytes()
    # "Exif\0\0", the 8-byte TIFF header, the 2-byte entry count, the 12-byte Orientation entry (tags
    # are written in ascending order), then 5 bytes of the Copyright entry.
    return data[: 6 + 8 + 2 + 12 + 5]


def write_sideways_photo(path: Path, exif: bytes | None = None) -> None:
    """Write a 64x32 image, red on the left half and blue on the right, tagged to show turned clockwise.

    A viewer that applies the tag shows a 32x64 image, red on top and blue below, as a phone held
    upright took it. The suffix of path sets the format. exif replaces the EXIF data that carries the tag.
    """
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :32, 0] = 255
    pixels[:, 32:, 2] = 255
    if exif is None:
        tags = Image.Exif()
        tags[ORIENTATION_TAG] = ROTATE_CLOCKWISE
        exif = tags.tobytes()
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
