"""Quantization-aware fine-tuning of an int8 QDQ ONNX model: distillation from its fp32 source."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as functional
from onnx import numpy_helper

from edgefleet.orchestrator.compress.qdq_graph import QdqModule
from edgefleet.orchestrator.compress.quantize import QuantizationError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FineTuneConfig:
    """Settings of quantization-aware fine-tuning.

    Learning rates are per Adam step, in the units of each tensor. Integer weights (int8, and also
    4- and 16-bit or unsigned ones) move in steps of their scale and int32 biases in steps of theirs
    (input scale x weight scale). The weights of nodes kept in fp32 move in their own units. A random
    holdout_fraction of the samples is not trained on: the error on them, measured with onnxruntime
    before and after, decides whether the result is kept.
    """

    steps: int = 300
    batch_size: int = 16
    weight_learning_rate: float = 0.005
    bias_learning_rate: float = 10.0
    float_learning_rate: float = 1e-5
    holdout_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps = {self.steps}: must be at least 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size = {self.batch_size}: must be at least 1")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction = {self.holdout_fraction}: must be in (0, 1), exclusive")


@dataclass(frozen=True)
class FineTuneResult:
    """The fine-tuned model, or the input model when fine-tuning did not lower the held-out error.

    The errors are the mean squared output error against the fp32 source divided by the mean square
    of the source's outputs (1 / SQNR), on the held-out samples, as onnxruntime runs the int8 model.
    """

    model: onnx.ModelProto
    kept: bool
    holdout_error_before: float
    holdout_error_after: float
    trained_tensors: int
    seconds: float


def _holdout_count(count: int, fraction: float) -> int:
    """Return how many of count samples are held out to check the fine-tuned model: at least 1."""
    return max(1, round(count * fraction))


def min_fine_tune_samples(config: FineTuneConfig) -> int:
    """Return the fewest samples that leave two batches of config.batch_size after the hold-out."""
    needed = 2 * config.batch_size + 1
    while needed - _holdout_count(needed, config.holdout_fraction) < 2 * config.batch_size:
        needed += 1
    return needed


def fine_tune_qdq(
    qdq_model: onnx.ModelProto,
    source_model: onnx.ModelProto,
    inputs: Mapping[str, np.ndarray],
    config: FineTuneConfig | None = None,
    *,
    progress: Callable[[int, int, float], None] | None = None,
) -> FineTuneResult:
    """Fine-tune the weights and biases of an int8 QDQ model to reproduce its fp32 source's outputs.

    inputs maps each model input to samples with the batch axis first. The loss is the output error
    relative to the source's output power, plus the KL divergence of the softmax for 2-D (logit)
    outputs, with rounding passed through by the straight-through estimator. Activation and weight
    scales stay as calibrated, so the result has the same graph and quantization parameters, only
    other integers. progress(step, steps, loss) is called every 10 steps.

    Returns the fine-tuned model when it lowers the held-out error, else the input model. Raises
    QuantizationError for an operator it cannot simulate, a model with nothing to train, a non-float32
    model input or a model onnxruntime cannot run. Raises ValueError when source_model has other inputs
    or outputs, or when samples are missing, non-finite, of the wrong shape, of unequal counts or fewer
    than two batches.
    """
    settings = config or FineTuneConfig()
    started = time.monotonic()
    module = QdqModule(qdq_model)
    if not module.integer_params and not module.float_params:
        raise QuantizationError(
            "the QDQ model has no Conv, Gemm or MatMul weight or bias initializer to fine-tune; "
            "quantize without fine-tuning"
        )
    _check_source(source_model, module)
    samples = _checked_samples(qdq_model.graph, module.input_names, inputs)
    count = len(next(iter(samples.values())))
    holdout = _holdout_count(count, settings.holdout_fraction)
    train_count = count - holdout
    if train_count < 2 * settings.batch_size:
        needed = min_fine_tune_samples(settings)
        raise ValueError(
            f"{count} samples are too few to fine-tune with batch_size {settings.batch_size}: need at least "
            f"{needed}, {_holdout_count(needed, settings.holdout_fraction)} of them held out"
        )
    # A random hold-out: samples often come grouped by source image, and a tail would hold out whole images.
    order = np.random.default_rng(settings.seed).permutation(count)
    train_rows, holdout_rows = np.sort(order[holdout:]), np.sort(order[:holdout])
    feeds = {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in samples.items()}
    targets = _run_onnxruntime(source_model, feeds)
    held_out = {name: array[holdout_rows] for name, array in feeds.items()}
    held_out_targets = [t[holdout_rows] for t in targets]
    before = _relative_error(_run_onnxruntime(qdq_model, held_out), held_out_targets)

    generator = torch.Generator().manual_seed(settings.seed)
    train_feeds = {name: torch.from_numpy(array[train_rows]) for name, array in feeds.items()}
    train_targets = [torch.from_numpy(t[train_rows]) for t in targets]
    power = [float(torch.mean(t**2)) or 1.0 for t in train_targets]
    optimizer = _optimizer(module, settings)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps)
    module.train()
    for step in range(settings.steps):
        batch = torch.randperm(train_count, generator=generator)[: settings.batch_size]
        outputs = module({name: array[batch] for name, array in train_feeds.items()})
        loss = _distillation_loss(outputs, [t[batch] for t in train_targets], power)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None and (step % 10 == 9 or step == settings.steps - 1):
            progress(step + 1, settings.steps, float(loss.detach()))

    tuned = _with_initializers(qdq_model, {**module.integer_tensors(), **module.float_tensors()})
    after = _relative_error(_run_onnxruntime(tuned, held_out), held_out_targets)
    kept = after < before
    seconds = time.monotonic() - started
    trained_tensors = len(module.integer_params) + len(module.float_params)
    logger.info(
        "fine-tuned %d tensors for %d steps in %.0f s: held-out error %.3g -> %.3g (SQNR %.1f -> %.1f dB)%s",
        trained_tensors,
        settings.steps,
        seconds,
        before,
        after,
        _decibels(before),
        _decibels(after),
        "" if kept else "; not kept, the input model is returned",
    )
    return FineTuneResult(
        model=tuned if kept else qdq_model,
        kept=kept,
        holdout_error_before=before,
        holdout_error_after=after,
        trained_tensors=trained_tensors,
        seconds=seconds,
    )


def _optimizer(module: QdqModule, settings: FineTuneConfig) -> torch.optim.Adam:
    """Return Adam over the module's integer weights, integer biases and fp32 tensors, each at its learning rate."""
    weights: list[torch.nn.Parameter] = []
    biases: list[torch.nn.Parameter] = []
    for name, (key, _) in module.integer_params.items():
        (biases if name in module.bias_names else weights).append(getattr(module, key))
    floats = [getattr(module, key) for key in module.float_params.values()]
    groups = [
        {"params": weights, "lr": settings.weight_learning_rate},
        {"params": biases, "lr": settings.bias_learning_rate},
        {"params": floats, "lr": settings.float_learning_rate},
    ]
    return torch.optim.Adam([group for group in groups if group["params"]])


def _check_source(source_model: onnx.ModelProto, module: QdqModule) -> None:
    """Raise ValueError unless the fp32 source has the QDQ model's inputs and as many outputs."""
    initializers = {init.name for init in source_model.graph.initializer}
    source_inputs = [i.name for i in source_model.graph.input if i.name not in initializers]
    source_outputs = [o.name for o in source_model.graph.output]
    if sorted(source_inputs) != sorted(module.input_names) or len(source_outputs) != len(module.output_names):
        raise ValueError(
            f"source_model (inputs {source_inputs}, outputs {source_outputs}) does not match the QDQ model "
            f"(inputs {module.input_names}, outputs {module.output_names}): pass the fp32 model it was quantized from"
        )


def _checked_samples(
    graph: onnx.GraphProto, input_names: list[str], inputs: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """Return the samples of each model input as arrays; raise ValueError or QuantizationError for bad ones.

    Every input needs finite numbers, the same sample count and the model's rank and fixed sizes after axis 0.
    """
    missing = sorted(set(input_names) - set(inputs))
    if missing:
        raise ValueError(f"no samples for model inputs {missing}: pass one array per input in inputs")
    declared = {value.name: value.type.tensor_type for value in graph.input}
    samples: dict[str, np.ndarray] = {}
    for name in input_names:
        tensor_type = declared[name]
        if tensor_type.elem_type != onnx.TensorProto.FLOAT:
            type_name = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
            raise QuantizationError(
                f"model input {name!r} is {type_name}: fine-tuning feeds float32 samples only; "
                "quantize without fine-tuning"
            )
        array = np.asarray(inputs[name])
        if array.dtype.kind not in "biuf":
            raise ValueError(f"samples for input {name!r} have dtype {array.dtype}: pass a numeric array")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        expected = ["N", *(d if d is not None else "?" for d in dims[1:])]
        sizes_match = all(d is None or d == size for d, size in zip(dims[1:], array.shape[1:], strict=False))
        if tensor_type.HasField("shape") and (array.ndim != len(dims) or not sizes_match):
            raise ValueError(
                f"samples for input {name!r} have shape {array.shape}, expected ({', '.join(map(str, expected))}) "
                "with the samples along axis 0"
            )
        non_finite = int(np.count_nonzero(~np.isfinite(array)))
        if non_finite:
            raise ValueError(
                f"samples for input {name!r} contain {non_finite} NaN or infinite values: remove or replace them"
            )
        samples[name] = array
    counts = {name: len(array) for name, array in samples.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"the inputs have different sample counts {counts}: pass the same number for each input")
    return samples


def _distillation_loss(outputs: list[torch.Tensor], targets: list[torch.Tensor], power: list[float]) -> torch.Tensor:
    loss = torch.zeros(())
    for output, target, scale in zip(outputs, targets, power, strict=True):
        loss = loss + functional.mse_loss(output, target) / scale
        if output.dim() == 2:
            loss = loss + functional.kl_div(
                functional.log_softmax(output, dim=1),
                functional.log_softmax(target, dim=1),
                log_target=True,
                reduction="batchmean",
            )
    return loss


def _run_onnxruntime(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run the samples one at a time (a graph may fix its batch size at 1); return each output stacked."""
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        count = len(next(iter(feeds.values())))
        runs = [session.run(None, {name: array[i : i + 1] for name, array in feeds.items()}) for i in range(count)]
    except Exception as error:  # onnxruntime raises several private exception types.
        raise QuantizationError(f"onnxruntime could not run the model during fine-tuning: {error}") from error
    return [np.concatenate([np.asarray(run[k]) for run in runs]) for k in range(len(runs[0]))]


def _relative_error(outputs: list[np.ndarray], targets: list[np.ndarray]) -> float:
    error = sum(float(np.mean((o.astype(np.float64) - t) ** 2)) for o, t in zip(outputs, targets, strict=True))
    power = sum(float(np.mean(t.astype(np.float64) ** 2)) for t in targets)
    return error / power if power else error


def _decibels(relative_error: float) -> float:
    return float("inf") if relative_error <= 0 else -10.0 * float(np.log10(relative_error))


def _with_initializers(model: onnx.ModelProto, tensors: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for initializer in result.graph.initializer:
        if initializer.name in tensors:
            initializer.CopyFrom(numpy_helper.from_array(tensors[initializer.name], initializer.name))
    return result
