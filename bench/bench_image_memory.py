"""Measure the peak memory of preparing one large image for a 224 x 224 model, new way against old.

Each case runs in its own process and reads VmHWM, the peak resident set, from /proc/self/status. The
old ways are resizing the whole image before cropping, and decoding a JPEG at full size.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CASE_SCRIPT = """
import re
import sys
from pathlib import Path

from PIL import Image

from edgefleet.common.images import read_upright_rgb, resize_and_crop

path, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "whole-resize":
    # The old resize_and_crop: scale the whole image so that the window covers 87.5 %, then crop.
    rgb = read_upright_rgb(path).rgb
    scale = max(224 / rgb.height, 224 / rgb.width) / 0.875
    width, height = max(224, round(rgb.width * scale)), max(224, round(rgb.height * scale))
    resized = rgb.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - 224) // 2, (height - 224) // 2
    pixels = resized.crop((left, top, left + 224, top + 224))
elif mode == "two-copies":
    # The old read_upright_rgb: exif_transpose returned a copy, and convert("RGB") another, even for RGB.
    from PIL import ImageOps

    with Image.open(path) as image:
        image.load()
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    pixels = resize_and_crop(rgb, 224, 224)
else:
    min_side = 512 if mode == "window+draft" else 0
    pixels = resize_and_crop(read_upright_rgb(path, min_side=min_side).rgb, 224, 224)
print(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
"""


def peak_mib(path: Path, mode: str) -> float:
    output = subprocess.run([sys.executable, "-c", CASE_SCRIPT, str(path), mode], capture_output=True, text=True)
    if output.returncode != 0:
        raise SystemExit(f"case {mode} on {path.name} failed: {output.stderr.strip()}")
    return int(output.stdout) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args()
    rng = np.random.default_rng(0)
    rgb_row = rng.integers(0, 255, (1, 6000, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as work:
        images = {
            "10000 x 1 PNG": (Path(work) / "wide.png", rng.integers(0, 255, (1, 10000, 3), dtype=np.uint8)),
            "6000 x 4000 JPEG": (Path(work) / "photo.jpg", rng.integers(0, 255, (4000, 6000, 3), dtype=np.uint8)),
            # Rows repeat so that the files compress quickly; the decoded size is what counts here.
            "6000 x 6000 PNG": (Path(work) / "rgb.png", np.repeat(rgb_row, 6000, axis=0)),
            "6000 x 6000 grey PNG": (Path(work) / "grey.png", np.repeat(rgb_row[..., 0], 6000, axis=0)),
        }
        print(f"{'image':20} {'case':14} {'peak MiB':>9}")
        for name, (path, pixels) in images.items():
            Image.fromarray(pixels).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
            if path.suffix == ".jpg":
                modes = ["whole-resize", "window", "window+draft"]
            elif pixels.shape[0] == 1:
                modes = ["whole-resize", "window"]
            else:
                modes = ["two-copies", "window"]
            for mode in modes:
                print(f"{name:20} {mode:14} {peak_mib(path, mode):9.1f}")


if __name__ == "__main__":
    main()
