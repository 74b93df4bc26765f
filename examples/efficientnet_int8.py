"""Quantize pretrained EfficientNet-Lite0 to int8 QDQ on real photos and gate it against fp32."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

# Run from a checkout without `pip install -e .`: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgefleet.demo.assets import ensure_efficientnet_lite0_onnx
from edgefleet.demo.images import Photo, demo_photos, preprocess
from edgefleet.orchestrator.compress.calibration import model_input_spec
from edgefleet.orchestrator.compress.gate import GateResult, evaluate_variant
from edgefleet.orchestrator.compress.qat import FineTuneConfig
from edgefleet.orchestrator.compress.quantize import quantize_static_qdq

logger = logging.getLogger(__name__)

TARGETS = {"top1_agreement": 0.99, "size_ratio": 3.5, "speedup_threads_1": 2.0}

# Photos are split by source, so no calibration crop comes from an evaluation photo. Both sets mix colour
# and greyscale photos, photos with and without an ImageNet class.
CALIBRATION_SOURCES = (
    "chelsea",
    "rocket",
    "astronaut",
    "immunohistochemistry",
    "flower",
    "moon",
    "brick",
    "page",
    "cell",
    "gravel",
)
EVALUATION_SOURCES = (
    "coffee",
    "motorcycle",
    "china",
    "grace_hopper",
    "camera",
    "hubble_deep_field",
    "retina",
    "coins",
    "text",
    "clock",
    "grass",
    "microaneurysms",
)
# ImageNet classes of the extra photos, checked by eye: a tower of the Summer Palace in Beijing (palace),
# Grace Hopper in US Navy uniform (military uniform), the cameraman's camera on a tripod (tripod). The other
# extra photos show no ImageNet class.
_EXTRA_CLASSES = {"china": frozenset({698}), "grace_hopper": frozenset({652}), "camera": frozenset({872})}
_GREYSCALE = ("camera", "coins", "moon", "page", "text", "clock", "brick", "grass", "gravel", "cell", "microaneurysms")
# Standard deviation of the Gaussian noise for the fp32 stability reference, in 8-bit grey levels.
NOISE_GREY_LEVELS = 0.5


@dataclass(frozen=True)
class Source:
    """One source photo and its other views (the right image of the motorcycle stereo pair)."""

    photo: Photo
    views: tuple[np.ndarray, ...]

    @property
    def has_imagenet_class(self) -> bool:
        return bool(self.photo.imagenet_classes)


def photo_sources() -> dict[str, Source]:
    """Load every real photo that ships with scikit-image, scikit-learn and matplotlib, by source name.

    Greyscale photos are converted to RGB. Synthetic images (colorwheel, logo, checkerboard) are left out.
    """
    import matplotlib.cbook
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    sources = {photo.name: Source(photo, (photo.image,)) for photo in demo_photos()}
    _left, right, _disparity = skimage.data.stereo_motorcycle()
    sources["motorcycle"] = Source(sources["motorcycle"].photo, (sources["motorcycle"].photo.image, right))

    extra: dict[str, tuple[np.ndarray, str]] = {}
    sample_images = load_sample_images()
    for filename, image in zip(sample_images.filenames, sample_images.images, strict=True):
        name = Path(filename).stem
        extra[name] = (image, f"scikit-learn sample image {name}")
    hopper_path = Path(str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    with Image.open(hopper_path) as hopper:
        extra["grace_hopper"] = (np.asarray(hopper.convert("RGB")), "portrait of Grace Hopper")
    for name in _GREYSCALE:
        grey = np.asarray(getattr(skimage.data, name)())
        extra[name] = (np.stack([grey] * 3, axis=-1).astype(np.uint8), f"scikit-image greyscale photo {name}")
    for name, (image, description) in extra.items():
        photo = Photo(name, image, _EXTRA_CLASSES.get(name, frozenset()), description)
        sources[name] = Source(photo, (image,))
    return sources


def split_sources(sources: dict[str, Source]) -> tuple[list[Source], list[Source]]:
    """Return the calibration and evaluation sources; raise KeyError naming a photo that did not load."""
    missing = [name for name in CALIBRATION_SOURCES + EVALUATION_SOURCES if name not in sources]
    if missing:
        raise KeyError(f"photos {missing} not found: check scikit-image, scikit-learn and matplotlib")
    return [sources[n] for n in CALIBRATION_SOURCES], [sources[n] for n in EVALUATION_SOURCES]


def random_crops(image: np.ndarray, count: int, rng: np.random.Generator, *, jitter: float = 0.0) -> list[np.ndarray]:
    """Return the whole image and count - 1 random crops of it.

    A crop covers 35-100 % of the shorter side with an aspect of 3:4 to 4:3, half are mirrored, and with
    jitter > 0 each channel is scaled by a factor in [1 - jitter, 1 + jitter] (a small colour jitter).
    """
    height, width = image.shape[:2]
    crops = [image]
    while len(crops) < count:
        side = rng.uniform(0.35, 1.0) * min(height, width)
        aspect = rng.uniform(0.75, 4 / 3)
        crop_h = int(min(height, side * np.sqrt(aspect)))
        crop_w = int(min(width, side / np.sqrt(aspect)))
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        crop = image[top : top + crop_h, left : left + crop_w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if jitter > 0:
            gains = rng.uniform(1 - jitter, 1 + jitter, size=3)
            crop = np.clip(crop.astype(np.float32) * gains, 0, 255).astype(np.uint8)
        crops.append(np.ascontiguousarray(crop))
    return crops


def build_inputs(
    model: Path, sources: Sequence[Source], per_view: int, seed: int, *, jitter: float = 0.0
) -> tuple[np.ndarray, list[str]]:
    """Preprocess per_view crops of every view of each source.

    Returns a float32 array with the batch axis first and, per sample, the name of its source photo.
    """
    spec = model_input_spec(model)
    rng = np.random.default_rng(seed)
    batches = []
    names = []
    for source in sources:
        for view in source.views:
            for crop in random_crops(view, per_view, rng, jitter=jitter):
                batches.append(preprocess(crop, spec))
                names.append(source.photo.name)
    return np.concatenate(batches), names


def leading_conv_nodes(model: Path, conv_count: int) -> tuple[str, ...]:
    """Return the names of the first conv_count Conv nodes after the graph input and their Relu/Clip nodes.

    Follows the chain of single consumers from the input and stops early at a branch. Keeping a Conv in
    fp32 only holds when its input is not dequantized: onnxruntime's WeightBiasQuantization graph
    optimization turns the fp32 weights of a Conv between DequantizeLinear and QuantizeLinear into
    per-tensor int8 when the session loads. A chain that starts at the graph input avoids that.
    """
    graph = onnx.load(str(model), load_external_data=False).graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {init.name for init in graph.initializer}
    tensor = next(i.name for i in graph.input if i.name not in initializers)
    names: list[str] = []
    convs = 0
    while len(consumers.get(tensor, [])) == 1:
        node = consumers[tensor][0]
        if node.op_type == "Conv":
            if convs == conv_count:
                break
            convs += 1
        elif node.op_type not in ("Relu", "Clip"):
            break
        names.append(node.name)
        tensor = node.output[0]
    return tuple(names)


def predict(model: Path, inputs: np.ndarray, threads: int = 2) -> np.ndarray:
    """Run inputs (batch axis first) one sample at a time and return the stacked outputs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: inputs[i : i + 1]})[0] for i in range(inputs.shape[0])])


def agreement_figures(
    source_logits: np.ndarray, candidate_logits: np.ndarray, names: Sequence[str], imagenet: set[str]
) -> dict[str, float]:
    """Return the top-1 agreement overall, on photos with an ImageNet class, and per source photo."""
    agree = source_logits.argmax(axis=1) == candidate_logits.argmax(axis=1)
    mask = np.asarray([name in imagenet for name in names])
    figures = {"overall": float(agree.mean()), "imagenet_class_photos": float(agree[mask].mean())}
    for name in dict.fromkeys(names):
        figures[name] = float(agree[np.asarray(names) == name].mean())
    return figures


def logit_sqnr_db(source_logits: np.ndarray, candidate_logits: np.ndarray) -> float:
    """Return the signal-to-quantization-noise ratio of the candidate's logits in dB."""
    noise = float(np.sum((candidate_logits - source_logits) ** 2))
    return float(10 * np.log10(float(np.sum(source_logits**2)) / max(noise, 1e-30)))


def format_table(
    result: GateResult, ratios: dict[str, float], figures: dict[str, float], count: int, imagenet_count: int
) -> str:
    """Render the gate's figures for fp32 and int8 as a plain-text table."""
    rows = [("figure", "fp32", "int8", "ratio / target")]
    rows.append(
        (
            "size (MB)",
            f"{result.source_size_bytes / 1e6:.2f}",
            f"{result.size_bytes / 1e6:.2f}",
            f"{ratios['size_ratio']:.2f}x smaller / >= {TARGETS['size_ratio']}x",
        )
    )
    for key in result.latency_p50_ms:
        target = f" / >= {TARGETS['speedup_threads_1']}x" if key == "threads=1" else ""
        rows.append(
            (
                f"p50 {key} (ms)",
                f"{result.source_latency_p50_ms[key]:.2f}",
                f"{result.latency_p50_ms[key]:.2f}",
                f"{result.speedup[key]:.2f}x faster{target}",
            )
        )
    rows.append(
        (
            f"top-1 agreement, {count} crops",
            "1.0000",
            f"{result.accuracy:.4f}",
            f">= {TARGETS['top1_agreement']} (gated)",
        )
    )
    rows.append((f"  ImageNet-class photos, {imagenet_count}", "1.0000", f"{figures['imagenet_class_photos']:.4f}", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("efficientnet_int8.json"),
        help="JSON report path (default: efficientnet_int8.json)",
    )
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="where to keep the int8 model (default: a temporary directory)"
    )
    parser.add_argument("--calibration-crops", type=int, default=24, help="crops per calibration photo")
    parser.add_argument(
        "--jitter",
        type=float,
        default=0.1,
        help="colour jitter of calibration crops: per-channel gain in [1 - J, 1 + J]",
    )
    parser.add_argument("--eval-crops", type=int, default=32, help="crops per evaluation photo")
    # docs/compression.md lists what the other settings measured.
    parser.add_argument("--activation-type", choices=("uint8", "int8"), default="uint8")
    parser.add_argument("--calibration-method", choices=("minmax", "entropy", "percentile"), default="minmax")
    parser.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weights")
    parser.add_argument("--reduce-range", action="store_true", help="7-bit weights (for CPUs without VNNI)")
    parser.add_argument("--no-preprocess", action="store_true", help="skip quant_pre_process")
    parser.add_argument(
        "--no-bias-correction", action="store_true", help="skip the bias correction for the int8 weight rounding error"
    )
    parser.add_argument(
        "--weight-rounding",
        choices=("nearest", "adaround"),
        default="nearest",
        help="int8 weight rounding: onnxruntime's nearest, or AdaRound learned on the calibration crops (minutes)",
    )
    parser.add_argument(
        "--fine-tune-steps",
        type=int,
        default=0,
        help="quantization-aware fine-tuning steps against the fp32 outputs after quantizing (0: none; minutes)",
    )
    parser.add_argument("--fine-tune-crops", type=int, default=100, help="crops per calibration photo to fine-tune on")
    parser.add_argument(
        "--fp32-leading-convs",
        type=int,
        default=2,
        help="keep this many Conv nodes after the input (and their Clip) in fp32 (0: none)",
    )
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per model and thread count")
    args = parser.parse_args(argv)
    # onnxruntime's quantizer logs one INFO line per adjusted weight scale on the root logger.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("edgefleet").setLevel(logging.INFO)
    logger.setLevel(logging.INFO)

    source = ensure_efficientnet_lite0_onnx()
    calibration_sources, eval_sources = split_sources(photo_sources())
    imagenet = {s.photo.name for s in eval_sources if s.has_imagenet_class}
    logger.info("calibration photos: %s", [s.photo.name for s in calibration_sources])
    logger.info("evaluation photos: %s (ImageNet class: %s)", [s.photo.name for s in eval_sources], sorted(imagenet))
    calibration, _ = build_inputs(source, calibration_sources, args.calibration_crops, seed=1, jitter=args.jitter)
    eval_inputs, eval_names = build_inputs(source, eval_sources, args.eval_crops, seed=2)

    fine_tune = FineTuneConfig(steps=args.fine_tune_steps) if args.fine_tune_steps > 0 else None
    fine_tune_inputs = None
    if fine_tune is not None:
        # Other crops of the calibration photos, never of the evaluation photos.
        fine_tune_inputs, _ = build_inputs(
            source, calibration_sources, args.fine_tune_crops, seed=11, jitter=args.jitter
        )
    fp32_nodes = leading_conv_nodes(source, args.fp32_leading_convs) if args.fp32_leading_convs else ()
    logger.info("nodes kept in fp32: %s", list(fp32_nodes))

    with tempfile.TemporaryDirectory(prefix="edgefleet-int8-") as scratch:
        model_dir = args.model_dir or Path(scratch)
        candidate = quantize_static_qdq(
            source,
            model_dir / "efficientnet_lite0.int8.onnx",
            calibration,
            per_channel=not args.per_tensor,
            activation_type=args.activation_type,
            calibration_method=args.calibration_method,
            reduce_range=args.reduce_range,
            preprocess=not args.no_preprocess,
            bias_correction=not args.no_bias_correction,
            weight_rounding=args.weight_rounding,
            nodes_to_exclude=fp32_nodes,
            fine_tune=fine_tune,
            fine_tune_inputs=fine_tune_inputs,
        )
        result = evaluate_variant(
            candidate,
            source,
            eval_inputs,
            labels=None,
            max_accuracy_drop=1.0,
            threads=(1, 2),
            repeats=args.repeats,
            warmup=10,
        )
        source_logits = predict(source, eval_inputs)
        candidate_logits = predict(candidate, eval_inputs)
        # The int8 model's own stability: every input value moved by one float32 ulp, up or down at random.
        signs = np.random.default_rng(4).choice(np.asarray([-1.0, 1.0], np.float32), eval_inputs.shape)
        nudged_logits = predict(candidate, eval_inputs * (1 + signs * np.float32(2.0**-23)))

    # The fp32 model's own top-1 stability: the same crops with Gaussian noise far below one grey level.
    noise = np.random.default_rng(3).normal(0.0, NOISE_GREY_LEVELS / 128.0, eval_inputs.shape)
    noisy_logits = predict(source, (eval_inputs + noise).astype(np.float32))

    figures = agreement_figures(source_logits, candidate_logits, eval_names, imagenet)
    noisy_figures = agreement_figures(source_logits, noisy_logits, eval_names, imagenet)
    nudged_figures = agreement_figures(candidate_logits, nudged_logits, eval_names, imagenet)
    ratios = {
        "size_ratio": result.source_size_bytes / result.size_bytes,
        "speedup_threads_1": result.speedup["threads=1"],
        "top1_agreement": float(result.accuracy or 0.0),
    }
    met = {name: ratios[name] >= target for name, target in TARGETS.items()}
    imagenet_count = sum(name in imagenet for name in eval_names)
    print(format_table(result, ratios, figures, eval_inputs.shape[0], imagenet_count))
    print(f"logit SQNR int8 vs fp32: {logit_sqnr_db(source_logits, candidate_logits):.1f} dB")
    print(
        f"fp32 with noise sigma {NOISE_GREY_LEVELS} grey level vs fp32: top-1 agreement "
        f"{noisy_figures['overall']:.4f} (ImageNet-class photos {noisy_figures['imagenet_class_photos']:.4f}), "
        f"logit SQNR {logit_sqnr_db(source_logits, noisy_logits):.1f} dB"
    )
    print(
        f"int8 with inputs moved by one float32 ulp vs int8: top-1 agreement {nudged_figures['overall']:.4f}, "
        f"logit SQNR {logit_sqnr_db(candidate_logits, nudged_logits):.1f} dB"
    )
    print(f"gate: {result.status} ({result.reason})")
    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "calibration_photos": list(CALIBRATION_SOURCES),
        "evaluation_photos": list(EVALUATION_SOURCES),
        "imagenet_class_photos": sorted(imagenet),
        "fp32_nodes": list(fp32_nodes),
        "calibration_samples": int(calibration.shape[0]),
        "evaluation_samples": int(eval_inputs.shape[0]),
        "gate": result.to_dict(),
        "agreement": figures,
        "logit_sqnr_db": logit_sqnr_db(source_logits, candidate_logits),
        "fp32_noise_reference": {
            "sigma_grey_levels": NOISE_GREY_LEVELS,
            "agreement": noisy_figures,
            "logit_sqnr_db": logit_sqnr_db(source_logits, noisy_logits),
        },
        "int8_ulp_reference": {
            "agreement": nudged_figures,
            "logit_sqnr_db": logit_sqnr_db(candidate_logits, nudged_logits),
        },
        "ratios": ratios,
        "targets": TARGETS,
        "targets_met": met,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    missed = [name for name, ok in met.items() if not ok]
    print(f"targets missed: {', '.join(missed)}" if missed else "all targets met")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
