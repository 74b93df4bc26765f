"""edgefleet-agent infer against a real local API server with real onnxruntime models."""

from __future__ import annotations

import grp
import os
import shutil
import socket as unix_socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from edgefleet.agent import infer_cli
from edgefleet.agent.local_api import LocalApiServer
from edgefleet.agent.main import main
from edgefleet.agent.runtime.host import ModelHost
from edgefleet.agent.tensor_socket import TensorSocketServer
from edgefleet.common.errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from tests.photos import NOT_TIFF_EXIF, corrupt_exif, write_sideways_photo

CLASSES = 5
# The RGB colour of the test image. A uniform image keeps its colour through the resize and the crop.
COLOUR = (200, 40, 90)
WEIGHT = np.random.default_rng(7).standard_normal((3, CLASSES)).astype(np.float32)


def write_classifier(
    path: Path, shape: list[int | str], channels_first: bool = True, input_name: str = "image"
) -> Path:
    """Write logits = mean over the pixels of each channel @ WEIGHT, for images of the given input shape."""
    graph = helper.make_graph(
        [
            helper.make_node(
                "ReduceMean", [input_name], ["channels"], axes=[2, 3] if channels_first else [1, 2], keepdims=0
            ),
            helper.make_node("MatMul", ["channels", "weight"], ["logits"]),
        ],
        "classifier",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [shape[0], CLASSES])],
        [helper.make_tensor("weight", TensorProto.FLOAT, WEIGHT.shape, WEIGHT.ravel().tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_vector_model(path: Path) -> Path:
    """Write y = relu(x) with x float32 of shape (1, 4): a model that takes no image."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "vector",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def expected_ranking(mean: tuple[float, ...], std: tuple[float, ...]) -> list[int]:
    """Return the class indices of the test image, best first, as the classifier ranks them."""
    channels = (np.asarray(COLOUR, dtype=np.float32) - np.asarray(mean)) / np.asarray(std)
    logits = channels.astype(np.float32) @ WEIGHT
    return [int(i) for i in np.argsort(logits)[::-1]]


def printed_classes(line: str) -> list[int]:
    """Return the class indices of one output line "PATH: I LABEL (SCORE), ...  [VARIANT, MS]"."""
    ranked = line.split(": ", 1)[1].rsplit("  [", 1)[0]
    return [int(entry.split(" ", 1)[0]) for entry in ranked.split(", ")]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove the agent settings of the environment, which change the default socket."""
    for name in ("EDGEFLEET_SOCKET", "EDGEFLEET_STATE_DIR", "EDGEFLEET_CONFIG"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelHost]:
    folder = tmp_path_factory.mktemp("models")
    with ModelHost(default_threads=1) as model_host:
        models = {
            "fixed": write_classifier(folder / "fixed.onnx", [1, 3, 8, 8]),
            "dyn": write_classifier(folder / "dyn.onnx", [1, 3, "height", "width"]),
            "nhwc": write_classifier(folder / "nhwc.onnx", [1, 8, 8, 3], channels_first=False),
            "vector": write_vector_model(folder / "vector.onnx"),
        }
        for name, path in models.items():
            model_host.install(name, "1", f"{name}:1:source", path, "onnx")
        yield model_host


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Return ./edgefleet-agent in a fresh working directory: the agent's default state directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path / "edgefleet-agent"


@pytest.fixture
def socket(host: ModelHost, state_dir: Path) -> Iterator[Path]:
    """Serve the test models on STATE_DIR/agent.sock, where an agent with default settings serves them."""
    server = LocalApiServer(host, state_dir / "agent.sock")
    server.start()
    yield server.socket_path
    server.stop(grace_s=0)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    Image.new("RGB", (20, 16), COLOUR).save(path)
    return path


def infer(*args: str) -> int:
    return main(["infer", *args])


def test_fixed_model_ranks(socket: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = infer("--socket", str(socket), "--model", "fixed", "--top", str(CLASSES), str(image))

    assert code == EXIT_OK
    assert printed_classes(capsys.readouterr().out) == expected_ranking((127.0,), (128.0,))


def test_channel_mean_std(socket: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mean, std = (250.0, 10.0, 30.0), (2.0, 40.0, 8.0)
    args = ["--mean", "250,10,30", "--std", "2,40,8", "--top", str(CLASSES)]

    code = infer("--socket", str(socket), "--model", "fixed", *args, str(image))

    assert code == EXIT_OK
    assert printed_classes(capsys.readouterr().out) == expected_ranking(mean, std)


def test_nhwc_model(socket: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = infer("--socket", str(socket), "--model", "nhwc", "--top", str(CLASSES), str(image))

    assert code == EXIT_OK
    assert printed_classes(capsys.readouterr().out) == expected_ranking((127.0,), (128.0,))


def test_top_limits_classes(socket: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = infer("--socket", str(socket), "--model", "fixed", "--top", "2", str(image))

    assert code == EXIT_OK
    assert len(printed_classes(capsys.readouterr().out)) == 2


def test_labels_printed(socket: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(CLASSES)), encoding="utf-8-sig")
    best = expected_ranking((127.0,), (128.0,))[0]

    code = infer("--socket", str(socket), "--model", "fixed", "--labels", str(labels), "--top", "1", str(image))

    assert code == EXIT_OK
    assert f": {best} class {best} (" in capsys.readouterr().out


def test_labels_missing(socket: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = tmp_path / "nope.txt"

    code = infer("--socket", str(socket), "--model", "fixed", "--labels", str(labels), str(image))

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert f"labels file {labels} not found" in error
    assert "UTF-8 text file with one class label per line" in error
    assert error.count("\n") == 1


def test_labels_too_few(socket: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(CLASSES - 1)), encoding="utf-8")

    code = infer("--socket", str(socket), "--model", "fixed", "--labels", str(labels), str(image))

    output = capsys.readouterr()
    assert code == EXIT_USAGE
    assert f"labels file {labels} has {CLASSES - 1} lines, but model 'fixed' has {CLASSES} classes" in output.err
    assert "one class label per line, in class index order" in output.err
    assert output.err.count("\n") == 1
    assert output.out == ""


def test_labels_empty(socket: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("", encoding="utf-8")

    code = infer("--socket", str(socket), "--model", "fixed", "--labels", str(labels), str(image))

    output = capsys.readouterr()
    assert code == EXIT_USAGE
    assert f"labels file {labels} is empty" in output.err
    assert output.out == ""


def test_labels_too_many_warned(
    socket: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("background\n" + "".join(f"class {i}\n" for i in range(CLASSES)), encoding="utf-8")

    code = infer("--socket", str(socket), "--model", "fixed", "--labels", str(labels), str(image), str(image))

    output = capsys.readouterr()
    assert code == EXIT_OK
    assert f"labels file {labels} has {CLASSES + 1} lines, but model 'fixed' has {CLASSES} classes" in output.err
    assert output.err.count("\n") == 1
    assert output.out.count(f"{image}: ") == 2


def test_labels_png(socket: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = infer("--socket", str(socket), "--model", "fixed", "--labels", str(image), str(image))

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert f"labels file {image} is not UTF-8 text" in error
    assert "one class label per line" in error


def test_labels_png_process(image: Path) -> None:
    """The installed entry point reports a binary labels file in one line, before it looks for the agent."""
    command = [sys.executable, "-m", "edgefleet.agent.main", "infer", "--model", "fixed", "--labels", str(image)]

    result = subprocess.run([*command, str(image)], capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode == EXIT_USAGE
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_sixteen_bit_grayscale(socket: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    level = 100
    eight_bit = tmp_path / "gray8.png"
    sixteen_bit = tmp_path / "gray16.png"
    Image.new("L", (20, 16), level).save(eight_bit)
    Image.fromarray(np.full((16, 20), level * 257, dtype=np.uint16)).save(sixteen_bit)

    code = infer("--socket", str(socket), "--model", "fixed", "--top", str(CLASSES), str(eight_bit), str(sixteen_bit))

    lines = capsys.readouterr().out.splitlines()
    assert code == EXIT_OK
    with Image.open(sixteen_bit) as opened:
        assert opened.mode.startswith("I")
    scores = [line.split(": ", 1)[1].rsplit("  [", 1)[0] for line in lines]
    assert scores[1] == scores[0]


def test_image_over_pixel_limit(
    socket: Path, image: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Pillow refuses images of more than twice MAX_IMAGE_PIXELS; a low limit replaces a huge image.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)

    code = infer("--socket", str(socket), "--model", "fixed", str(image))

    error = capsys.readouterr().err
    assert code == EXIT_FAILURE
    assert f"{image}: cannot read image: " in error
    assert "Scale the image down first" in error
    assert error.count("\n") == 1


def test_image_over_available_memory(
    socket: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A 1000 x 800 PNG decodes to about 3 MiB (4 bytes per RGB pixel); the device claims 2 MiB free.
    png = tmp_path / "large.png"
    Image.fromarray(np.zeros((800, 1000, 3), dtype=np.uint8)).save(png)
    monkeypatch.setattr(infer_cli, "available_memory_bytes", lambda: 2 << 20)

    code = infer("--socket", str(socket), "--model", "fixed", str(png))

    error = capsys.readouterr().err
    assert code == EXIT_FAILURE
    assert f"{png}: cannot read image: the image is 1000 x 800 pixels (PNG, RGB)" in error
    assert "needs about 4 MiB, more than the 2 MiB of memory available; scale it down first" in error
    assert "or save it as JPEG" in error


def test_image_within_available_memory(
    socket: Path, image: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(infer_cli, "available_memory_bytes", lambda: 64 << 20)

    code = infer("--socket", str(socket), "--model", "fixed", "--top", str(CLASSES), str(image))

    assert code == EXIT_OK
    assert printed_classes(capsys.readouterr().out) == expected_ranking((127.0,), (128.0,))


def test_dynamic_needs_size(socket: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = infer("--socket", str(socket), "--model", "dyn", str(image))

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "dynamic image height or width" in error
    assert "--size HEIGHTxWIDTH" in error


def test_dynamic_with_size(socket: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = infer("--socket", str(socket), "--model", "dyn", "--size", "12x16", "--top", str(CLASSES), str(image))

    assert code == EXIT_OK
    assert printed_classes(capsys.readouterr().out) == expected_ranking((127.0,), (128.0,))


def test_size_mismatch(socket: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = infer("--socket", str(socket), "--model", "fixed", "--size", "224", str(image))

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "--size 224x224 does not fit model fixed, which takes 8x8 images" in error


def test_model_without_image(socket: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = infer("--socket", str(socket), "--model", "vector", str(image))

    assert code == EXIT_USAGE
    assert "not a batch of RGB images" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--top", "-1"),
        ("--top", "0"),
        ("--top", "three"),
        ("--std", "0"),
        ("--std", "-2"),
        ("--std", "nan"),
        ("--std", "1,2"),
        ("--mean", "1,2,3,4"),
        ("--mean", "inf"),
        ("--size", "0x10"),
        ("--size", "big"),
        ("--crop-fraction", "0"),
        ("--crop-fraction", "1.5"),
        ("--crop-fraction", "nan"),
        ("--crop-fraction", "half"),
    ],
)
def test_invalid_flag(flag: str, value: str, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        infer("--model", "fixed", flag, value, str(image))

    error = capsys.readouterr().err
    assert exit_info.value.code == EXIT_USAGE
    assert f"argument {flag}" in error
    assert repr(value) in error or f" {value}:" in error


def test_photo_classified_as_in_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """infer on the demo's cat photo crops it as the demo does, so the real model ranks the same class first."""
    from skimage import data

    from edgefleet.demo import images
    from edgefleet.demo.assets import ensure_efficientnet_lite0_onnx

    photo = data.chelsea()
    path = tmp_path / "chelsea.png"
    Image.fromarray(photo).save(path)
    with ModelHost(default_threads=1) as model_host:
        model_host.install("efficientnet", "1", "efficientnet:1:source", ensure_efficientnet_lite0_onnx(), "onnx")
        served = model_host.get("efficientnet")
        assert served is not None
        spec = served.inputs[0]
        demo_logits = model_host.infer("efficientnet", {spec.name: images.preprocess(photo, spec)}).outputs
        server = LocalApiServer(model_host, tmp_path / "agent.sock")
        server.start()
        try:
            code = infer("--socket", str(server.socket_path), "--model", "efficientnet", "--top", "1", str(path))
        finally:
            server.stop(grace_s=0)

    assert code == EXIT_OK
    assert printed_classes(capsys.readouterr().out) == [int(np.argmax(next(iter(demo_logits.values()))))]


def test_default_socket(socket: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --socket the command finds the socket of an agent started with default settings."""
    code = infer("--model", "fixed", str(image))

    assert code == EXIT_OK, capsys.readouterr().err


def test_state_dir_env_socket(
    socket: Path, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """EDGEFLEET_STATE_DIR moves the default socket for the command as it does for the agent."""
    monkeypatch.chdir(tmp_path / "edgefleet-agent")
    monkeypatch.setenv("EDGEFLEET_STATE_DIR", str(tmp_path / "edgefleet-agent"))

    code = infer("--model", "fixed", str(image))

    assert code == EXIT_OK, capsys.readouterr().err


def test_config_file_socket(
    socket: Path, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "edgefleet-agent"}"\n')
    monkeypatch.chdir(tmp_path / "edgefleet-agent")

    code = infer("--config", str(config), "--model", "fixed", str(image))

    assert code == EXIT_OK, capsys.readouterr().err


def test_socket_missing(state_dir: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = infer("--model", "fixed", str(image))

    error = capsys.readouterr().err
    assert code == EXIT_UNAVAILABLE
    assert f"no agent socket at {state_dir / 'agent.sock'}" in error
    assert "--socket" in error


def test_help_shows_default(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        infer("--help")

    # argparse may wrap a long path after a hyphen, so the lines are joined without spaces.
    help_text = "".join(line.strip() for line in capsys.readouterr().out.splitlines())
    assert str(state_dir / "agent.sock") in help_text


def test_config_file_invalid(state_dir: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("state_dir = \n")

    code = infer("--config", str(config), "--model", "fixed", str(image))

    assert code == EXIT_USAGE
    assert str(config) in capsys.readouterr().err


def test_unknown_model(socket: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = infer("--socket", str(socket), "--model", "nope", str(image))

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "served: dyn, fixed, nhwc, vector" in error


class SwitchingHost:
    """A real ModelHost that serves model "switch" and records every call as (variant, ok).

    It serves version 1 (NCHW, input "image") until switch() installs version 2 (NHWC, input "pixels"),
    as a deploy or a rollout wave does.
    """

    def __init__(self, folder: Path) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.version_2 = write_classifier(folder / "v2.onnx", [1, 8, 8, 3], channels_first=False, input_name="pixels")
        self.host = ModelHost(default_threads=1, on_latency=self._record)
        self.host.install("switch", "1", "switch:1:source", write_classifier(folder / "v1.onnx", [1, 3, 8, 8]), "onnx")

    def _record(self, name: str, variant_id: str, latency_ms: float, ok: bool) -> None:
        self.calls.append((variant_id, ok))

    def switch(self) -> None:
        self.host.install("switch", "2", "switch:2:source", self.version_2, "onnx")


@pytest.fixture
def switching(tmp_path: Path, state_dir: Path) -> Iterator[tuple[SwitchingHost, Path]]:
    switching_host = SwitchingHost(tmp_path)
    server = LocalApiServer(switching_host.host, state_dir / "agent.sock")
    server.start()
    yield switching_host, server.socket_path
    server.stop(grace_s=0)
    switching_host.host.close()


def test_variant_switch_between_images(
    switching: tuple[SwitchingHost, Path],
    image: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    switching_host, socket = switching
    original_to_array = infer_cli.tensor_to_array

    def switch_after_first_response(tensor: object) -> np.ndarray:
        # Runs when the response to the first image arrives, before the command looks at the second image.
        if not switching_host.calls[1:]:
            switching_host.switch()
        return original_to_array(tensor)  # type: ignore[arg-type]

    monkeypatch.setattr(infer_cli, "tensor_to_array", switch_after_first_response)

    code = infer("--socket", str(socket), "--model", "switch", "--top", str(CLASSES), str(image), str(image))

    lines = capsys.readouterr().out.splitlines()
    assert code == EXIT_OK
    assert switching_host.calls == [("switch:1:source", True), ("switch:2:source", True)]
    assert "switch:2:source" in lines[1]
    assert printed_classes(lines[1]) == expected_ranking((127.0,), (128.0,))


def test_variant_switch_during_request(
    switching: tuple[SwitchingHost, Path],
    image: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    switching_host, socket = switching
    original_load = infer_cli.load_image

    def switch_while_loading(path: Path, height: int, width: int, crop_fraction: float) -> tuple[np.ndarray, str]:
        # The command has read version 1's input spec, so its first request names the input "image".
        if not switching_host.calls:
            switching_host.switch()
        return original_load(path, height, width, crop_fraction)

    monkeypatch.setattr(infer_cli, "load_image", switch_while_loading)

    code = infer("--socket", str(socket), "--model", "switch", "--top", str(CLASSES), str(image))

    output = capsys.readouterr().out
    assert code == EXIT_OK
    assert switching_host.calls == [("switch:2:source", False), ("switch:2:source", True)]
    assert "switch:2:source" in output
    assert printed_classes(output) == expected_ranking((127.0,), (128.0,))


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    path = tmp_path / "portrait.jpg"
    write_sideways_photo(path)

    pixels, exif_error = infer_cli.load_image(path, 16, 8, crop_fraction=1.0)

    assert exif_error == ""
    assert pixels.shape == (16, 8, 3)
    top, bottom = pixels[1].mean(axis=0), pixels[-2].mean(axis=0)
    assert top[0] > 200, top
    assert top[2] < 50, top
    assert bottom[2] > 200, bottom
    assert bottom[0] < 50, bottom


def test_load_image_ignores_corrupt_exif(tmp_path: Path) -> None:
    """EXIF data cut short after its Orientation entry is ignored whole, so the image is not turned."""
    path = tmp_path / "cut.jpg"
    write_sideways_photo(path, exif=corrupt_exif())

    pixels, exif_error = infer_cli.load_image(path, 8, 16, crop_fraction=1.0)

    assert "Corrupt EXIF data" in exif_error
    assert pixels.shape == (8, 16, 3)
    left, right = pixels[:, 1].mean(axis=0), pixels[:, -2].mean(axis=0)
    assert left[0] > 200, left
    assert left[2] < 50, left
    assert right[2] > 200, right
    assert right[0] < 50, right


def test_corrupt_exif_process(socket: Path, tmp_path: Path) -> None:
    """Images with EXIF data that Pillow cannot read are classified, with one warning line each."""
    clean_jpeg, clean_png = tmp_path / "clean.jpg", tmp_path / "clean.png"
    broken = [tmp_path / "cut.jpg", tmp_path / "cut.png", tmp_path / "cut.webp", tmp_path / "not-tiff.png"]
    Image.new("RGB", (20, 16), COLOUR).save(clean_jpeg, quality=95)
    Image.new("RGB", (20, 16), COLOUR).save(clean_png)
    for path, exif in zip(broken, [corrupt_exif(), corrupt_exif(), corrupt_exif(), NOT_TIFF_EXIF], strict=True):
        Image.new("RGB", (20, 16), COLOUR).save(path, quality=95, lossless=True, exif=exif)
    command = [sys.executable, "-m", "edgefleet.agent.main", "infer", "--socket", str(socket), "--model", "fixed"]

    result = subprocess.run(
        [*command, "--top", str(CLASSES), str(clean_jpeg), str(clean_png), *map(str, broken)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == EXIT_OK, result.stderr
    assert "Traceback" not in result.stderr
    assert "UserWarning" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == len(broken), result.stderr
    for path, line in zip(broken, lines, strict=True):
        assert line.startswith(f"edgefleet-agent infer: warning: {path}: ignored the image's EXIF data"), line
    scores = {line.split(": ", 1)[0]: line.split(": ", 1)[1].rsplit("  [", 1)[0] for line in result.stdout.splitlines()}
    assert scores[str(broken[0])] == scores[str(clean_jpeg)]
    for path in broken[1:]:
        assert scores[str(path)] == scores[str(clean_png)]


def test_tensor_socket_as_socket(
    host: ModelHost, state_dir: Path, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = TensorSocketServer(host, state_dir / "agent.tensor.sock")
    server.start()
    try:
        code = infer("--socket", str(server.socket_path), "--model", "fixed", str(image))
    finally:
        server.stop()

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert f"{server.socket_path} does not answer gRPC, so it is not the agent's local API socket" in error
    assert "--socket takes the gRPC socket (STATE_DIR/agent.sock by default), not the tensor socket" in error
    assert f"try --socket {state_dir.absolute() / 'agent.sock'}" in error
    assert "is edgefleet-agent running" not in error
    assert error.count("\n") == 1


def test_socket_path_too_long(state_dir: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = state_dir.absolute() / ("d" * 100) / "agent.sock"

    code = infer("--socket", str(path), "--model", "fixed", str(image))

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert f"the socket path {path} is {len(str(path))} bytes long, but a Unix socket path has at most 107" in error
    assert "pass a shorter path to the same socket" in error
    assert "is edgefleet-agent running" not in error
    assert error.count("\n") == 1


def test_socket_is_file(state_dir: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = state_dir.absolute() / "agent.sock"
    path.parent.mkdir()
    path.write_text("")

    code = infer("--socket", str(path), "--model", "fixed", str(image))

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert f"{path} is not a socket; pass the --socket (or --state-dir) of a running agent" in error


def test_socket_not_served(state_dir: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A socket file that a killed agent left behind, which no process accepts connections on."""
    path = state_dir.absolute() / "agent.sock"
    path.parent.mkdir()
    stale = unix_socket.socket(unix_socket.AF_UNIX, unix_socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()

    code = infer("--socket", str(path), "--model", "fixed", str(image))

    error = capsys.readouterr().err
    assert code == EXIT_UNAVAILABLE
    assert f"no process accepts connections on {path}, a socket file that a stopped agent left behind" in error


def run_infer_without_capabilities(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `edgefleet-agent infer ARGS` as a process; as root, without the capabilities that bypass file modes."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root connects to any socket, and setpriv is not installed to drop the capabilities")
        prefix = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    command = [*prefix, sys.executable, "-m", "edgefleet.agent.main", "infer", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_socket_permission_denied(socket: Path, image: Path) -> None:
    socket.chmod(0)
    group = grp.getgrgid(socket.stat().st_gid).gr_name

    result = run_infer_without_capabilities("--socket", str(socket), "--model", "fixed", str(image))

    assert result.returncode == EXIT_UNAVAILABLE, result.stderr
    assert f"permission denied connecting to the agent socket {socket} ({socket} has group {group}" in result.stderr
    assert f"add this user to the group {group} and log in again" in result.stderr
    assert "is edgefleet-agent running" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_socket_directory_not_searchable(host: ModelHost, tmp_path: Path, image: Path) -> None:
    """Under systemd the socket's directory has mode 0750, so a user outside its group cannot even stat it."""
    directory = tmp_path / "run"
    server = LocalApiServer(host, directory / "agent.sock")
    server.start()
    directory.chmod(0)
    try:
        result = run_infer_without_capabilities("--socket", str(server.socket_path), "--model", "fixed", str(image))
    finally:
        directory.chmod(0o750)
        server.stop(grace_s=0)

    group = grp.getgrgid(directory.stat().st_gid).gr_name
    assert result.returncode == EXIT_UNAVAILABLE, result.stderr
    assert f"permission denied connecting to the agent socket {server.socket_path} ({directory} has group {group}" in (
        result.stderr
    )
    assert "mode 0000" in result.stderr
    assert "Traceback" not in result.stderr
