"""Calibration and evaluation data of compression jobs: image folders, .npz files and built-in sources.

A recipe names a source in a DataSource section. `images` is a folder of images on the orchestrator
host (an absolute path). `npz` is an .npz file whose array under the model input's name contains the
samples. `images = "builtin:NAME"` selects one of the built-in sources:

- `builtin:demo-photos`: the colour photos bundled with scikit-image. Calibration uses every other
  photo and evaluation the rest, so no evaluation sample comes from a calibration photo; each photo
  yields several random crops, half of them mirrored. Preprocessed with the source's `preprocess`.
- `builtin:digits`: scikit-learn's handwritten digits, pixels scaled to [0, 1] and resized to the model
  input, with a fixed stratified split (75 % calibration, 25 % evaluation with labels).

check_source() runs in the orchestrator process before a job is created and reads no more than file
headers; load_samples() runs in the job's worker process and may import heavy libraries.
"""

from __future__ import annotations

import filecmp
import itertools
import logging
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.common.models import TensorSpec
from edgefleet.orchestrator.compress.recipe import DataSource, PreprocessConfig

if TYPE_CHECKING:
    from edgefleet.demo.images import Photo
    from edgefleet.orchestrator.compress.calibration import PreprocessSpec

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
DEMO_PHOTOS = "demo-photos"
DIGITS = "digits"
BUILTINS = (DEMO_PHOTOS, DIGITS)
# The same suffixes as compress.calibration.IMAGE_SUFFIXES, which imports onnxruntime and so stays out of
# the orchestrator process; a test keeps the two equal.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Evaluation crops per demo photo: 4 evaluation photos give 100 samples, on which one changed
# prediction is worth 1 point, the gate's default max_accuracy_drop.
DEMO_EVAL_CROPS = 25
DIGITS_TEST_SIZE = 0.25
DIGITS_SPLIT_SEED = 0
_DIGITS_PIXEL_MAX = 16.0
_CALIBRATION_SEED = 1
_EVALUATION_SEED = 2
ROLES = ("calibration", "evaluation")


class SourceError(ValueError):
    """A data source that cannot feed the model: the message names the recipe field, the value and the fix."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Samples:
    """Model inputs with the batch axis first, optional integer labels, and where they came from."""

    inputs: np.ndarray
    labels: np.ndarray | None
    description: str


def is_empty(source: DataSource) -> bool:
    """Return whether the section names no data at all."""
    return not source.images and not source.npz


def builtin_name(source: DataSource) -> str:
    """Return the built-in source's name ("digits"), or "" for a folder or .npz source."""
    return source.images.removeprefix(BUILTIN_PREFIX) if source.images.startswith(BUILTIN_PREFIX) else ""


def describe(source: DataSource) -> str:
    """Return a short human-readable name of the source."""
    if builtin_name(source):
        return builtin_name(source)
    return source.images or source.npz or "no data"


def choose_input(inputs: Sequence[TensorSpec], source: DataSource, field: str) -> TensorSpec:
    """Return the model input the source feeds: input_name, or the only input.

    Raises SourceError when input_name is unknown or the model has several inputs and none is named.
    """
    names = [spec.name for spec in inputs]
    if source.input_name:
        for spec in inputs:
            if spec.name == source.input_name:
                return spec
        raise SourceError(f"{field}.input_name", f"{source.input_name!r} is not a model input; inputs are {names}")
    if len(inputs) != 1:
        raise SourceError(f"{field}.input_name", f"the model has inputs {names}: name the one to feed")
    return inputs[0]


def check_source(
    source: DataSource,
    field: str,
    inputs: Sequence[TensorSpec],
    limit: int | None = None,
    classes: int | None = None,
) -> TensorSpec:
    """Check, without loading the data, that source exists and fits the model input; return that input.

    field is the recipe path of the section ("quantize.calibration"). Folders must exist and hold
    images, .npz files must hold an array under the input's name with its dtype and fixed axes, and
    image sources must preprocess to the input's shape. A labels file must hold a 1-D integer array
    with at least one label per sample that load_samples would load with the same limit, each a class
    index below classes when the model's scores per sample are known. Raises SourceError naming the
    field and value.
    """
    spec = choose_input(inputs, source, field)
    sample_count: int | None = None  # Unknown for the built-in sources until they are loaded.
    if is_empty(source):
        raise SourceError(
            field, f"no data given: set images (a folder, or {BUILTIN_PREFIX}NAME with NAME in {list(BUILTINS)}) or npz"
        )
    name = builtin_name(source)
    if source.images.startswith(BUILTIN_PREFIX):
        if name not in BUILTINS:
            raise SourceError(
                f"{field}.images",
                f"unknown built-in source {source.images!r}; use one of {[BUILTIN_PREFIX + b for b in BUILTINS]}",
            )
        if name == DIGITS:
            _check_digits_input(spec, f"{field}.images")
        else:
            _check_image_input(spec, source.preprocess, field)
    elif source.images:
        folder = _absolute(source.images, f"{field}.images")
        images = list_images(folder, f"{field}.images")
        sample_count = len(images)
        _check_image_input(spec, source.preprocess, field)
        # load_samples reads the first limit images of a folder, so only those are checked.
        _check_image_headers(images[:limit] if limit is not None else images, f"{field}.images")
    else:
        sample_count = _check_npz(_absolute(source.npz, f"{field}.npz"), spec, f"{field}.npz")
    if source.labels:
        path = _absolute(source.labels, f"{field}.labels")
        if not path.is_file():
            raise SourceError(f"{field}.labels", f"{source.labels!r} not found on the orchestrator host")
        label_count = _check_labels(path, f"{field}.labels", classes)
        if sample_count is not None and source.images and limit is not None:
            # load_samples reads at most limit images of a folder, but every sample of an .npz file.
            sample_count = min(sample_count, limit)
        if sample_count is not None and label_count < sample_count:
            raise SourceError(
                f"{field}.labels",
                f"{source.labels!r} has {label_count} labels for the {sample_count} samples of "
                f"{describe(source)!r}; give one label per sample, in the order of the samples",
            )
    return spec


def check_apart(calibration: DataSource, evaluation: DataSource, field: str) -> None:
    """Raise SourceError when evaluation names the same folder or .npz file as calibration.

    Paths are compared by file identity, so two spellings of one folder, a symbolic link to it or a hard
    link to the same .npz file count as the same, and so does a copy of the calibration .npz with equal
    bytes. Built-in sources split themselves and always pass. An evaluation folder with some images
    whose bytes equal calibration images is logged as a warning.
    """
    if builtin_name(calibration) or builtin_name(evaluation):
        return
    for key in ("images", "npz"):
        calibration_path, evaluation_path = getattr(calibration, key), getattr(evaluation, key)
        if calibration_path and evaluation_path and _same_file(Path(calibration_path), Path(evaluation_path)):
            raise SourceError(
                f"{field}.{key}",
                f"{evaluation_path!r} is the calibration data as well, so the gate would measure accuracy on "
                "the samples the int8 ranges were fitted on; give evaluation data kept apart from calibration",
            )
    if calibration.npz and evaluation.npz and _same_bytes(Path(calibration.npz), Path(evaluation.npz)):
        raise SourceError(
            f"{field}.npz",
            f"{evaluation.npz!r} has the same contents as the calibration file {calibration.npz!r}, so the gate "
            "would measure accuracy on the samples the int8 ranges were fitted on; give evaluation data kept "
            "apart from calibration",
        )
    if calibration.images and evaluation.images:
        shared = _shared_files(Path(calibration.images), Path(evaluation.images))
        if shared:
            logger.warning(
                "%s: %d of the images in %s are copies of calibration images in %s (the first is %s), so the "
                "gate measures accuracy partly on calibration data",
                field,
                len(shared),
                evaluation.images,
                calibration.images,
                shared[0].name,
            )


def _same_file(first: Path, second: Path) -> bool:
    try:
        return first.samefile(second)
    except OSError:
        return False


def _same_bytes(first: Path, second: Path) -> bool:
    """Return whether two files have equal contents; files of different sizes are not read."""
    try:
        return first.stat().st_size == second.stat().st_size and filecmp.cmp(first, second, shallow=False)
    except OSError:
        return False


def _shared_files(calibration: Path, evaluation: Path) -> list[Path]:
    """List the images of folder evaluation whose bytes equal those of an image in folder calibration.

    Only files of equal size are read and compared, so folders of distinct photos cost one stat per file.
    """
    try:
        by_size: dict[int, list[Path]] = {}
        for path in list_images(calibration, ""):
            by_size.setdefault(path.stat().st_size, []).append(path)
        return [
            path
            for path in list_images(evaluation, "")
            if any(filecmp.cmp(path, other, shallow=False) for other in by_size.get(path.stat().st_size, []))
        ]
    except (OSError, SourceError):
        return []


def list_images(folder: Path, field: str) -> list[Path]:
    """List the image files directly in folder, sorted; raise SourceError when it is missing or has none."""
    if not folder.is_dir():
        raise SourceError(
            field,
            f"folder {str(folder)!r} not found on the orchestrator host or not a directory{_folder_hint(folder)}",
        )
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise SourceError(field, f"folder {str(folder)!r} contains no images (suffixes {', '.join(IMAGE_SUFFIXES)})")
    return images


def _check_image_headers(images: Sequence[Path], field: str) -> None:
    """Raise SourceError naming the first file whose header Pillow cannot read as an image.

    Image.open reads only the header, so a file with a valid header and broken pixel data still fails
    in the job. Without Pillow (an orchestrator installed without the demo extra) nothing is checked here.
    """
    try:
        from PIL import Image
    except ImportError:
        return
    for path in images:
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise SourceError(
                field,
                f"{str(path)!r} is not an image that Pillow can read ({error}); remove or replace it",
            ) from None


def _folder_hint(folder: Path) -> str:
    """Return '; did you mean ...?' naming a folder next to folder or a built-in source with a close name, or ""."""
    from edgefleet.orchestrator.handlers.devices import suggest

    try:
        # At most a few thousand entries are read, so a huge parent folder costs no more than that.
        siblings = [p.name for p in itertools.islice(folder.parent.iterdir(), 5000) if p.is_dir()]
    except OSError:
        siblings = []
    hint = suggest(folder.name, siblings)
    if hint:
        return f"{hint.removesuffix('?')} in {str(folder.parent)!r}?"
    close = [name for name in BUILTINS if suggest(folder.name, [name])]
    if close:
        return f'; did you mean the built-in source {close[0]} (images = "{BUILTIN_PREFIX}{close[0]}" in a recipe)?'
    return ""


def _absolute(value: str, field: str) -> Path:
    path = Path(value)
    if not path.is_absolute():
        raise SourceError(field, f"{value!r} must be an absolute path on the orchestrator host")
    return path


def _image_axes(spec: TensorSpec, layout: str) -> tuple[int, int, int]:
    """Return (channels, height, width) of a rank-4 input in layout."""
    if layout == "NCHW":
        return spec.shape[1], spec.shape[2], spec.shape[3]
    return spec.shape[3], spec.shape[1], spec.shape[2]


def _check_image_input(spec: TensorSpec, preprocess: PreprocessConfig, field: str) -> None:
    if spec.dtype != "float32":
        raise SourceError(
            field, f"images become float32 samples but model input {spec.name!r} is {spec.dtype}; use an npz source"
        )
    if len(spec.shape) != 4:
        raise SourceError(field, f"images need a rank-4 model input, but {spec.name!r} has shape {list(spec.shape)}")
    channels, height, width = _image_axes(spec, preprocess.layout)
    if channels not in (3, -1):
        raise SourceError(
            f"{field}.preprocess.layout",
            f"{preprocess.layout!r} puts {channels} channels on input {spec.name!r} of shape {list(spec.shape)}; "
            f'images have 3: set layout = "NCHW" or "NHWC" in [{field}.preprocess] of a recipe file (--recipe)',
        )
    for key, want, got in (("height", height, preprocess.height), ("width", width, preprocess.width)):
        if want > 0 and want != got:
            raise SourceError(
                f"{field}.preprocess.{key}",
                f"{got} does not match model input {spec.name!r} of shape {list(spec.shape)}: set it to {want}",
            )


def _check_digits_input(spec: TensorSpec, field: str) -> None:
    ok = spec.dtype == "float32" and len(spec.shape) == 4 and (spec.shape[1] == 1 or spec.shape[3] == 1)
    if not ok:
        raise SourceError(
            field,
            f"{BUILTIN_PREFIX}{DIGITS} feeds float32 grey images (N, 1, H, W) or (N, H, W, 1), but model input "
            f"{spec.name!r} is {spec.dtype} {list(spec.shape)}",
        )


def _check_npz(path: Path, spec: TensorSpec, field: str) -> int:
    """Check the .npz array of the model input from its header (and its values for NaN); return its sample count."""
    if not path.is_file():
        raise SourceError(field, f"{str(path)!r} not found on the orchestrator host")
    shape, dtype = _npz_header(path, spec, field)
    check_shape(tuple(shape), str(np.dtype(dtype)), spec, field)
    if np.dtype(dtype).kind in "fc":
        # Reads the samples once more, so that a NaN fails the request instead of the job's calibration.
        with np.load(path, allow_pickle=False) as archive:
            samples = archive[spec.name]
        finite = np.isfinite(samples).reshape(samples.shape[0], -1).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise SourceError(
                field,
                f"{str(path)!r} has NaN or infinite values in {bad.size} of {samples.shape[0]} samples "
                f"(the first is sample {bad[0]}); fix or drop those samples",
            )
    return int(shape[0])


def _npz_header(path: Path, spec: TensorSpec, field: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Return the shape and dtype of the .npz array of the model input, read from its .npy header."""
    member = f"{spec.name}.npy"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if member not in names:
                keys = [n.removesuffix(".npy") for n in names]
                raise SourceError(
                    field, f"{str(path)!r} has no array {spec.name!r} (the model input); it contains {keys}"
                )
            with archive.open(member) as handle:
                version = np.lib.format.read_magic(handle)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    except (zipfile.BadZipFile, ValueError, OSError) as error:
        if isinstance(error, SourceError):
            raise
        raise SourceError(field, f"{str(path)!r} is not a readable .npz file: {error}") from None
    return tuple(shape), np.dtype(dtype)


def sample_count(source: DataSource, spec: TensorSpec) -> int | None:
    """Return the samples in a folder or .npz source from its file list or header; None for a built-in source.

    Call it after check_source, which rejects a missing or unreadable source.
    """
    if builtin_name(source):
        return None
    if source.images:
        return len(list_images(Path(source.images), "images"))
    shape, _ = _npz_header(Path(source.npz), spec, "npz")
    return shape[0] if shape else None


def evaluation_count(source: DataSource, spec: TensorSpec) -> int | None:
    """Return the samples the gate evaluates from source, built-in sources included; None when unknown."""
    name = builtin_name(source)
    if name == "demo-photos":
        from edgefleet.demo.images import demo_photos

        return DEMO_EVAL_CROPS * len(split_demo_photos(demo_photos())[1])
    if name:
        return None
    return sample_count(source, spec)


def check_shape(shape: tuple[int, ...], dtype: str, spec: TensorSpec, field: str) -> None:
    """Check that samples of shape and dtype (batch axis first) fit the model input; raise SourceError."""
    # The batch axis is N even when the model fixes it, because samples are fed in batches of the fixed size.
    expected = "(" + ", ".join("N" if i == 0 or d < 0 else str(d) for i, d in enumerate(spec.shape)) + ")"
    batch = spec.shape[0] if spec.shape else -1
    samples = f"N a multiple of the model's fixed batch {batch}" if batch > 1 else "any number of samples N"
    if dtype != spec.dtype:
        raise SourceError(field, f"samples are {dtype} but model input {spec.name!r} is {spec.dtype}")
    if len(shape) != len(spec.shape):
        raise SourceError(field, f"samples have shape {shape}, expected {expected} with the batch axis first")
    for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
        if axis > 0 and want > 0 and want != got:
            raise SourceError(
                field,
                f"samples have shape {shape}, expected {expected} with {samples}: axis {axis} is {got}",
            )
    if shape[0] == 0:
        raise SourceError(field, f"the source contains no samples (shape {shape})")


# Loading, in the worker process.


def load_samples(source: DataSource, field: str, role: str, spec: TensorSpec, limit: int | None = None) -> Samples:
    """Load up to limit samples (batch axis first) for the model input spec, with labels when known.

    role is "calibration" or "evaluation" and picks the half of a built-in source. Raises SourceError
    when the data is missing, undecodable or does not fit the input.
    """
    if role not in ROLES:
        raise ValueError(f"invalid role {role!r}: expected one of {ROLES}")
    name = builtin_name(source)
    labels: np.ndarray | None = None
    if name == DEMO_PHOTOS:
        inputs = _demo_photo_samples(source.preprocess, role, limit)
    elif name == DIGITS:
        inputs, labels = _digits_samples(spec, role)
    elif name:
        raise SourceError(f"{field}.images", f"unknown built-in source {source.images!r}")
    elif source.images:
        inputs = _folder_samples(Path(source.images), source.preprocess, f"{field}.images", limit)
    else:
        inputs = _npz_samples(Path(source.npz), spec, f"{field}.npz")
    if source.labels:
        labels = _load_labels(Path(source.labels), f"{field}.labels")
        if labels.shape[0] < inputs.shape[0]:
            raise SourceError(
                f"{field}.labels", f"{source.labels!r} has {labels.shape[0]} labels for {inputs.shape[0]} samples"
            )
    if limit is not None:
        inputs = inputs[:limit]
    if labels is not None:
        labels = labels[: inputs.shape[0]]
    check_shape(tuple(inputs.shape), str(inputs.dtype), spec, field)
    logger.info("loaded %d %s samples from %s", inputs.shape[0], role, describe(source))
    return Samples(inputs=np.ascontiguousarray(inputs), labels=labels, description=describe(source))


def _check_labels(path: Path, field: str, classes: int | None = None) -> int:
    """Check that path contains a 1-D integer array of class indices below classes; return its length.

    The dtype and rank come from the .npy header; the values are read only when classes is given.
    Raises SourceError when the file is not .npy, the array has another dtype or rank, or a label is
    outside [0, classes).
    """
    try:
        labels = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise SourceError(field, f"cannot read {str(path)!r} as .npy: {error}") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise SourceError(field, f"{str(path)!r} contains {labels.dtype} {labels.shape}; expected a 1-D integer array")
    if classes is not None and labels.shape[0]:
        outside = np.flatnonzero((labels < 0) | (labels >= classes))
        if outside.size:
            index = int(outside[0])
            raise SourceError(
                field,
                f"{str(path)!r} holds class {labels[index]} at sample {index} ({outside.size} of {labels.shape[0]} "
                f"labels out of range), but the model outputs {classes} scores per sample; labels must be class "
                f"indices from 0 to {classes - 1}",
            )
    return int(labels.shape[0])


def _load_labels(path: Path, field: str) -> np.ndarray:
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise SourceError(field, f"cannot read {str(path)!r} as .npy: {error}") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise SourceError(field, f"{str(path)!r} contains {labels.dtype} {labels.shape}; expected a 1-D integer array")
    return labels.astype(np.int64)


def _preprocess_spec(preprocess: PreprocessConfig) -> PreprocessSpec:
    from edgefleet.orchestrator.compress.calibration import PreprocessSpec

    return PreprocessSpec(
        height=preprocess.height,
        width=preprocess.width,
        mean=preprocess.mean,
        std=preprocess.std,
        scale=preprocess.scale,
        layout=preprocess.layout,
        channel_order=preprocess.channel_order,
        resize_shorter=preprocess.resize_shorter,
    )


def _folder_samples(folder: Path, preprocess: PreprocessConfig, field: str, limit: int | None) -> np.ndarray:
    from edgefleet.orchestrator.compress.calibration import CalibrationError, load_image_folder

    list_images(folder, field)
    try:
        return load_image_folder(folder, _preprocess_spec(preprocess), limit=limit)
    except CalibrationError as error:
        raise SourceError(field, str(error)) from None


def _npz_samples(path: Path, spec: TensorSpec, field: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if spec.name not in archive.files:
                raise SourceError(field, f"{str(path)!r} has no array {spec.name!r}; it contains {archive.files}")
            return np.asarray(archive[spec.name])
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise SourceError(field, f"cannot read {str(path)!r}: {error}") from None


def split_demo_photos(photos: Sequence[Photo]) -> tuple[list[Photo], list[Photo]]:
    """Split photos by source, alternating: calibration gets photos 0, 2, 4..., evaluation 1, 3, 5..."""
    return list(photos[0::2]), list(photos[1::2])


def random_crops(image: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Return the whole image and count-1 random crops (35-100 % of the shorter side), half mirrored."""
    height, width = image.shape[:2]
    crops = [image]
    while len(crops) < count:
        side = rng.uniform(0.35, 1.0) * min(height, width)
        aspect = rng.uniform(0.75, 4 / 3)
        crop_h = int(min(height, side * math.sqrt(aspect)))
        crop_w = int(min(width, side / math.sqrt(aspect)))
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        crop = image[top : top + crop_h, left : left + crop_w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crops.append(np.ascontiguousarray(crop))
    return crops[:count]


def _demo_photo_samples(preprocess: PreprocessConfig, role: str, limit: int | None) -> np.ndarray:
    from edgefleet.demo.images import demo_photos
    from edgefleet.orchestrator.compress.calibration import preprocess_image

    calibration, evaluation = split_demo_photos(demo_photos())
    photos = calibration if role == "calibration" else evaluation
    if role == "calibration":
        per_photo = max(1, math.ceil((limit or len(photos)) / len(photos)))
        rng = np.random.default_rng(_CALIBRATION_SEED)
    else:
        per_photo = DEMO_EVAL_CROPS
        rng = np.random.default_rng(_EVALUATION_SEED)
    spec = _preprocess_spec(preprocess)
    logger.info("%s photos: %s, %d crops each", role, [p.name for p in photos], per_photo)
    return np.stack([preprocess_image(crop, spec) for p in photos for crop in random_crops(p.image, per_photo, rng)])


def _digits_samples(spec: TensorSpec, role: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / np.float32(_DIGITS_PIXEL_MAX)
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED, stratify=labels
    )
    chosen_x, chosen_y = (train_x, train_y) if role == "calibration" else (test_x, test_y)
    channels_first = spec.shape[1] == 1
    height, width = (spec.shape[2], spec.shape[3]) if channels_first else (spec.shape[1], spec.shape[2])
    batch = _resize_bilinear(chosen_x[:, None], height if height > 0 else 8, width if width > 0 else 8)
    if not channels_first:
        batch = batch.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(batch, dtype=np.float32), chosen_y


def _resize_bilinear(batch: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (N, C, H, W) float32 images as torch's bilinear interpolate with align_corners=False."""
    if batch.shape[2:] == (height, width):
        return batch
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(batch))
    return F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False).numpy()
