"""Compression recipes: typed, strictly validated settings parsed from JSON, TOML or a dict."""

from __future__ import annotations

import json
import logging
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edgefleet.orchestrator.compress.kernels import default_reduce_range

logger = logging.getLogger(__name__)


class RecipeError(ValueError):
    """A recipe with an unknown key, a wrong type or an out-of-range value."""


@dataclass(frozen=True)
class PreprocessConfig:
    """Image preprocessing for calibration and evaluation inputs, with the fields of calibration.PreprocessSpec."""

    height: int = 224
    width: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    scale: float = 1.0 / 255.0
    layout: str = "NCHW"
    channel_order: str = "RGB"
    resize_shorter: int = 0


@dataclass(frozen=True)
class DataSource:
    """Samples for calibration or evaluation: a folder of images or an .npz with one array per input."""

    images: str = ""  # Folder of image files, preprocessed with `preprocess`.
    npz: str = ""  # .npz file whose key `input_name` contains the samples, batch axis first.
    input_name: str = ""  # Model input to feed; empty picks the only one.
    labels: str = ""  # Optional .npy of integer class labels, one per sample, for top-1 accuracy.
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)


@dataclass(frozen=True)
class QuantizeConfig:
    method: str = "static"  # "static" (calibrated QDQ) or "dynamic" (MatMul-heavy models only).
    per_channel: bool = True
    activation_type: str = "uint8"  # "uint8" or "int8".
    calibration_method: str = "minmax"  # "minmax", "entropy", "percentile" or "distribution".
    calibration_size: int = 128  # Maximum calibration samples taken from `calibration`.
    # 7-bit weights. The default depends on the CPU that builds and gates the variant: true on x86
    # without VNNI, where onnxruntime's int8 kernels can saturate with 8-bit weights (kernels.py).
    reduce_range: bool = field(default_factory=default_reduce_range)
    # Shift each Conv and Gemm bias by the mean output error of its int8 weights on the calibration data:
    # on EfficientNet-Lite0 it raised top-1 agreement with fp32 from 0.83 to 0.91 (docs/compression.md).
    bias_correction: bool = True
    weight_rounding: str = "nearest"  # "nearest", or "adaround" (learned rounding, minutes on a CPU).
    # Quantization-aware fine-tuning against the fp32 outputs on the calibration samples; 0 turns it off.
    fine_tune_steps: int = 0
    calibration: DataSource = field(default_factory=DataSource)


@dataclass(frozen=True)
class PruneConfig:
    ratio: float = 0.3  # Fraction of the multiply-accumulates (MACs) removed, in (0, 1).
    round_to: int = 8  # Kept channel counts are multiples of this: 8 or 16.
    finetune_epochs: int = 3
    lr: float = 1e-3


@dataclass(frozen=True)
class DistillConfig:
    student_family: str = "inverted_residual"  # "inverted_residual" or "fire".
    mac_budget: int = 50_000_000  # Maximum multiply-accumulates of one student inference.
    temperature: float = 4.0
    alpha: float = 0.7  # Weight of the soft-target loss, in [0, 1].
    epochs: int = 10
    lr: float = 1e-3
    input_resolution: int = 224


@dataclass(frozen=True)
class TfliteConfig:
    precisions: tuple[str, ...] = ("fp32",)  # Any of "fp32", "fp16", "int8".


@dataclass(frozen=True)
class GateConfig:
    max_accuracy_drop: float = 1.0  # Percentage points, from 0 to 100.
    evaluation: DataSource = field(default_factory=DataSource)
    runtimes: tuple[str, ...] = ("onnxruntime",)  # Any of "onnxruntime", "litert".
    threads: tuple[int, ...] = (1, 2)
    # Id of an uploaded variant of the job's model version that waits for the gate ("pending"). When set,
    # the job gates that variant instead of making one, so the recipe may have no section but [gate].
    variant: str = ""


@dataclass(frozen=True)
class Recipe:
    """A set of compression steps and their settings; a section left out of the input is None and not run."""

    quantize: QuantizeConfig | None = None
    prune: PruneConfig | None = None
    distill: DistillConfig | None = None
    tflite: TfliteConfig | None = None
    gate: GateConfig = field(default_factory=GateConfig)


# The gate times each variant at these thread counts on the orchestrator; more threads than a
# fleet's largest devices measure nothing the selection uses.
MAX_GATE_THREADS = 64

# Allowed values per "section.key"; ranges are checked in _check_ranges.
_CHOICES: dict[str, tuple[Any, ...]] = {
    "quantize.method": ("static", "dynamic"),
    "quantize.activation_type": ("uint8", "int8"),
    "quantize.calibration_method": ("minmax", "entropy", "percentile", "distribution"),
    "quantize.weight_rounding": ("nearest", "adaround"),
    "prune.round_to": (8, 16),
    "distill.student_family": ("inverted_residual", "fire"),
    "preprocess.layout": ("NCHW", "NHWC"),
    "preprocess.channel_order": ("RGB", "BGR"),
    "tflite.precisions": ("fp32", "fp16", "int8"),
    "gate.runtimes": ("onnxruntime", "litert"),
}
_SECTIONS: dict[str, type[Any]] = {
    "quantize": QuantizeConfig,
    "prune": PruneConfig,
    "distill": DistillConfig,
    "tflite": TfliteConfig,
    "gate": GateConfig,
}
_NESTED: dict[str, type[Any]] = {
    "calibration": DataSource,
    "evaluation": DataSource,
    "preprocess": PreprocessConfig,
}


def format_value(value: Any) -> str:
    """Return value as a recipe writes it in TOML: true, 0.5, "NHWC", [1, 2], so that messages quote recipe syntax."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {format_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)


def parse_recipe(data: dict[str, Any]) -> Recipe:
    """Build a Recipe from a dict; keys that are left out take the defaults of the dataclasses above.

    Raises RecipeError naming the key, the value and what is allowed for an unknown key, a wrong type
    or an out-of-range value.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a table of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise RecipeError(f"unknown recipe section {unknown[0]!r}: allowed sections are {sorted(_SECTIONS)}")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        if name in data:
            sections[name] = _build(cls, data[name], name)
    recipe = Recipe(**sections)
    logger.debug("parsed recipe %s", recipe)
    return recipe


def load_recipe(path: Path) -> Recipe:
    """Read a recipe from a .json or .toml file.

    Raises RecipeError for another suffix, a syntax error (with its position) or an invalid value.
    """
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise RecipeError(f"cannot read recipe {path}: expected a .json or .toml file")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise RecipeError(f"invalid recipe file {path}: {error}") from error
    try:
        return parse_recipe(data)
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}") from error


def _build(cls: type[Any], value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise RecipeError(f"{where} must be a table, got {format_value(value)}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(value) - set(known))
    if unknown:
        key = unknown[0]
        raise RecipeError(f"unknown key {where}.{key} = {format_value(value[key])}: allowed keys are {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for key, raw in value.items():
        path = f"{where}.{key}"
        if key in _NESTED:
            kwargs[key] = _build(_NESTED[key], raw, path)
            continue
        default = getattr(cls(), key)
        kwargs[key] = _convert(raw, default, path)
        choice_key = f"{where.rsplit('.', 1)[-1]}.{key}"
        _check_choice(kwargs[key], choice_key, path)
    built = cls(**kwargs)
    _check_ranges(built, where)
    return built


def _convert(raw: Any, default: Any, path: str) -> Any:
    """Check raw against the type of the field's default, converting lists to tuples."""
    if isinstance(default, bool):
        if not isinstance(raw, bool):
            raise RecipeError(f"{path} = {format_value(raw)} is invalid: expected true or false")
        return raw
    if isinstance(default, int):
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise RecipeError(f"{path} = {format_value(raw)} is invalid: expected an integer")
        return raw
    if isinstance(default, float):
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise RecipeError(f"{path} = {format_value(raw)} is invalid: expected a number")
        # TOML and Python's json module accept nan and inf, and inf passes the range checks that have no upper bound.
        if not math.isfinite(raw):
            raise RecipeError(f"{path} = {format_value(raw)} is invalid: expected a finite number")
        return float(raw)
    if isinstance(default, str):
        if not isinstance(raw, str):
            raise RecipeError(f"{path} = {format_value(raw)} is invalid: expected a string")
        return raw
    if isinstance(default, tuple):
        if not isinstance(raw, list | tuple):
            raise RecipeError(f"{path} = {format_value(raw)} is invalid: expected a list")
        if default and len(raw) == 0:
            raise RecipeError(f"{path} = {format_value(raw)} is invalid: expected at least one value")
        if default and isinstance(default[0], float) and len(raw) != len(default):
            raise RecipeError(f"{path} = {format_value(raw)} is invalid: expected {len(default)} numbers")
        sample = default[0] if default else ""
        return tuple(_convert(item, sample, f"{path}[{i}]") for i, item in enumerate(raw))
    raise RecipeError(f"{path} has no known type")  # pragma: no cover - every field has a typed default


def _check_choice(value: Any, choice_key: str, path: str) -> None:
    allowed = _CHOICES.get(choice_key)
    if allowed is None:
        return
    values = value if isinstance(value, tuple) else (value,)
    for item in values:
        if item not in allowed:
            raise RecipeError(
                f"{path} = {format_value(value)} is invalid: allowed values are {format_value(list(allowed))}"
            )


def _require(ok: bool, path: str, value: Any, allowed: str) -> None:
    if not ok:
        raise RecipeError(f"{path} = {format_value(value)} is out of range: must be {allowed}")


def _check_ranges(section: Any, where: str) -> None:
    if isinstance(section, QuantizeConfig):
        _require(section.calibration_size > 0, f"{where}.calibration_size", section.calibration_size, "> 0")
        _require(section.fine_tune_steps >= 0, f"{where}.fine_tune_steps", section.fine_tune_steps, ">= 0")
    elif isinstance(section, PruneConfig):
        _require(0.0 < section.ratio < 1.0, f"{where}.ratio", section.ratio, "in (0, 1), exclusive")
        _require(section.finetune_epochs >= 0, f"{where}.finetune_epochs", section.finetune_epochs, ">= 0")
        _require(section.lr > 0, f"{where}.lr", section.lr, "> 0")
    elif isinstance(section, DistillConfig):
        _require(section.mac_budget > 0, f"{where}.mac_budget", section.mac_budget, "> 0")
        _require(section.temperature > 0, f"{where}.temperature", section.temperature, "> 0")
        _require(0.0 <= section.alpha <= 1.0, f"{where}.alpha", section.alpha, "in [0, 1]")
        _require(section.epochs > 0, f"{where}.epochs", section.epochs, "> 0")
        _require(section.lr > 0, f"{where}.lr", section.lr, "> 0")
        resolution = section.input_resolution
        _require(resolution >= 16, f"{where}.input_resolution", resolution, ">= 16")
    elif isinstance(section, GateConfig):
        _require(0 <= section.max_accuracy_drop <= 100, f"{where}.max_accuracy_drop", section.max_accuracy_drop,
                 "from 0 to 100 percentage points")
        _require(
            all(0 < t <= MAX_GATE_THREADS for t in section.threads),
            f"{where}.threads",
            section.threads,
            f"from 1 to {MAX_GATE_THREADS}",
        )
    elif isinstance(section, PreprocessConfig):
        _require(section.height > 0, f"{where}.height", section.height, "> 0")
        _require(section.width > 0, f"{where}.width", section.width, "> 0")
        # A negative std flips the sign of a channel, and edgefleet-agent infer --std rejects it too.
        _require(all(s > 0 for s in section.std), f"{where}.std", section.std, "above 0 for each channel")
        _require(section.scale > 0, f"{where}.scale", section.scale, "> 0")
        _require(section.resize_shorter >= 0, f"{where}.resize_shorter", section.resize_shorter, ">= 0")
    elif isinstance(section, DataSource):
        _require(not (section.images and section.npz), f"{where}.npz", section.npz,
                 "empty when images is set: give either images or npz")
