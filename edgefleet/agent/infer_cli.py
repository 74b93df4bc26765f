"""edgefleet-agent infer: run a deployed model on image files through the local inference API."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
import numpy as np

from edgefleet.agent.local_api import array_to_tensor, tensor_to_array
from edgefleet.common.errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from edgefleet.v1 import inference_pb2, inference_pb2_grpc


def load_image(path: Path, height: int, width: int) -> np.ndarray:
    """Read an image as HxWx3 uint8, resized (shorter side) and centre-cropped to height x width."""
    try:
        from PIL import Image
    except ImportError:
        raise SystemExit("edgefleet-agent infer needs Pillow to read images: pip install pillow") from None
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        scale = max(height / rgb.height, width / rgb.width)
        resized = rgb.resize(
            (max(width, round(rgb.width * scale)), max(height, round(rgb.height * scale))), Image.Resampling.BILINEAR
        )
        left = (resized.width - width) // 2
        top = (resized.height - height) // 2
        return np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.uint8)


def to_input(pixels: np.ndarray, spec: inference_pb2.LocalModel, mean: float, std: float) -> np.ndarray:
    """Normalise HxWx3 pixels and lay them out as the model's first input expects (NCHW or NHWC)."""
    shape = list(spec.inputs[0].shape)
    data = (pixels.astype(np.float32) - mean) / std
    if len(shape) == 4 and shape[1] == 3:
        data = data.transpose(2, 0, 1)
    return data[np.newaxis]


def input_size(spec: inference_pb2.LocalModel) -> tuple[int, int]:
    shape = list(spec.inputs[0].shape)
    if len(shape) != 4:
        raise SystemExit(f"model {spec.model_name} takes input shape {shape}, not an image batch")
    return (shape[2], shape[3]) if shape[1] == 3 else (shape[1], shape[2])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgefleet-agent infer", description=__doc__)
    parser.add_argument("--model", required=True, help="name of a model the agent serves")
    parser.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, ...)")
    parser.add_argument(
        "--socket",
        type=Path,
        default=Path(os.environ.get("EDGEFLEET_SOCKET", "./edgefleet-agent/agent.sock")),
        help="the agent's local API socket (env EDGEFLEET_SOCKET)",
    )
    parser.add_argument("--mean", type=float, default=127.0, help="pixel mean subtracted before scaling (0-255 scale)")
    parser.add_argument("--std", type=float, default=128.0, help="pixel scale divided by after the mean")
    parser.add_argument("--labels", type=Path, help="text file with one class label per line")
    parser.add_argument("--top", type=int, default=3, help="how many classes to print per image")
    args = parser.parse_args(argv)
    labels = args.labels.read_text().splitlines() if args.labels else []
    with grpc.insecure_channel(f"unix://{args.socket.absolute()}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        try:
            models = {
                m.model_name: m for m in stub.ListLocalModels(inference_pb2.ListLocalModelsRequest(), timeout=5).models
            }
        except grpc.RpcError as error:
            print(
                f"cannot reach the agent at {args.socket}: {error.details()}; is edgefleet-agent running?",
                file=sys.stderr,
            )
            return EXIT_UNAVAILABLE
        spec = models.get(args.model)
        if spec is None:
            print(
                f"model {args.model!r} is not served here; served: {', '.join(sorted(models)) or 'none'}",
                file=sys.stderr,
            )
            return EXIT_USAGE
        height, width = input_size(spec)
        for path in args.images:
            try:
                pixels = load_image(path, height, width)
            except OSError as error:
                print(f"{path}: cannot read image: {error}", file=sys.stderr)
                return EXIT_FAILURE
            request = inference_pb2.InferRequest(
                model_name=args.model,
                inputs=[array_to_tensor(spec.inputs[0].name, to_input(pixels, spec, args.mean, args.std))],
            )
            try:
                response = stub.Infer(request, timeout=30)
            except grpc.RpcError as error:
                print(f"{path}: inference failed: {error.details()}", file=sys.stderr)
                return EXIT_FAILURE
            scores = tensor_to_array(response.outputs[0]).reshape(-1)
            best = np.argsort(scores)[::-1][: args.top]
            ranked = ", ".join(
                f"{i} {labels[i] if i < len(labels) else ''} ({scores[i]:.3g})".replace("  ", " ") for i in best
            )
            print(f"{path}: {ranked}  [{response.variant_id}, {response.latency_ms:.2f} ms]")
    return EXIT_OK
