"""Resizing and centre-cropping photos for image models (edgefleet.common.images)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

from edgefleet.common.images import ImageMemoryError, decoded_bytes, read_upright_rgb, resize_and_crop

# Peak memory of a child process that only resizes one image, in MiB. Resizing a 20000 x 1 image
# whole before cropping needs about 5 GB, the window alone under 100 MB with numpy and Pillow loaded.
MAX_PEAK_MIB = 250

# VmHWM is the peak resident set of the process's current memory map. getrusage's ru_maxrss would also
# count the pytest process that the child was forked from before its exec.
PEAK_SCRIPT = """
import re
from pathlib import Path
import numpy as np
from PIL import Image
from edgefleet.common.images import resize_and_crop

image = Image.fromarray(np.full((1, 20000, 3), 90, dtype=np.uint8))
pixels = resize_and_crop(image, 224, 224)
peak_kib = re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)
print(pixels.shape, int(pixels.min()), int(pixels.max()), peak_kib)
"""


def reference_resize_and_crop(rgb: Image.Image, height: int, width: int, crop_fraction: float) -> np.ndarray:
    """Resize the whole image and then crop: the plain form of the same transform."""
    scale = max(height / rgb.height, width / rgb.width) / crop_fraction
    resized_width = max(width, round(rgb.width * scale))
    resized_height = max(height, round(rgb.height * scale))
    resized = rgb.resize((resized_width, resized_height), Image.Resampling.BILINEAR)
    left = (resized_width - width) // 2
    top = (resized_height - height) // 2
    return np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.uint8)


@pytest.mark.parametrize(("height", "width"), [(224, 224), (256, 256), (192, 320)])
def test_window_matches_whole_resize(height: int, width: int) -> None:
    """Resampling only the window gives the pixels of resizing everything, within 1 grey level."""
    rgb = Image.fromarray(skimage_data.chelsea())

    pixels = resize_and_crop(rgb, height, width, 0.875)
    expected = reference_resize_and_crop(rgb, height, width, 0.875)

    assert pixels.shape == (height, width, 3)
    assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= 1


def test_extreme_aspect_ratio_small_peak() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    shape, low, high, peak_kib = result.stdout.rsplit(" ", 3)

    assert shape == "(224, 224, 3)"
    assert (int(low), int(high)) == (90, 90)
    assert int(peak_kib) / 1024 < MAX_PEAK_MIB


JPEG_SCRIPT = """
import re
import sys
from pathlib import Path
from edgefleet.common.images import read_upright_rgb

upright = read_upright_rgb(Path(sys.argv[1]), min_side=int(sys.argv[2]))
peak_kib = re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)
print(upright.rgb.size[0], upright.rgb.size[1], peak_kib)
"""


def read_in_child(path: Path, min_side: int) -> tuple[int, int, float]:
    """Read path with read_upright_rgb in a new process; return the decoded width, height and peak MiB."""
    result = subprocess.run(
        [sys.executable, "-c", JPEG_SCRIPT, str(path), str(min_side)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    width, height, peak_kib = result.stdout.split()
    return int(width), int(height), int(peak_kib) / 1024


def test_large_jpeg_decoded_reduced(tmp_path: Path) -> None:
    photo = tmp_path / "large.jpg"
    noise = np.random.default_rng(0).integers(0, 255, (4000, 6000, 3), dtype=np.uint8)
    Image.fromarray(noise).save(photo, quality=90)

    reduced = read_in_child(photo, min_side=512)
    whole = read_in_child(photo, min_side=0)

    assert reduced[:2] == (1500, 1000)
    assert whole[:2] == (6000, 4000)
    assert reduced[2] < MAX_PEAK_MIB
    assert whole[2] > 2 * reduced[2]


@pytest.mark.parametrize(
    ("mode", "per_pixel"),
    [("RGB", 4), ("RGBA", 8), ("L", 5), ("P", 5), ("LA", 8), ("I;16", 15)],
)
def test_decoded_bytes(mode: str, per_pixel: int) -> None:
    # Pillow stores multi-band pixels in 4 bytes; a mode other than RGB also gets an RGB copy.
    assert decoded_bytes((300, 200), mode) == 300 * 200 * per_pixel


def test_read_refuses_image_over_memory(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.new("L", (1024, 1024)).save(path)  # 5 MiB to read: 1 for the grey image, 4 for its RGB copy.

    with pytest.raises(ImageMemoryError, match=r"1024 x 1024 pixels \(PNG, L\); reading it needs about 5 MiB, "):
        read_upright_rgb(path, max_decoded_bytes=4 << 20)
    assert read_upright_rgb(path, max_decoded_bytes=5 << 20).rgb.size == (1024, 1024)


def test_read_checks_jpeg_at_reduced_size(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (2048, 2048)).save(path)  # 16 MiB decoded whole, 1 MiB at 1/4 scale.

    with pytest.raises(ImageMemoryError, match="2048 x 2048 pixels"):
        read_upright_rgb(path, max_decoded_bytes=2 << 20)
    assert read_upright_rgb(path, min_side=512, max_decoded_bytes=2 << 20).rgb.size == (512, 512)
