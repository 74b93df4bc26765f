"""Calibration data readers for onnxruntime static quantization: arrays, .npz files and image folders."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from edgefleet.common.images import read_upright_rgb
from edgefleet.common.models import TensorSpec

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LAYOUTS = ("NCHW", "NHWC")
CHANNEL_ORDERS = ("RGB", "BGR")

_ONNX_TO_NUMPY: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.BOOL: "bool",
}


class CalibrationError(ValueError):
    """Calibration data that does not fit the model input, or a source with no usable samples."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How to turn an image file into one model input sample.

    The image is resized so its shorter side is `resize_shorter` pixels (0 means `max(height, width)`),
    center-cropped to `height` x `width`, converted to float as `pixel * scale`, then normalized per
    channel as `(value - mean) / std` in `channel_order`.
    """

    height: int = 224
    width: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    scale: float = 1.0 / 255.0
    layout: str = "NCHW"
    channel_order: str = "RGB"
    resize_shorter: int = 0

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise CalibrationError(
                f"invalid preprocessing size {self.height}x{self.width}: height and width must be > 0"
            )
        if self.layout not in LAYOUTS:
            raise CalibrationError(f"invalid layout {self.layout!r}: expected one of {LAYOUTS}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise CalibrationError(f"invalid channel_order {self.channel_order!r}: expected one of {CHANNEL_ORDERS}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise CalibrationError(f"mean {self.mean} and std {self.std} must have 3 values each")
        if any(s == 0 for s in self.std):
            raise CalibrationError(f"invalid std {self.std}: values must be non-zero")


def model_input_spec(model_path: Path, input_name: str | None = None) -> TensorSpec:
    """Read the name, numpy dtype and shape (-1 for a dynamic axis) of one graph input of an ONNX model.

    Raises CalibrationError when input_name is not an input, or when the model has several inputs and
    input_name is None.
    """
    model = onnx.load(str(model_path), load_external_data=False)
    initializer_names = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializer_names]
    if input_name is None:
        if len(inputs) != 1:
            names = [i.name for i in inputs]
            raise CalibrationError(f"{model_path} has inputs {names}: pass input_name to pick one")
        chosen = inputs[0]
    else:
        matches = [i for i in inputs if i.name == input_name]
        if not matches:
            names = [i.name for i in inputs]
            raise CalibrationError(f"input {input_name!r} not found in {model_path}: inputs are {names}")
        chosen = matches[0]
    tensor_type = chosen.type.tensor_type
    dtype = _ONNX_TO_NUMPY.get(tensor_type.elem_type, f"onnx-type-{tensor_type.elem_type}")
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor_type.shape.dim)
    dim_names = tuple(d.dim_param if d.HasField("dim_param") else "" for d in tensor_type.shape.dim)
    return TensorSpec(name=chosen.name, dtype=dtype, shape=shape, dim_names=dim_names)


def check_samples(samples: np.ndarray, spec: TensorSpec) -> None:
    """Check that samples (batch axis first) match the input's rank, fixed axes and dtype, and are finite.

    Raises CalibrationError naming the expected and received shape or dtype, or the samples with NaN or
    infinite values.
    """
    expected = "(" + ", ".join("N" if d < 0 else str(d) for d in spec.shape) + ")"
    if samples.dtype != np.dtype(spec.dtype):
        raise CalibrationError(
            f"calibration data for input {spec.name!r} has dtype {samples.dtype}, expected {spec.dtype}: "
            f"convert it with .astype({spec.dtype!r})"
        )
    if samples.ndim != len(spec.shape):
        raise CalibrationError(
            f"calibration data for input {spec.name!r} has shape {samples.shape}, expected {expected} "
            f"with the batch axis first"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, samples.shape, strict=True)):
        if axis == 0 or want < 0:
            continue
        if want != got:
            raise CalibrationError(
                f"calibration data for input {spec.name!r} has shape {samples.shape}, expected {expected}: "
                f"axis {axis} is {got}, expected {want}"
            )
    if samples.shape[0] == 0:
        raise CalibrationError(f"calibration data for input {spec.name!r} is empty: shape {samples.shape}")
    if samples.dtype.kind in "fc":
        finite = np.isfinite(samples).reshape(samples.shape[0], -1).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise CalibrationError(
                f"calibration data for input {spec.name!r} has NaN or infinite values in {bad.size} of "
                f"{samples.shape[0]} samples (the first is sample {bad[0]}); fix or drop those samples"
            )


class ArrayCalibrationReader(CalibrationDataReader):
    """Feed the samples of one array (batch axis first) to the onnxruntime calibrator in batches."""

    def __init__(self, spec: TensorSpec, samples: np.ndarray, *, batch_size: int = 1) -> None:
        check_samples(samples, spec)
        if batch_size <= 0:
            raise CalibrationError(f"invalid batch_size {batch_size}: must be > 0")
        if spec.shape[0] > 0 and batch_size != spec.shape[0]:
            logger.debug("input %s has a fixed batch of %d; using it", spec.name, spec.shape[0])
            batch_size = spec.shape[0]
            if samples.shape[0] % batch_size:
                raise CalibrationError(
                    f"input {spec.name!r} has a fixed batch of {batch_size} but {samples.shape[0]} "
                    f"calibration samples were given: pass a multiple of {batch_size}"
                )
        self.spec = spec
        self.samples = samples
        self.batch_size = batch_size
        self._batches: Iterator[dict[str, np.ndarray]] = self._iterate()

    def __len__(self) -> int:
        return int(self.samples.shape[0])

    def _iterate(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, self.samples.shape[0], self.batch_size):
            yield {self.spec.name: self.samples[start : start + self.batch_size]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        """Return the next batch as {input name: array}, or None when all samples were returned."""
        return next(self._batches, None)

    def rewind(self) -> None:
        """Start again from the first sample."""
        self._batches = self._iterate()


def reader_from_array(
    model_path: Path, samples: np.ndarray, *, input_name: str | None = None, batch_size: int = 1
) -> ArrayCalibrationReader:
    """Build a reader over an in-memory array for the model's input.

    Raises CalibrationError when the array's shape or dtype does not match the input.
    """
    return ArrayCalibrationReader(model_input_spec(model_path, input_name), samples, batch_size=batch_size)


def reader_from_npz(
    model_path: Path, npz_path: Path, *, input_name: str | None = None, batch_size: int = 1
) -> ArrayCalibrationReader:
    """Build a reader over the array stored under the input's name in an .npz file.

    Raises CalibrationError when the file lacks that key or the array does not match the input.
    """
    spec = model_input_spec(model_path, input_name)
    with np.load(npz_path, allow_pickle=False) as archive:
        if spec.name not in archive.files:
            raise CalibrationError(
                f"{npz_path} has no array named {spec.name!r} (the model input): it contains {archive.files}"
            )
        samples = archive[spec.name]
    return ArrayCalibrationReader(spec, samples, batch_size=batch_size)


def list_images(folder: Path) -> list[Path]:
    """List the image files directly inside folder, sorted by name.

    Raises CalibrationError when folder is missing or contains no file with an image suffix.
    """
    if not folder.is_dir():
        raise CalibrationError(f"calibration image folder {folder} not found or not a directory")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CalibrationError(
            f"calibration image folder {folder} contains no images (suffixes {', '.join(IMAGE_SUFFIXES)})"
        )
    return images


def preprocess_image(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resize, center-crop and normalize one HxWxC uint8 RGB image into a float32 sample (no batch axis)."""
    from PIL import Image

    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3]
    pil = Image.fromarray(image.astype(np.uint8))
    shorter = spec.resize_shorter or max(spec.height, spec.width)
    ratio = shorter / min(pil.width, pil.height)
    resized = pil.resize(
        (max(spec.width, round(pil.width * ratio)), max(spec.height, round(pil.height * ratio))),
        Image.Resampling.BILINEAR,
    )
    left = (resized.width - spec.width) // 2
    top = (resized.height - spec.height) // 2
    cropped = np.asarray(resized.crop((left, top, left + spec.width, top + spec.height)), dtype=np.float32)
    if spec.channel_order == "BGR":
        cropped = cropped[..., ::-1]
    # mean and std are given in spec.channel_order, so they apply after the channel swap.
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    sample = (cropped * np.float32(spec.scale) - mean) / std
    if spec.layout == "NCHW":
        sample = sample.transpose(2, 0, 1)
    return np.ascontiguousarray(sample, dtype=np.float32)


def load_image_folder(folder: Path, spec: PreprocessSpec, *, limit: int | None = None) -> np.ndarray:
    """Load and preprocess the images of folder into one float32 array with the batch axis first.

    Raises CalibrationError when the folder is missing or empty, or an image cannot be decoded.
    """
    try:
        from PIL import UnidentifiedImageError
    except ImportError as error:  # pragma: no cover - pillow ships with the demo extra
        raise CalibrationError(
            "loading calibration images needs pillow: install edgefleet[demo] or pip install pillow"
        ) from error
    paths = list_images(folder)
    if limit is not None:
        paths = paths[:limit]
    samples = []
    for path in paths:
        try:
            # Read as edgefleet-agent infer reads an image: upright, with 16-bit grayscale scaled.
            upright = read_upright_rgb(path)
        except (OSError, UnidentifiedImageError) as error:
            raise CalibrationError(f"cannot decode calibration image {path}: {error}") from error
        if upright.exif_error:
            logger.warning(
                "ignored the EXIF data of calibration image %s, which cannot be read (%s); "
                "the image is used as stored, without EXIF orientation",
                path,
                upright.exif_error,
            )
        samples.append(preprocess_image(np.asarray(upright.rgb), spec))
    return np.stack(samples)


def reader_from_images(
    model_path: Path,
    folder: Path,
    spec: PreprocessSpec,
    *,
    input_name: str | None = None,
    limit: int | None = None,
    batch_size: int = 1,
) -> ArrayCalibrationReader:
    """Build a reader over a folder of images preprocessed with spec.

    Raises CalibrationError when the folder contains no images or the preprocessed samples do not match
    the model input (for example a 224x224 spec for a 320x320 input).
    """
    samples = load_image_folder(folder, spec, limit=limit)
    return ArrayCalibrationReader(model_input_spec(model_path, input_name), samples, batch_size=batch_size)
