"""edgefleet-agent infer: run a deployed model on image files through the local inference API."""

from __future__ import annotations

import argparse
import math
import os
import socket as unix_socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.local_api import array_to_tensor, tensor_to_array
from edgefleet.agent.probe import available_memory_bytes
from edgefleet.common import argtypes
from edgefleet.common.config import ConfigError, load_config
from edgefleet.common.errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from edgefleet.common.files import MAX_SOCKET_PATH_BYTES, access_group
from edgefleet.common.images import DEFAULT_CROP_FRACTION, check_crop_fraction, read_upright_rgb, resize_and_crop
from edgefleet.v1 import inference_pb2, inference_pb2_grpc

PROG = "edgefleet-agent infer"
# The socket of an agent started by deploy/systemd/edgefleet-agent.service (RuntimeDirectory=edgefleet-agent).
SYSTEMD_SOCKET = Path("/run/edgefleet-agent/agent.sock")
LABELS_FORMAT = "--labels takes a UTF-8 text file with one class label per line, in class index order"


class UsageError(ValueError):
    """A flag value, a file that a flag names or the model's input that the command cannot use.

    The message names the value and the fix.
    """


@dataclass(frozen=True)
class ImageInput:
    """The image size in pixels and the channel axis that a model's first input takes."""

    height: int
    width: int
    channels_first: bool  # NCHW when true, NHWC otherwise.


def load_image(
    path: Path, height: int, width: int, crop_fraction: float = DEFAULT_CROP_FRACTION
) -> tuple[np.ndarray, str]:
    """Read an image as HxWx3 uint8, resized so that a centred height x width crop covers crop_fraction of it.

    The default crop is the standard ImageNet evaluation's, which the demo uses as well.

    An EXIF orientation is applied, as image viewers do. 16-bit grayscale is scaled to 8 bits. Returns
    the pixels and, for EXIF data that Pillow cannot read and that was therefore ignored, the reason
    ("" otherwise). Raises OSError for a file that Pillow cannot read, for an image of more pixels
    than Pillow reads safely (Image.MAX_IMAGE_PIXELS times 2), and for one whose decoding needs more
    memory than the device has available.
    """
    try:
        from PIL import Image
    except ImportError:
        raise SystemExit("edgefleet-agent infer needs Pillow to read images: pip install pillow") from None
    try:
        # The user named the file, so an image over Pillow's warning threshold is read without a warning.
        # A JPEG may be decoded at a reduced size that keeps twice the pixels the crop window needs, so the
        # bilinear resize below still scales down.
        min_side = 2 * math.ceil(max(height, width) / crop_fraction)
        available = available_memory_bytes()
        upright = read_upright_rgb(
            path, warn_large=False, min_side=min_side, max_decoded_bytes=available if available > 0 else None
        )
    except Image.DecompressionBombError as error:
        raise OSError(f"{error.args[0] if error.args else error} Scale the image down first") from None
    return resize_and_crop(upright.rgb, height, width, crop_fraction), upright.exif_error


def to_input(pixels: np.ndarray, image: ImageInput, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Normalise HxWx3 pixels per channel and return a batch of one in the model's layout (NCHW or NHWC).

    mean and std hold one value for all channels or one per RGB channel.
    """
    data = (pixels.astype(np.float32) - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    if image.channels_first:
        data = data.transpose(2, 0, 1)
    return data[np.newaxis]


def image_input(spec: inference_pb2.LocalModel, size: tuple[int, int] | None) -> ImageInput:
    """Return the image size and layout that the model's first input takes.

    size (height, width) from --size fills dynamic axes, and must equal fixed ones. Raises UsageError
    when the input is not a batch of 3-channel images, when it has a dynamic height or width and size is
    None, or when size differs from the model's fixed size.
    """
    tensor = spec.inputs[0]
    shape = list(tensor.shape)
    if len(shape) == 4 and shape[1] == 3:
        channels_first, dims = True, (shape[2], shape[3])
    elif len(shape) == 4 and shape[3] == 3:
        channels_first, dims = False, (shape[1], shape[2])
    else:
        raise UsageError(
            f"model {spec.model_name} takes input {tensor.name} of shape {shape}, not a batch of RGB images "
            "([N, 3, H, W] or [N, H, W, 3]); call it through the local API with your own tensors"
        )

    shown = "x".join("?" if d < 0 else str(d) for d in dims)
    if size is None:
        if min(dims) < 0:
            raise UsageError(
                f"model {spec.model_name} has a dynamic image height or width (input {tensor.name} of shape "
                f"{shape}); pass the size with --size HEIGHTxWIDTH, for example --size 224x224"
            )
        return ImageInput(dims[0], dims[1], channels_first)
    for fixed, requested in zip(dims, size, strict=True):
        if fixed >= 0 and fixed != requested:
            raise UsageError(
                f"--size {size[0]}x{size[1]} does not fit model {spec.model_name}, which takes {shown} images "
                f"(input {tensor.name} of shape {shape}); drop --size or pass one that matches"
            )
    return ImageInput(size[0], size[1], channels_first)


def parse_size(text: str) -> tuple[int, int]:
    """Parse --size, HEIGHTxWIDTH or one number for a square, or raise argparse.ArgumentTypeError."""
    parts = text.lower().split("x")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected HEIGHTxWIDTH in pixels, such as 224x224, or one number such as 224"
        )
    return (values[0], values[-1])


def parse_crop_fraction(text: str) -> float:
    """Parse --crop-fraction: a number above 0 and at most 1."""
    try:
        value = float(text)
        check_crop_fraction(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a fraction in (0, 1]; give one such as 0.875, or 1 for the whole shorter side"
        ) from None
    return value


def parse_mean(text: str) -> tuple[float, ...]:
    """Parse --mean: one finite number, or three for the R, G and B channels, comma-separated."""
    return _parse_channel_values(text, positive=False)


def parse_std(text: str) -> tuple[float, ...]:
    """Parse --std: one number above 0, or three for the R, G and B channels, comma-separated."""
    return _parse_channel_values(text, positive=True)


def _parse_channel_values(text: str, *, positive: bool) -> tuple[float, ...]:
    kind = "number above 0" if positive else "finite number"
    expected = f"expected one {kind}, or three comma-separated ones for the R, G and B channels"
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: {expected}") from None
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: got {len(values)} values; {expected}")
    if not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: {expected}")
    return values


def read_labels(path: Path) -> list[str]:
    """Read a labels file of UTF-8 text with one class label per line, or raise UsageError naming the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"labels file {path} not found; {LABELS_FORMAT}") from None
    except OSError as error:
        raise UsageError(f"cannot read labels file {path}: {error.strerror}; {LABELS_FORMAT}") from None
    try:
        text = data.decode("utf-8-sig")  # Drops the byte order mark that some editors write.
    except UnicodeDecodeError as error:
        raise UsageError(
            f"labels file {path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            f"{LABELS_FORMAT}"
        ) from None
    if "\0" in text:
        raise UsageError(f"labels file {path} contains NUL bytes, so it is not a text file; {LABELS_FORMAT}")
    labels = text.splitlines()
    if not labels:
        raise UsageError(f"labels file {path} is empty; {LABELS_FORMAT}")
    return labels


def agent_socket(socket: Path | None, state_dir: Path | None, config_file: Path | None) -> Path:
    """Return the local API socket that an agent with these settings serves, as edgefleet-agent resolves it.

    Each of socket and state_dir comes from its flag, else from EDGEFLEET_SOCKET or EDGEFLEET_STATE_DIR,
    else from the TOML file (config_file, else EDGEFLEET_CONFIG). A socket set anywhere wins over
    STATE_DIR/agent.sock, and with neither set the result is ./edgefleet-agent/agent.sock, the agent's
    default. Raises ConfigError for an unreadable config file or an invalid setting.
    """
    if config_file is None and os.environ.get("EDGEFLEET_CONFIG"):
        config_file = Path(os.environ["EDGEFLEET_CONFIG"])
    flags = argparse.Namespace(socket=socket, state_dir=state_dir)
    return load_config(AgentConfig, flags=flags, file=config_file).socket_path


def _default_socket_help() -> str:
    """Describe the default socket for --help, with the path that the current environment gives."""
    try:
        # argparse %-formats help texts, so a % in the path is doubled.
        resolved = str(agent_socket(None, None, None).absolute()).replace("%", "%%")
    except ConfigError:
        resolved = "unknown, because the agent settings in the environment are invalid"
    return (
        "the agent's local API socket (env EDGEFLEET_SOCKET); default STATE_DIR/agent.sock, the socket that an agent "
        f"with the same --config and --state-dir serves, here {resolved}; an agent run by the systemd unit "
        f"serves {SYSTEMD_SOCKET}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--model", required=True, help="name of a model the agent serves")
    parser.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, ...)")
    parser.add_argument("--socket", type=Path, metavar="PATH", help=_default_socket_help())
    parser.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="the agent's state directory, for the default socket (env EDGEFLEET_STATE_DIR)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the agent's TOML file, for the default socket (env EDGEFLEET_CONFIG)",
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        metavar="HEIGHTxWIDTH",
        help="image size HEIGHTxWIDTH in pixels, for models with a dynamic height or width (default: the model's)",
    )
    parser.add_argument(
        "--crop-fraction",
        type=parse_crop_fraction,
        default=DEFAULT_CROP_FRACTION,
        metavar="F",
        help="part of the image's shorter side that the centred crop covers, in (0, 1] "
        f"(default {DEFAULT_CROP_FRACTION}, as in ImageNet evaluation and the demo; 1 keeps the whole side)",
    )
    parser.add_argument(
        "--mean",
        type=parse_mean,
        default=(127.0,),
        help="pixel mean subtracted first, on the 0-255 scale: one value, or R,G,B (default 127)",
    )
    parser.add_argument(
        "--std",
        type=parse_std,
        default=(128.0,),
        help="divisor applied after the mean, above 0: one value, or R,G,B (default 128)",
    )
    parser.add_argument("--labels", type=Path, metavar="FILE", help="UTF-8 text file with one class label per line")
    parser.add_argument(
        "--top",
        type=argtypes.whole_number(1),
        default=3,
        metavar="N",
        help="how many classes to print per image (default 3)",
    )
    return parser


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str]) -> int:
    """Run the command with argv, the arguments after "infer", and return the exit code.

    Exits 2 for invalid flags, files and model inputs, and for a socket path that is not the agent's gRPC
    socket. Exits 69 when no agent serves the socket or this user may not connect to it, and 1 when an
    image cannot be read or the inference fails.
    """
    args = build_parser().parse_args(argv)
    try:
        labels = read_labels(args.labels) if args.labels else []
        socket = agent_socket(args.socket, args.state_dir, args.config)
    except (UsageError, ConfigError) as error:
        return _fail(str(error), EXIT_USAGE)
    problem = _socket_problem(socket.absolute())
    if problem is not None:
        return _fail(*problem)
    with grpc.insecure_channel(f"unix://{socket.absolute()}") as channel:
        return _infer_images(inference_pb2_grpc.InferenceServiceStub(channel), args, socket, labels)


def _socket_problem(socket: Path) -> tuple[str, int] | None:
    """Connect to socket once without gRPC; return the error message and exit code when that fails.

    gRPC reports a path that is too long, a permission error and a socket that no process serves all
    as UNAVAILABLE, which the command would explain as an agent that is not running.
    """
    length = len(os.fsencode(socket))
    if length > MAX_SOCKET_PATH_BYTES:
        return (
            f"the socket path {socket} is {length} bytes long, but a Unix socket path has at most "
            f"{MAX_SOCKET_PATH_BYTES}; pass a shorter path to the same socket, such as one through a symbolic "
            "link to its directory",
            EXIT_USAGE,
        )
    try:
        mode = socket.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        hint = f"; an agent run by the systemd unit serves {SYSTEMD_SOCKET}" if _exists(SYSTEMD_SOCKET) else ""
        return (
            f"no agent socket at {socket}; start edgefleet-agent, or pass the --socket (or --state-dir) "
            f"of a running agent{hint}",
            EXIT_UNAVAILABLE,
        )
    except PermissionError:  # A directory on the way that this user may not search.
        return _permission_problem(socket), EXIT_UNAVAILABLE
    if not stat.S_ISSOCK(mode):
        return f"{socket} is not a socket; pass the --socket (or --state-dir) of a running agent", EXIT_USAGE
    probe = unix_socket.socket(unix_socket.AF_UNIX, unix_socket.SOCK_STREAM)
    try:
        probe.connect(str(socket))
    except PermissionError:
        return _permission_problem(socket), EXIT_UNAVAILABLE
    except ConnectionRefusedError:
        return (
            f"no process accepts connections on {socket}, a socket file that a stopped agent left behind; "
            "start edgefleet-agent",
            EXIT_UNAVAILABLE,
        )
    except OSError as error:
        return f"cannot connect to the agent socket {socket}: {error.strerror}", EXIT_UNAVAILABLE
    finally:
        probe.close()
    return None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except PermissionError:
        return True  # Only an existing directory can deny the search.


def _permission_problem(socket: Path) -> str:
    """Return the message for a socket that this user may not connect to, with the group that may."""
    found = access_group(socket)
    if found is None:
        return f"permission denied connecting to the agent socket {socket}; run the command as the agent's user"
    path, group, mode = found
    return (
        f"permission denied connecting to the agent socket {socket} ({path} has group {group} and mode "
        f"{mode:04o}); add this user to the group {group} and log in again, or run the command as the agent's user"
    )


def _infer_images(
    stub: inference_pb2_grpc.InferenceServiceStub, args: argparse.Namespace, socket: Path, labels: list[str]
) -> int:
    warned_extra_labels = False
    for path in args.images:
        # The agent can switch the model to another variant between two images (a deploy or a rollout wave),
        # and variants differ in input name, layout and size. So each image reads the served variant first,
        # and a request rejected because the variant changed after that read is built again and sent once more.
        retried = False
        while True:
            served = _served_model(stub, args, socket)
            if isinstance(served, int):
                return served
            spec, image = served
            try:
                pixels, exif_error = load_image(path, image.height, image.width, args.crop_fraction)
            except OSError as error:
                return _fail(f"{path}: cannot read image: {error}", EXIT_FAILURE)
            if exif_error and not retried:  # A retry reads the file again, with the same warning.
                _warn(
                    f"{path}: ignored the image's EXIF data, which cannot be read ({exif_error}); "
                    "the image is used as stored, without EXIF orientation"
                )
            request = inference_pb2.InferRequest(
                model_name=args.model,
                inputs=[array_to_tensor(spec.inputs[0].name, to_input(pixels, image, args.mean, args.std))],
            )
            try:
                response = stub.Infer(request, timeout=30)
            except grpc.RpcError as error:
                if not retried and error.code() == grpc.StatusCode.INVALID_ARGUMENT and _variant_changed(stub, spec):
                    retried = True
                    continue
                return _fail(f"{path}: inference failed: {error.details()}", EXIT_FAILURE)
            break
        scores = tensor_to_array(response.outputs[0]).reshape(-1)
        if labels and len(labels) < scores.size:
            # Checked on the reply, because a model's listed output shape may leave the class count dynamic.
            return _fail(
                f"labels file {args.labels} has {len(labels)} lines, but model {args.model!r} has {scores.size} "
                f"classes; {LABELS_FORMAT}",
                EXIT_USAGE,
            )
        if labels and len(labels) > scores.size and not warned_extra_labels:
            # A labels file with an extra first line ("background", as some TFLite classifiers have)
            # would shift every name by one.
            warned_extra_labels = True
            print(
                f"warning: labels file {args.labels} has {len(labels)} lines, but model {args.model!r} has "
                f"{scores.size} classes; the names may be shifted, for example by a 'background' first line",
                file=sys.stderr,
            )
        best = np.argsort(scores)[::-1][: args.top]
        ranked = ", ".join(
            f"{i} {labels[i] if i < len(labels) else ''} ({scores[i]:.3g})".replace("  ", " ") for i in best
        )
        print(f"{path}: {ranked}  [{response.variant_id}, {response.latency_ms:.2f} ms]")
    return EXIT_OK


def _served_model(
    stub: inference_pb2_grpc.InferenceServiceStub, args: argparse.Namespace, socket: Path
) -> tuple[inference_pb2.LocalModel, ImageInput] | int:
    """Return the served variant of args.model with its image input, or print the error and return the exit code."""
    try:
        listed = stub.ListLocalModels(inference_pb2.ListLocalModelsRequest(), timeout=5).models
    except grpc.RpcError as error:
        details = error.details() or ""
        if "Failed parsing HTTP/2" in details:
            return _fail(_not_grpc_problem(socket), EXIT_USAGE)
        return _fail(f"cannot reach the agent at {socket}: {details}; is edgefleet-agent running?", EXIT_UNAVAILABLE)
    models = {m.model_name: m for m in listed}
    spec = models.get(args.model)
    if spec is None:
        served = ", ".join(sorted(models)) or "none"
        return _fail(f"model {args.model!r} is not served here; served: {served}", EXIT_USAGE)
    try:
        return spec, image_input(spec, args.size)
    except UsageError as error:
        return _fail(str(error), EXIT_USAGE)


def _not_grpc_problem(socket: Path) -> str:
    """Return the message for a socket whose server does not speak gRPC, such as the agent's tensor socket."""
    message = (
        f"{socket} does not answer gRPC, so it is not the agent's local API socket; --socket takes the gRPC "
        "socket (STATE_DIR/agent.sock by default), not the tensor socket (agent.tensor.sock)"
    )
    if socket.name.endswith(".tensor.sock"):
        message += f"; try --socket {socket.with_name(socket.name.removesuffix('.tensor.sock') + '.sock')}"
    return message


def _variant_changed(stub: inference_pb2_grpc.InferenceServiceStub, spec: inference_pb2.LocalModel) -> bool:
    """Return whether the agent now serves spec's model as another variant than spec.variant_id."""
    try:
        listed = stub.ListLocalModels(inference_pb2.ListLocalModelsRequest(), timeout=5).models
    except grpc.RpcError:
        return False
    return any(m.model_name == spec.model_name and m.variant_id != spec.variant_id for m in listed)
