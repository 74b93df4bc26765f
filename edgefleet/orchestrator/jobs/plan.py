"""Job plans: the variants a recipe makes from a source model, checked before the job is queued."""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from edgefleet.common.models import ModelMetadata, TensorSpec
from edgefleet.orchestrator.compress.gate import samples_for, smallest_measurable_drop
from edgefleet.orchestrator.compress.quantize import quantization_recommendation
from edgefleet.orchestrator.compress.recipe import (
    DataSource,
    PreprocessConfig,
    Recipe,
    RecipeError,
    format_value,
    parse_recipe,
)
from edgefleet.orchestrator.domain import Variant
from edgefleet.orchestrator.jobs import sources

logger = logging.getLogger(__name__)

_RUNTIME_OF_FORMAT = {"onnx": "onnxruntime", "tflite": "litert"}
_FORMAT_NAMES = {"onnx": "an ONNX", "tflite": "a TFLite"}
# compress.qat.min_fine_tune_samples(FineTuneConfig()): two batches of 16 once a tenth is held out.
# qat imports torch and so stays out of the orchestrator process; a test keeps the two equal.
FINE_TUNE_MIN_SAMPLES = 36


class PlanError(ValueError):
    """A recipe that this source model cannot run: the message names the recipe field and the fix."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class PlannedVariant:
    """One variant the job will produce and gate."""

    kind: str  # Variant kind: "int8" for ONNX; "tflite-int8" or "tflite-fp16", as uploads name them.
    format: str  # "onnx" or "tflite".
    precision: str
    method: str  # "onnx-static", "onnx-dynamic", "tflite-int8", "tflite-fp16", or "uploaded" (gate only).


@dataclass(frozen=True)
class JobPlan:
    """A parsed recipe with the variants it produces and the data it reads."""

    recipe: Recipe
    variants: tuple[PlannedVariant, ...]
    calibration: DataSource | None  # None when no variant needs calibration.
    evaluation: DataSource
    evaluation_field: str
    runtimes: tuple[str, ...] | None  # None: each variant is gated on its own format's runtime.

    def gate_runtimes(self, variant: PlannedVariant) -> tuple[str, ...]:
        """Return the runtimes the gate loads variant on."""
        return self.runtimes if self.runtimes is not None else (_RUNTIME_OF_FORMAT[variant.format],)


def load_recipe_json(text: str) -> dict[str, Any]:
    """Parse recipe JSON into a dict; raise PlanError naming the position of a syntax error."""
    if not text.strip():
        raise PlanError("recipe_json", 'empty; send a recipe such as {"quantize": {...}}')
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise PlanError("recipe_json", f"not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise PlanError("recipe_json", f"must be a JSON object of sections, got {type(data).__name__}")
    return data


def plan_job(data: dict[str, Any], metadata: ModelMetadata, gated: Variant | None = None) -> JobPlan:
    """Validate a recipe dict against a source model and return what the job will do.

    gated is the uploaded variant that gate.variant names, looked up by the caller; the plan then only
    gates it. Raises RecipeError for an unknown key or an invalid value. Raises PlanError for a section
    that the source format cannot run (prune and distill need a PyTorch model, tflite needs a TFLite
    source), for a recipe that produces nothing or both gates a variant and makes one, for a gate.variant
    that gated does not match, and for a missing or unusable calibration or evaluation source.
    """
    recipe = parse_recipe(_with_input_image_size(data, metadata.inputs))
    if recipe.gate.variant:
        return _plan_gate_only(data, recipe, metadata, gated)
    source_format = metadata.format
    for section in ("prune", "distill"):
        if getattr(recipe, section) is not None:
            raise PlanError(
                section,
                f"needs the model as PyTorch code, but the uploaded source is {source_format}; "
                "run it with the compress library (edgefleet.orchestrator.compress) and upload the result",
            )
    planned: list[PlannedVariant] = []
    if recipe.quantize is not None:
        if source_format == "onnx":
            method = "onnx-static" if recipe.quantize.method == "static" else "onnx-dynamic"
            if method == "onnx-dynamic" and metadata.macs_by_op_type:
                _check_dynamic_suits(metadata)
            if method == "onnx-static" and metadata.macs == 0:
                _reject_no_weighted_operator(metadata)
            planned.append(PlannedVariant("int8", "onnx", "int8", method))
        else:
            if recipe.quantize.method != "static":
                raise PlanError(
                    "quantize.method",
                    f'{format_value(recipe.quantize.method)} applies to ONNX only; use "static"',
                )
            planned.append(PlannedVariant("tflite-int8", "tflite", "int8", "tflite-int8"))
    if recipe.tflite is not None:
        if source_format != "tflite":
            raise PlanError(
                "tflite",
                "converting an ONNX model to TFLite is not supported; export TFLite from PyTorch "
                "(compress.tflite.export_tflite) or upload a TFLite model",
            )
        for precision in recipe.tflite.precisions:
            if precision == "fp16":
                planned.append(PlannedVariant("tflite-fp16", "tflite", "fp16", "tflite-fp16"))
            elif precision == "int8" and not any(p.method == "tflite-int8" for p in planned):
                if recipe.quantize is None:
                    raise PlanError("tflite.precisions", "int8 needs calibration data: add a [quantize] section")
                planned.append(PlannedVariant("tflite-int8", "tflite", "int8", "tflite-int8"))
    fine_tuned = recipe.quantize is not None and recipe.quantize.fine_tune_steps > 0
    if fine_tuned and not any(p.method == "onnx-static" for p in planned):
        made = ", ".join(p.kind for p in planned) or "no variant"
        raise PlanError(
            "quantize.fine_tune_steps",
            f"fine-tuning applies to ONNX int8 variants made with static quantization; this job makes "
            f"{made} from a {source_format} source; set fine_tune_steps = 0 (--fine-tune-steps 0)",
        )
    if not planned:
        raise PlanError(
            "recipe",
            "produces no variant: add a [quantize] section (or [tflite] for a TFLite source), "
            "or set gate.variant to gate an uploaded variant",
        )
    return _finish_plan(data, recipe, tuple(planned), metadata)


def _plan_gate_only(data: dict[str, Any], recipe: Recipe, metadata: ModelMetadata, gated: Variant | None) -> JobPlan:
    """Return the plan of a job that gates the uploaded variant gate.variant and makes none."""
    made = [section for section in ("quantize", "prune", "distill", "tflite") if getattr(recipe, section) is not None]
    if made:
        raise PlanError(
            "gate.variant",
            f"a job that gates an uploaded variant makes no variant of its own; remove the [{made[0]}] section "
            "or gate.variant",
        )
    if gated is None or gated.variant_id != recipe.gate.variant:
        raise PlanError("gate.variant", f"{recipe.gate.variant!r} is not a variant of this model version")
    planned = PlannedVariant(gated.kind, gated.format, gated.precision, "uploaded")
    return _finish_plan(data, recipe, (planned,), metadata)


def _finish_plan(
    data: dict[str, Any], recipe: Recipe, planned: tuple[PlannedVariant, ...], metadata: ModelMetadata
) -> JobPlan:
    """Check the calibration and evaluation sources of the planned variants and return the plan."""
    inputs = metadata.inputs
    classes = _scores_per_sample(metadata)
    calibration: DataSource | None = None
    if any(p.method in ("onnx-static", "tflite-int8") for p in planned):
        assert recipe.quantize is not None
        calibration = recipe.quantize.calibration
        _check(calibration, "quantize.calibration", inputs, recipe.quantize.calibration_size, classes)
        if recipe.quantize.fine_tune_steps and any(p.method == "onnx-static" for p in planned):
            _check_fine_tune_samples(calibration, recipe.quantize.calibration_size, inputs)
    evaluation = recipe.gate.evaluation
    evaluation_field = "gate.evaluation"
    if sources.is_empty(evaluation):
        if calibration is not None and sources.builtin_name(calibration):
            # A built-in source has a held-out evaluation half.
            evaluation, evaluation_field = calibration, "quantize.calibration"
        else:
            raise PlanError(
                "gate.evaluation",
                "no data given: the gate needs evaluation samples kept apart from calibration "
                f"(a folder, an npz or {sources.BUILTIN_PREFIX}NAME)",
            )
    else:
        _check(evaluation, "gate.evaluation", inputs, classes=classes)
        if calibration is not None:
            try:
                sources.check_apart(calibration, evaluation, "gate.evaluation")
            except sources.SourceError as error:
                raise PlanError(error.field, str(error).removeprefix(f"{error.field}: ")) from None
    _check_resolvable_drop(recipe.gate.max_accuracy_drop, evaluation, evaluation_field, inputs)
    gate = data.get("gate")
    explicit_runtimes = isinstance(gate, dict) and "runtimes" in gate
    if explicit_runtimes:
        _check_runtimes(recipe.gate.runtimes, planned)
    plan = JobPlan(
        recipe=recipe,
        variants=planned,
        calibration=calibration,
        evaluation=evaluation,
        evaluation_field=evaluation_field,
        runtimes=recipe.gate.runtimes if explicit_runtimes else None,
    )
    logger.debug("planned %s", plan)
    return plan


def _check_resolvable_drop(
    max_accuracy_drop: float, evaluation: DataSource, field: str, inputs: tuple[TensorSpec, ...]
) -> None:
    """Raise PlanError when one evaluation sample is worth more points than max_accuracy_drop.

    The gate would reject every variant then, after the quantization and the evaluation ran.
    """
    if max_accuracy_drop <= 0:
        return  # "No prediction changed" can be checked on any number of samples.
    spec = sources.choose_input(inputs, evaluation, field)
    count = sources.evaluation_count(evaluation, spec)
    if not count:
        return
    sample_points = 100.0 / count
    if max_accuracy_drop < sample_points:
        raise PlanError(
            "gate.max_accuracy_drop",
            f"{max_accuracy_drop:g} points cannot be measured on the {count} evaluation samples of "
            f"{sources.describe(evaluation)}: one changed prediction is worth {sample_points:.2f} points; give at "
            f"least {samples_for(max_accuracy_drop)} evaluation samples, or set max_accuracy_drop "
            f"(--max-accuracy-drop) to {smallest_measurable_drop(count):g} or more",
        )


def _check_runtimes(runtimes: tuple[str, ...], planned: tuple[PlannedVariant, ...]) -> None:
    """Raise PlanError when gate.runtimes names a runtime that cannot load a planned variant's format."""
    for variant in planned:
        runtime = _RUNTIME_OF_FORMAT[variant.format]
        other = [r for r in runtimes if r != runtime]
        if other:
            raise PlanError(
                "gate.runtimes",
                f"{format_value(list(runtimes))} includes {format_value(other[0])}, which cannot load the "
                f"{variant.kind} variant: {_FORMAT_NAMES[variant.format]} model loads on {runtime} only; "
                f"set runtimes = {format_value([runtime])} or leave runtimes out",
            )


def _reject_no_weighted_operator(metadata: ModelMetadata) -> None:
    """Raise PlanError for an ONNX model without multiply-accumulates, which int8 quantization cannot shrink.

    onnxruntime's quantizer fails on such a model (only a Relu, say) after calibration, minutes into the job.
    """
    # NOTE: the stored MACs count only Conv, ConvTranspose, Gemm and MatMul nodes whose shapes the upload
    # inferred, so a model whose shapes could not be inferred at all is rejected here as well.
    raise PlanError(
        "quantize",
        f"the model has no Conv, ConvTranspose, Gemm or MatMul with known shapes ({metadata.layers} nodes, "
        "0 multiply-accumulates), so int8 quantization has no weights to quantize; deploy the source as it is",
    )


def _check_fine_tune_samples(calibration: DataSource, calibration_size: int, inputs: tuple[TensorSpec, ...]) -> None:
    """Raise PlanError when the job would load fewer calibration samples than fine-tuning needs."""
    spec = sources.choose_input(inputs, calibration, "quantize.calibration")
    available = sources.sample_count(calibration, spec)
    if calibration_size < FINE_TUNE_MIN_SAMPLES:
        field, taken = "quantize.calibration_size", f"calibration_size = {calibration_size}"
    elif available is not None and available < FINE_TUNE_MIN_SAMPLES:
        field, taken = "quantize.calibration", f"{sources.describe(calibration)!r} contains {available} samples"
    else:
        return
    raise PlanError(
        field,
        f"{taken}, but fine_tune_steps needs at least {FINE_TUNE_MIN_SAMPLES} calibration samples (two batches "
        f"of 16 once a tenth is held out): give {FINE_TUNE_MIN_SAMPLES} or more (--calibration-size), or set "
        "fine_tune_steps = 0 (--fine-tune-steps 0)",
    )


def _check_dynamic_suits(metadata: ModelMetadata) -> None:
    """Raise PlanError when the MACs show a model that quantize_dynamic_int8 would reject in the worker."""
    recommendation, reason = quantization_recommendation(metadata)
    if recommendation != "dynamic":
        raise PlanError(
            "quantize.method",
            f"'dynamic' does not suit this model: {reason}, and onnxruntime's dynamic int8 kernels make such "
            'models slower or less accurate on CPUs; set method = "static" and give calibration data',
        )


def _with_input_image_size(data: dict[str, Any], inputs: tuple[TensorSpec, ...]) -> dict[str, Any]:
    """Return a copy of data whose image sources take a left-out preprocess layout and size from the model input.

    Without this, every image source would default to NCHW and 224x224, and the shortcut flags of
    `edgefleet models compress`, which set neither, could not calibrate an NHWC model (every TFLite
    source) or a model with any other input size. Raises PlanError when the layout is left out and the
    input has 3 entries on both axis 1 and axis 3. Sections of the wrong type are copied unchanged,
    for parse_recipe to reject.
    """
    filled = copy.deepcopy(data)
    for section_name, source_name in (("quantize", "calibration"), ("gate", "evaluation")):
        section = filled.get(section_name)
        source = section.get(source_name) if isinstance(section, dict) else None
        if not isinstance(source, dict) or not isinstance(source.get("images"), str) or not source["images"]:
            continue
        preprocess = source.setdefault("preprocess", {})
        if not isinstance(preprocess, dict):
            continue
        if "layout" not in preprocess:
            layout = _image_layout(inputs, source, f"{section_name}.{source_name}.preprocess.layout")
            if layout:
                preprocess["layout"] = layout
        size = _image_size(inputs, source, preprocess)
        if size is None:
            continue
        for key, value in zip(("height", "width"), size, strict=True):
            if value > 0:
                preprocess.setdefault(key, value)
    return filled


def _image_input(inputs: tuple[TensorSpec, ...], source: dict[str, Any]) -> TensorSpec | None:
    """Return the rank-4 model input that source feeds, or None when there is none or it is unclear."""
    name = source.get("input_name") or ""
    candidates = [spec for spec in inputs if spec.name == name] if name else list(inputs)
    if len(candidates) != 1 or len(candidates[0].shape) != 4:
        return None
    return candidates[0]


def _image_layout(inputs: tuple[TensorSpec, ...], source: dict[str, Any], field: str) -> str:
    """Return "NCHW" or "NHWC" when exactly one of axes 1 and 3 of the image input has 3 entries, else "".

    With neither axis at 3, check_source rejects the default NCHW with a message that names the layout
    key. Raises PlanError when both axes have 3 entries, because then only the user knows the layout.
    """
    spec = _image_input(inputs, source)
    if spec is None:
        return ""
    shape = spec.shape
    if shape[1] == 3 and shape[3] == 3:
        raise PlanError(
            field,
            f"model input {spec.name!r} of shape {list(shape)} has 3 entries on both axis 1 and axis 3, so the "
            'image layout is ambiguous: set layout = "NCHW" or "NHWC" in a recipe file (--recipe)',
        )
    if shape[1] == 3:
        return "NCHW"
    if shape[3] == 3:
        return "NHWC"
    return ""


def _image_size(
    inputs: tuple[TensorSpec, ...], source: dict[str, Any], preprocess: dict[str, Any]
) -> tuple[int, int] | None:
    """Return (height, width) of the rank-4 model input that source feeds, or None when there is none."""
    spec = _image_input(inputs, source)
    if spec is None:
        return None
    shape = spec.shape
    layout = preprocess.get("layout", PreprocessConfig().layout)
    return (shape[1], shape[2]) if layout == "NHWC" else (shape[2], shape[3])


def _scores_per_sample(metadata: ModelMetadata) -> int | None:
    """Return the scores per sample of the first output, which the gate ranks, or None when an axis is dynamic."""
    if not metadata.outputs:
        return None
    axes = metadata.outputs[0].shape[1:]
    if not axes or any(axis <= 0 for axis in axes):
        return None
    return math.prod(axes)


def _check(
    source: DataSource,
    field: str,
    inputs: tuple[TensorSpec, ...],
    limit: int | None = None,
    classes: int | None = None,
) -> None:
    try:
        sources.check_source(source, field, inputs, limit, classes)
    except sources.SourceError as error:
        raise PlanError(error.field, str(error).removeprefix(f"{error.field}: ")) from None


__all__ = ["JobPlan", "PlanError", "PlannedVariant", "RecipeError", "load_recipe_json", "plan_job"]
