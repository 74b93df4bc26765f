"""Tests for the demo assets: the cache, the real exported models, the photos and the preprocessing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ai_edge_litert.interpreter import Interpreter

from edgefleet.common.models import TensorSpec
from edgefleet.demo import assets, cache, images

CAT_CLASSES = range(281, 286)
ONNX_SPEC = TensorSpec(name="input", dtype="float32", shape=(1, 3, 224, 224))
# Logits of the three runtimes differ by about 1e-5 on the demo photos (float32 kernels).
LOGITS_TOLERANCE = 1e-3


# --- cache -----------------------------------------------------------------------------------------------


class CountingBuilder:
    """A build callback that writes fixed bytes and counts its calls."""

    def __init__(self, data: bytes = b"model bytes") -> None:
        self.data = data
        self.calls = 0

    def __call__(self, target: Path) -> None:
        self.calls += 1
        target.write_bytes(self.data)


def test_cache_builds_once(tmp_path: Path) -> None:
    builder = CountingBuilder()
    first = cache.ensure_file(tmp_path / "model.bin", "recipe-1", builder)
    mtime = first.path.stat().st_mtime_ns
    second = cache.ensure_file(tmp_path / "model.bin", "recipe-1", builder)
    assert builder.calls == 1
    assert second.path.stat().st_mtime_ns == mtime
    assert second.sha256 == first.sha256


def test_cache_writes_sidecar(tmp_path: Path) -> None:
    entry = cache.ensure_file(tmp_path / "model.bin", "recipe-1", CountingBuilder(b"abc"))
    assert entry.path.read_bytes() == b"abc"
    assert entry.size == 3
    assert cache.sidecar_path(entry.path).is_file()
    assert entry.sha256 == cache.sha256_file(entry.path)


def test_cache_rebuilds_corrupted_file(tmp_path: Path) -> None:
    builder = CountingBuilder()
    entry = cache.ensure_file(tmp_path / "model.bin", "recipe-1", builder)
    entry.path.write_bytes(b"model bytez")  # Same size, different content.
    rebuilt = cache.ensure_file(tmp_path / "model.bin", "recipe-1", builder)
    assert builder.calls == 2
    assert rebuilt.path.read_bytes() == b"model bytes"


def test_cache_rebuilds_truncated_file(tmp_path: Path) -> None:
    builder = CountingBuilder()
    entry = cache.ensure_file(tmp_path / "model.bin", "recipe-1", builder)
    entry.path.write_bytes(b"model")
    cache.ensure_file(tmp_path / "model.bin", "recipe-1", builder)
    assert builder.calls == 2


def test_cache_rebuilds_missing_sidecar(tmp_path: Path) -> None:
    builder = CountingBuilder()
    entry = cache.ensure_file(tmp_path / "model.bin", "recipe-1", builder)
    cache.sidecar_path(entry.path).unlink()
    cache.ensure_file(tmp_path / "model.bin", "recipe-1", builder)
    assert builder.calls == 2


def test_cache_rebuilds_other_recipe(tmp_path: Path) -> None:
    builder = CountingBuilder()
    cache.ensure_file(tmp_path / "model.bin", "recipe-1", builder)
    cache.ensure_file(tmp_path / "model.bin", "recipe-2", builder)
    assert builder.calls == 2


def test_cache_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def failing(target: Path) -> None:
        target.write_bytes(b"half a mod")
        raise RuntimeError("converter crashed")

    with pytest.raises(RuntimeError, match="converter crashed"):
        cache.ensure_file(tmp_path / "model.bin", "recipe-1", failing)
    leftovers = sorted(path.name for path in tmp_path.iterdir() if not path.name.endswith(".lock"))
    assert leftovers == []


def test_cache_rejects_pinned_mismatch(tmp_path: Path) -> None:
    with pytest.raises(cache.AssetError, match="expected 00"):
        cache.ensure_file(tmp_path / "model.bin", "recipe-1", CountingBuilder(), expected_sha256="00" * 32)
    assert not (tmp_path / "model.bin").exists()


def test_cache_removes_stale_partials(tmp_path: Path) -> None:
    stale = tmp_path / ".model.bin.abc123.partial"
    stale.write_bytes(b"left by a killed build")
    cache.ensure_file(tmp_path / "model.bin", "recipe-1", CountingBuilder())
    assert not stale.exists()


def test_cache_files_readable_by_all(tmp_path: Path) -> None:
    entry = cache.ensure_file(tmp_path / "model.bin", "recipe-1", CountingBuilder())
    assert entry.path.stat().st_mode & 0o777 == 0o644
    assert cache.sidecar_path(entry.path).stat().st_mode & 0o777 == 0o644


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    assert cache.default_cache_dir() == tmp_path


def test_cache_dir_default_in_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    repo = Path(cache.__file__).resolve().parents[2]
    assert cache.default_cache_dir() == repo / ".cache" / "edgefleet"


# --- photos, labels and preprocessing --------------------------------------------------------------------


def test_photos_are_rgb_uint8() -> None:
    for photo in images.demo_photos():
        assert photo.image.dtype == np.uint8, photo.name
        assert photo.image.ndim == 3, photo.name
        assert photo.image.shape[2] == 3, photo.name


def test_photos_include_named() -> None:
    names = [photo.name for photo in images.demo_photos()]
    assert {"chelsea", "coffee", "astronaut", "rocket"} <= set(names)
    assert len(names) == len(set(names))


def test_photos_are_read_only() -> None:
    photo = images.demo_photos()[0]
    with pytest.raises(ValueError, match="read-only"):
        photo.image[0, 0, 0] = 0


def test_photo_files_match_photos(tmp_path: Path) -> None:
    from PIL import Image

    paths = assets.ensure_photos(tmp_path)
    photos = images.demo_photos()
    assert [p.name for p in paths] == [f"{photo.name}.png" for photo in photos]
    assert np.array_equal(np.asarray(Image.open(paths[0])), photos[0].image)


def test_labels_file_lines(tmp_path: Path) -> None:
    lines = assets.ensure_imagenet_labels(tmp_path).read_text(encoding="utf-8").splitlines()
    assert lines == images.imagenet_labels()


def test_labels_count() -> None:
    assert len(images.imagenet_labels()) == 1000


def test_labels_known_classes() -> None:
    labels = images.imagenet_labels()
    assert labels[281] == "tabby cat"
    assert labels[967] == "espresso"


def test_layout_nchw() -> None:
    assert images.infer_layout((1, 3, 224, 224)) == "NCHW"


def test_layout_nhwc() -> None:
    assert images.infer_layout((1, 224, 224, 3)) == "NHWC"


@pytest.mark.parametrize("shape", [(1, 3, 5, 3), (1, 4, 224, 224), (3, 224, 224)])
def test_layout_rejects_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="shape"):
        images.infer_layout(shape)


def test_preprocess_nchw_shape() -> None:
    tensor = images.preprocess(images.demo_photos()[0].image, ONNX_SPEC)
    assert tensor.shape == (1, 3, 224, 224)
    assert tensor.dtype == np.float32


def test_preprocess_nhwc_shape() -> None:
    spec = TensorSpec(name="x", dtype="float32", shape=(1, 224, 224, 3))
    tensor = images.preprocess(images.demo_photos()[0].image, spec)
    assert tensor.shape == (1, 224, 224, 3)
    assert tensor.dtype == np.float32


def test_preprocess_layouts_agree() -> None:
    image = images.demo_photos()[0].image
    nchw = images.preprocess(image, ONNX_SPEC)
    nhwc = images.preprocess(image, TensorSpec(name="x", dtype="float32", shape=(1, 224, 224, 3)))
    np.testing.assert_array_equal(nchw.transpose(0, 2, 3, 1), nhwc)


def test_preprocess_dynamic_batch() -> None:
    spec = TensorSpec(name="x", dtype="float32", shape=(-1, 3, 224, 224))
    assert images.preprocess(images.demo_photos()[0].image, spec).shape == (1, 3, 224, 224)


def test_preprocess_non_square() -> None:
    spec = TensorSpec(name="x", dtype="float32", shape=(1, 144, 256, 3))
    assert images.preprocess(images.demo_photos()[0].image, spec).shape == (1, 144, 256, 3)


def test_preprocess_normalisation() -> None:
    image = np.zeros((300, 400, 3), dtype=np.uint8)
    image[..., 0] = 127
    image[..., 1] = 255
    tensor = images.preprocess(image, ONNX_SPEC)
    np.testing.assert_allclose(tensor[0, 0], 0.0)
    np.testing.assert_allclose(tensor[0, 1], 128 / 128)
    np.testing.assert_allclose(tensor[0, 2], -127 / 128)


def test_preprocess_centre_crop() -> None:
    # A wide image with a red centre and blue sides: the crop keeps only the centre.
    image = np.zeros((100, 400, 3), dtype=np.uint8)
    image[:, :, 2] = 255
    image[:, 140:260] = (255, 0, 0)
    pixels = images.resize_and_crop(image, 224, 224, crop_fraction=0.875)
    assert pixels.shape == (224, 224, 3)
    assert pixels[:, 20:204, 0].min() == 255
    assert pixels[:, 20:204, 2].max() == 0


def test_preprocess_grey_and_rgba() -> None:
    grey = np.full((50, 60), 200, dtype=np.uint8)
    rgba = np.full((50, 60, 4), 200, dtype=np.uint8)
    expected = images.preprocess(np.full((50, 60, 3), 200, dtype=np.uint8), ONNX_SPEC)
    np.testing.assert_array_equal(images.preprocess(grey, ONNX_SPEC), expected)
    np.testing.assert_array_equal(images.preprocess(rgba, ONNX_SPEC), expected)


def test_preprocess_quantized_int8() -> None:
    spec = TensorSpec(name="x", dtype="int8", shape=(1, 8, 8, 3), scale=1 / 128, zero_point=-1)
    image = np.full((8, 8, 3), 255, dtype=np.uint8)
    tensor = images.preprocess(image, spec)
    assert tensor.dtype == np.int8
    assert int(tensor.max()) == 127  # (255 - 127) / 128 = 1.0 -> 128 - 1.


def test_preprocess_raw_uint8() -> None:
    spec = TensorSpec(name="x", dtype="uint8", shape=(1, 8, 8, 3))
    image = np.full((8, 8, 3), 42, dtype=np.uint8)
    tensor = images.preprocess(image, spec)
    assert tensor.dtype == np.uint8
    assert int(tensor.min()) == 42


def test_preprocess_rejects_dynamic_size() -> None:
    spec = TensorSpec(name="x", dtype="float32", shape=(1, 3, -1, -1))
    with pytest.raises(ValueError, match="dynamic spatial axes"):
        images.preprocess(images.demo_photos()[0].image, spec)


def test_preprocess_rejects_float_image() -> None:
    with pytest.raises(ValueError, match="expected uint8"):
        images.preprocess(np.zeros((10, 10, 3), dtype=np.float32), ONNX_SPEC)


def test_top_k_order() -> None:
    logits = np.zeros(1000, dtype=np.float32)
    logits[967] = 5.0
    logits[281] = 3.0
    predictions = images.top_k(logits, k=2)
    assert [prediction.index for prediction in predictions] == [967, 281]
    assert predictions[0].label == "espresso"
    assert predictions[0].probability > predictions[1].probability


# --- MediaPipe models ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mediapipe_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private cache seeded with the wheel from the shared cache, so no test downloads it twice."""
    shared_wheel = assets.ensure_mediapipe_wheel()
    cache_dir = tmp_path_factory.mktemp("mediapipe-cache")
    (cache_dir / "wheels").mkdir()
    shutil.copy2(shared_wheel, cache_dir / "wheels" / shared_wheel.name)
    sidecar = cache.sidecar_path(shared_wheel)
    shutil.copy2(sidecar, cache_dir / "wheels" / sidecar.name)
    return cache_dir


def test_mediapipe_lists_known_models(mediapipe_cache: Path) -> None:
    members = assets.list_mediapipe_models(mediapipe_cache)
    for model in assets.MEDIAPIPE_MODELS.values():
        assert model.member in members, model.name


def test_mediapipe_extract_warm(mediapipe_cache: Path) -> None:
    path = assets.mediapipe_tflite(mediapipe_cache, "face_detector")
    mtime = path.stat().st_mtime_ns
    again = assets.mediapipe_tflite(mediapipe_cache, "face_detector")
    assert again == path
    assert again.stat().st_mtime_ns == mtime


def test_mediapipe_rebuilds_corrupted(mediapipe_cache: Path) -> None:
    path = assets.mediapipe_tflite(mediapipe_cache, "palm_detector")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    rebuilt = assets.mediapipe_tflite(mediapipe_cache, "palm_detector")
    assert cache.sha256_file(rebuilt) == assets.MEDIAPIPE_MODELS["palm_detector"].sha256


def test_mediapipe_member_by_path(mediapipe_cache: Path) -> None:
    member = "mediapipe/modules/iris_landmark/iris_landmark.tflite"
    path = assets.mediapipe_tflite(mediapipe_cache, member)
    assert path.name == "iris_landmark.tflite"


def test_mediapipe_unknown_name(mediapipe_cache: Path) -> None:
    with pytest.raises(KeyError, match="unknown mediapipe model"):
        assets.mediapipe_tflite(mediapipe_cache, "cat_detector")


def test_mediapipe_missing_member(mediapipe_cache: Path) -> None:
    with pytest.raises(KeyError, match="is not in"):
        assets.mediapipe_tflite(mediapipe_cache, "mediapipe/modules/none/absent.tflite")


def test_mediapipe_models_run(mediapipe_cache: Path) -> None:
    for model in assets.MEDIAPIPE_MODELS.values():
        interpreter = Interpreter(model_path=str(assets.mediapipe_tflite(mediapipe_cache, model.name)))
        interpreter.allocate_tensors()
        detail = interpreter.get_input_details()[0]
        assert tuple(int(dim) for dim in detail["shape"]) == model.input_shape, model.name
        interpreter.set_tensor(detail["index"], np.zeros(model.input_shape, dtype=np.float32))
        interpreter.invoke()


def test_face_detector_prefers_astronaut(mediapipe_cache: Path) -> None:
    # BlazeFace takes RGB in [-1, 1]. Only the astronaut portrait shows a frontal face.
    interpreter = Interpreter(model_path=str(assets.mediapipe_tflite(mediapipe_cache, "face_detector")))
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    scores_index = next(
        detail["index"] for detail in interpreter.get_output_details() if detail["name"] == "classificators"
    )
    spec = TensorSpec(name="input", dtype="float32", shape=(1, 128, 128, 3))
    best_logit = {}
    for photo in images.demo_photos():
        tensor = images.preprocess(photo.image, spec, mean=127.5, std=127.5, crop_fraction=1.0)
        interpreter.set_tensor(input_index, tensor)
        interpreter.invoke()
        best_logit[photo.name] = float(interpreter.get_tensor(scores_index).max())
    assert max(best_logit, key=best_logit.__getitem__) == "astronaut"
    assert best_logit["astronaut"] > 0.0  # Probability above 0.5.


# --- EfficientNet-Lite0 exports --------------------------------------------------------------------------


def _onnx_logits(session: ort.InferenceSession, image: np.ndarray) -> np.ndarray:
    return np.asarray(session.run(["logits"], {"input": images.preprocess(image, ONNX_SPEC)})[0])


def _tflite_logits(interpreter: Interpreter, image: np.ndarray) -> np.ndarray:
    detail = interpreter.get_input_details()[0]
    spec = TensorSpec(name=detail["name"], dtype="float32", shape=tuple(int(dim) for dim in detail["shape"]))
    interpreter.set_tensor(detail["index"], images.preprocess(image, spec))
    interpreter.invoke()
    return np.asarray(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))


@pytest.fixture(scope="module")
def onnx_session() -> ort.InferenceSession:
    path = assets.ensure_efficientnet_lite0_onnx()
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tflite_interpreter() -> Interpreter:
    try:
        path = assets.ensure_efficientnet_lite0_tflite()
    except ImportError as exc:
        pytest.skip(f"no cached TFLite export and no converter: {exc}")
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    return interpreter


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return next(photo.image for photo in images.demo_photos() if photo.name == "chelsea")


@pytest.mark.slow
def test_onnx_io() -> None:
    model = onnx.load(str(assets.ensure_efficientnet_lite0_onnx()))
    graph_input = model.graph.input[0]
    dims = [dim.dim_value for dim in graph_input.type.tensor_type.shape.dim]
    assert graph_input.name == "input"
    assert dims == [1, 3, 224, 224]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].name == "logits"
    assert [dim.dim_value for dim in model.graph.output[0].type.tensor_type.shape.dim] == [1, 1000]
    opset = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    assert opset >= 13


@pytest.mark.slow
def test_onnx_classifies_cat(onnx_session: ort.InferenceSession, chelsea: np.ndarray) -> None:
    top1 = images.top_k(_onnx_logits(onnx_session, chelsea), k=1)[0]
    assert top1.index in CAT_CLASSES, top1


@pytest.mark.slow
def test_onnx_photos_expected_classes(onnx_session: ort.InferenceSession) -> None:
    for photo in images.demo_photos():
        if photo.imagenet_classes:
            top1 = images.top_k(_onnx_logits(onnx_session, photo.image), k=1)[0]
            assert top1.index in photo.imagenet_classes, (photo.name, top1)


@pytest.mark.slow
def test_onnx_matches_pytorch(onnx_session: ort.InferenceSession) -> None:
    import torch

    model = assets.load_efficientnet_lite0()
    for photo in images.demo_photos():
        tensor = images.preprocess(photo.image, ONNX_SPEC)
        with torch.no_grad():
            expected = model(torch.from_numpy(tensor)).numpy()
        np.testing.assert_allclose(_onnx_logits(onnx_session, photo.image), expected, atol=LOGITS_TOLERANCE)


@pytest.mark.slow
def test_tflite_input_nhwc(tflite_interpreter: Interpreter) -> None:
    detail = tflite_interpreter.get_input_details()[0]
    assert list(detail["shape"]) == [1, 224, 224, 3]
    assert detail["dtype"] == np.float32
    assert assets.TFLITE_INPUT_LAYOUT == "NHWC"


@pytest.mark.slow
def test_tflite_classifies_cat(tflite_interpreter: Interpreter, chelsea: np.ndarray) -> None:
    top1 = images.top_k(_tflite_logits(tflite_interpreter, chelsea), k=1)[0]
    assert top1.index in CAT_CLASSES, top1


@pytest.mark.slow
def test_tflite_matches_onnx(tflite_interpreter: Interpreter, onnx_session: ort.InferenceSession) -> None:
    for photo in images.demo_photos():
        onnx_logits = _onnx_logits(onnx_session, photo.image)
        tflite_logits = _tflite_logits(tflite_interpreter, photo.image)
        assert int(tflite_logits.argmax()) == int(onnx_logits.argmax()), photo.name
        np.testing.assert_allclose(tflite_logits, onnx_logits, atol=LOGITS_TOLERANCE, err_msg=photo.name)


@pytest.fixture(scope="module")
def private_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export into a private cache; one export for the module because each takes 5 to 15 s."""
    return assets.ensure_efficientnet_lite0_onnx(tmp_path_factory.mktemp("onnx-cache"))


@pytest.mark.slow
def test_onnx_cache_warm(private_onnx: Path) -> None:
    mtime = private_onnx.stat().st_mtime_ns
    again = assets.ensure_efficientnet_lite0_onnx(private_onnx.parent)
    assert again.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_onnx_rebuild_is_identical(private_onnx: Path) -> None:
    digest = cache.sha256_file(private_onnx)
    with private_onnx.open("r+b") as stream:
        stream.seek(private_onnx.stat().st_size // 2)
        stream.write(b"\x00" * 64)
    rebuilt = assets.ensure_efficientnet_lite0_onnx(private_onnx.parent)
    assert cache.sha256_file(rebuilt) == digest  # The export is deterministic.


@pytest.mark.slow
def test_fetch_command_warm() -> None:
    assets.fetch(skip_tflite=True)
    env = {**os.environ, cache.CACHE_ENV: str(cache.default_cache_dir())}
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet.demo.assets", "fetch", "--skip-tflite"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "efficientnet_lite0.onnx" in result.stdout
    assert "building" not in result.stderr
