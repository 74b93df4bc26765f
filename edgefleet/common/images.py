"""Reading, resizing and centre-cropping of photos for image models, shared by the demo, infer and calibration."""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

# Standard ImageNet evaluation: resize so that the crop covers 87.5 % of the shorter side (256 -> 224).
DEFAULT_CROP_FRACTION = 0.875

# Pillow modes of 16-bit grayscale images. Pillow opens 16-bit grayscale PNG files as "I;16" or, in
# older releases, as the 32-bit mode "I" with values up to 65535.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


# Exceptions that Pillow raises while it parses EXIF data that is not a valid TIFF structure: SyntaxError
# for a bad header, struct.error for truncated numbers, ValueError and TypeError for values of the wrong
# kind. Pillow's own JPEG plug-in catches these when it reads the resolution from EXIF data (Pillow 13).
EXIF_ERRORS = (SyntaxError, struct.error, ValueError, TypeError)


@dataclass(frozen=True)
class UprightImage:
    """An image file read as 8-bit RGB and turned by its EXIF orientation."""

    rgb: Image.Image
    # Why the EXIF data was ignored because Pillow cannot read it, or "" when it was read or absent.
    exif_error: str = ""


class ImageMemoryError(OSError):
    """Decoding an image would need more memory than the caller allows."""


def decoded_bytes(size: tuple[int, int], mode: str) -> int:
    """Estimate the peak bytes that reading an image of size (width, height) in Pillow mode needs.

    Pillow stores multi-band images (RGB, RGBA, LA, CMYK) and 32-bit ones in 4 bytes per pixel, 16-bit
    grayscale in 2 and the rest in 1. An RGB image is used as decoded; other modes also get an RGB
    copy of 4 bytes per pixel, and 16-bit grayscale passes through float32 arrays on the way.
    """
    from PIL import Image

    pixels = size[0] * size[1]
    if Image.getmodebands(mode) > 1 or mode in ("I", "F"):
        stored = 4
    elif mode.startswith("I;16"):
        stored = 2
    else:
        stored = 1
    if mode in SIXTEEN_BIT_MODES:
        return pixels * (stored + 4 + 4 + 1 + 4)
    return pixels * (stored if mode == "RGB" else stored + 4)


def read_upright_rgb(
    path: Path, *, warn_large: bool = True, min_side: int = 0, max_decoded_bytes: int | None = None
) -> UprightImage:
    """Read the image file at path, apply its EXIF orientation, as image viewers do, and convert it to 8-bit RGB.

    With min_side, a JPEG file is decoded at 1/2, 1/4 or 1/8 of its size where both sides stay at least
    min_side, which libjpeg does while decoding. Other formats are decoded whole. An RGB image is
    returned without a copy; bench/bench_image_memory.py measures the peaks.

    16-bit grayscale is scaled to 8 bits. When Pillow cannot read the EXIF data, it is ignored: the image
    is kept as stored, exif_error gives the reason, and Pillow's warnings about it (UserWarning from
    PIL.TiffImagePlugin) are not shown. Other warnings are shown as usual, except
    Image.DecompressionBombWarning when warn_large is false.

    With max_decoded_bytes, an image whose decoding would need more (decoded_bytes) raises
    ImageMemoryError before it is decoded, so a device short of memory refuses it instead of being
    stopped by the out-of-memory killer.

    Raises OSError for a file that Pillow cannot read (UnidentifiedImageError included), and
    Image.DecompressionBombError for an image of more than twice Image.MAX_IMAGE_PIXELS.
    """
    from PIL import Image

    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # The JPEG plug-in parses the EXIF data while it opens the file, to read the resolution.
            with Image.open(path) as image:
                if min_side and image.format == "JPEG":
                    image.draft("RGB", (min_side, min_side))
                needed = decoded_bytes(image.size, image.mode)
                if max_decoded_bytes is not None and needed > max_decoded_bytes:
                    raise ImageMemoryError(
                        f"the image is {image.width} x {image.height} pixels ({image.format}, {image.mode}); "
                        f"reading it needs about {_mib(needed)} MiB, more than the {_mib(max_decoded_bytes)} MiB "
                        "of memory available; scale it down first"
                        + ("" if image.format == "JPEG" else ", or save it as JPEG, which is read at a reduced size")
                    )
                # Decoding errors propagate here, so the EXIF step below catches only EXIF errors.
                image.load()
                upright, exif_error = _apply_exif_orientation(image, caught)
                return UprightImage(_to_rgb(upright), exif_error)
    finally:
        _show_other_warnings(caught, warn_large)


def _mib(size: int) -> int:
    return -(-size // (1 << 20))


def _apply_exif_orientation(image: Image.Image, caught: list[warnings.WarningMessage]) -> tuple[Image.Image, str]:
    """Turn image by its EXIF orientation, and return the result with "".

    When Pillow cannot read the EXIF data, returns image unchanged with the reason. caught contains the
    warnings raised since the file was opened.
    """
    from PIL import ImageOps

    exif_warning = _first_exif_warning(caught)
    if exif_warning:
        return image, exif_warning
    try:
        # Cameras store the pixels as the sensor read them and the rotation to show them in EXIF.
        # Pillow parses the EXIF data of PNG and WebP files here, not while it opens them.
        # In place: otherwise Pillow returns a copy of an image that needs no turn, one more full-size
        # decoded image in memory.
        ImageOps.exif_transpose(image, in_place=True)
    except EXIF_ERRORS as error:
        return image, _one_line(str(error))
    exif_warning = _first_exif_warning(caught)
    if exif_warning:
        # Pillow skipped the entries that it could not read, so the orientation it read may be wrong too.
        return image, exif_warning
    return image, ""


def _to_rgb(image: Image.Image) -> Image.Image:
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES:
        # convert("RGB") clips 16-bit values at 255, which turns most pixels white.
        scaled = np.asarray(image).astype(np.float32) / 257.0
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "RGB":
        return image  # convert() would copy it.
    return image.convert("RGB")


def _is_exif_warning(caught: warnings.WarningMessage) -> bool:
    from PIL import TiffImagePlugin

    # Pillow parses EXIF data with its TIFF reader and warns from there, with messages that vary between
    # releases ("Corrupt EXIF data", "Possibly corrupt EXIF data", "Truncated File Read").
    return issubclass(caught.category, UserWarning) and caught.filename == TiffImagePlugin.__file__


def _first_exif_warning(caught: list[warnings.WarningMessage]) -> str:
    return next((_one_line(str(w.message)) for w in caught if _is_exif_warning(w)), "")


def _show_other_warnings(caught: list[warnings.WarningMessage], warn_large: bool) -> None:
    from PIL import Image

    for warning in caught:
        if _is_exif_warning(warning):
            continue
        if not warn_large and issubclass(warning.category, Image.DecompressionBombWarning):
            continue
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _one_line(text: str) -> str:
    """Return text with each run of whitespace, line breaks included, replaced by one space."""
    return " ".join(text.split())


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
    left = (resized_width - width) // 2
    top = (resized_height - height) // 2
    # Only the window is resampled, from the region of the source that it covers. Resizing the whole
    # image first would hold all of it at the new scale: 2.9 million x 292 pixels for a 10000 x 1 image.
    # Pillow's filter still reads the source pixels around the region, so the result differs from a
    # whole resize and crop by at most 1 grey level (tests/common/test_images.py).
    x_scale = rgb.width / resized_width
    y_scale = rgb.height / resized_height
    box = (left * x_scale, top * y_scale, (left + width) * x_scale, (top + height) * y_scale)
    return np.asarray(rgb.resize((width, height), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)
