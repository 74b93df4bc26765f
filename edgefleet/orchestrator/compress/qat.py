"""Quantization-aware fine-tuning of an int8 QDQ ONNX model: distillation from its fp32 source."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as functional
from onnx import helper, numpy_helper

from edgefleet.orchestrator.compress.quantize import QuantizationError

logger = logging.getLogger(__name__)

_TRAINABLE_CONSUMERS = frozenset({"Conv", "Gemm", "MatMul"})


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


class _RoundThrough(torch.autograd.Function):
    """Rounding whose gradient is passed through unchanged (the straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor) -> torch.Tensor:
        return torch.round(values)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _round(values: torch.Tensor) -> torch.Tensor:
    result: torch.Tensor = _RoundThrough.apply(values)
    return result


class QdqModule(torch.nn.Module):
    """A QDQ ONNX graph run in torch, with QuantizeLinear simulated by rounding and clamping.

    The integer initializers that DequantizeLinear turns into Conv, Gemm or MatMul weights and biases are
    trainable, in units of their scale, and so are the fp32 weights of such nodes kept in fp32. Signed weights
    stay within the symmetric range (+-127 for int8) that onnxruntime's quantizer writes them in.
    A batch along axis 0 gives the outputs of onnxruntime run on each sample alone, stacked along axis 0,
    also for a graph that fixes its batch size at 1. Raises
    QuantizationError for an operator or attribute it does not simulate.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        self.graph = model.graph
        self.constants: dict[str, torch.Tensor] = {}
        self.integer_params: dict[str, tuple[str, tuple[int, int]]] = {}  # initializer -> parameter, range
        self.float_params: dict[str, str] = {}
        arrays = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
        self._arrays = arrays
        weights, biases = _trainable_initializers(model.graph, arrays)
        self.bias_names = {name for name in biases if arrays[name].dtype != np.float32}
        for index, (name, array) in enumerate(arrays.items()):
            if name in weights or name in biases:
                key = f"p{index}"
                self.register_parameter(key, torch.nn.Parameter(torch.from_numpy(array.astype(np.float32))))
                if array.dtype == np.float32:
                    self.float_params[name] = key
                else:
                    limits = _integer_range(array.dtype) if name in biases else _weight_range(array.dtype)
                    assert limits is not None  # _trainable_initializers keeps integer dtypes only.
                    self.integer_params[name] = (key, limits)
            else:
                self.constants[name] = _constant(name, array)
        for node in model.graph.node:
            quantization_op = node.op_type in ("QuantizeLinear", "DequantizeLinear")
            if node.domain not in ("", "ai.onnx") and not (node.domain == "com.microsoft" and quantization_op):
                raise QuantizationError(
                    f"fine-tuning cannot simulate operator {node.domain}::{node.op_type} (node {node.name!r}) "
                    "from a custom domain; quantize without fine-tuning"
                )
            if node.op_type not in _OPS:
                raise QuantizationError(
                    f"fine-tuning cannot simulate operator {node.op_type} (node {node.name!r}): "
                    f"supported operators are {sorted(_OPS)}; quantize without fine-tuning"
                )
        self._node_limits = [self._integer_limits(node) for node in model.graph.node]
        # Softmax before opset 13 flattens its input to 2-D at axis (default 1).
        legacy = {"Softmax": _softmax_coerced} if _default_opset(model) < 13 else {}
        self._node_ops = [legacy.get(node.op_type, _OPS[node.op_type]) for node in model.graph.node]
        self.input_names = [i.name for i in model.graph.input if i.name not in arrays]
        self.output_names = [o.name for o in model.graph.output]

    def forward(self, feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        values: dict[str, Any] = dict(feeds)
        for node, operator, limits in zip(self.graph.node, self._node_ops, self._node_limits, strict=True):
            inputs = [self._value(values, name) if name else None for name in node.input]
            outputs = operator(node, inputs, limits)
            for name, value in zip(node.output, outputs, strict=False):
                values[name] = value
        return [values[name] for name in self.output_names]

    def _value(self, values: dict[str, Any], name: str) -> Any:
        if name in values:
            return values[name]
        if name in self.float_params:
            return getattr(self, self.float_params[name])
        if name in self.integer_params:
            key, (low, high) = self.integer_params[name]
            return torch.clamp(_round(getattr(self, key)), low, high)
        return self.constants[name]

    def _integer_limits(self, node: onnx.NodeProto) -> tuple[int, int] | None:
        """Return the integer range a QuantizeLinear node clamps to, None for other nodes."""
        if node.op_type != "QuantizeLinear":
            return None
        zero_point = node.input[2] if len(node.input) > 2 else ""
        if zero_point and zero_point not in self._arrays:
            raise QuantizationError(
                f"the zero point {zero_point!r} of QuantizeLinear node {node.name!r} is computed in the graph: "
                "fine-tuning needs it as an initializer; quantize without fine-tuning"
            )
        if zero_point:
            dtype = self._arrays[zero_point].dtype
        else:
            # Without a zero point the output type is the output_dtype attribute (opset 21), by default uint8.
            dtype = helper.tensor_dtype_to_np_dtype(_attribute(node, "output_dtype", onnx.TensorProto.UINT8))
        limits = _integer_range(dtype)
        if limits is None:
            raise QuantizationError(
                f"QuantizeLinear node {node.name!r} outputs {dtype}: fine-tuning simulates integer outputs only; "
                "quantize without fine-tuning"
            )
        return limits

    def integer_tensors(self) -> dict[str, np.ndarray]:
        """Return the trained integer initializers, rounded and clamped, in their ONNX dtypes."""
        result = {}
        for name, (key, (low, high)) in self.integer_params.items():
            values = torch.clamp(torch.round(getattr(self, key).detach()), low, high).numpy()
            result[name] = values.astype(self._arrays[name].dtype)
        return result

    def float_tensors(self) -> dict[str, np.ndarray]:
        """Return the trained fp32 initializers."""
        return {name: getattr(self, key).detach().numpy().copy() for name, key in self.float_params.items()}


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
    holdout = max(1, round(count * settings.holdout_fraction))
    train_count = count - holdout
    if train_count < 2 * settings.batch_size:
        raise ValueError(
            f"{count} samples are too few to fine-tune with batch_size {settings.batch_size}: "
            f"need at least {2 * settings.batch_size + holdout}, {holdout} of them held out"
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
    groups = [
        {
            "params": [
                getattr(module, key)
                for name, (key, _) in module.integer_params.items()
                if name not in module.bias_names
            ],
            "lr": settings.weight_learning_rate,
        },
        {
            "params": [
                getattr(module, key) for name, (key, _) in module.integer_params.items() if name in module.bias_names
            ],
            "lr": settings.bias_learning_rate,
        },
        {"params": [getattr(module, key) for key in module.float_params.values()], "lr": settings.float_learning_rate},
    ]
    optimizer = torch.optim.Adam([group for group in groups if group["params"]])
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
    logger.info(
        "fine-tuned %d tensors for %d steps in %.0f s: held-out error %.3g -> %.3g (SQNR %.1f -> %.1f dB)%s",
        len(module.integer_params) + len(module.float_params),
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
        trained_tensors=len(module.integer_params) + len(module.float_params),
        seconds=seconds,
    )


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


def _trainable_initializers(graph: onnx.GraphProto, arrays: dict[str, np.ndarray]) -> tuple[set[str], set[str]]:
    """Return the initializers that are, directly or through a DequantizeLinear, Conv/Gemm/MatMul weights and biases.

    Only fp32 and integer initializers count. A bias is input 2 of Conv (B) or Gemm (C).
    """
    producers = {output: node for node in graph.node for output in node.output}
    weights: set[str] = set()
    biases: set[str] = set()
    for node in graph.node:
        if node.op_type not in _TRAINABLE_CONSUMERS:
            continue
        for position, name in enumerate(node.input[1:3], start=1):
            found = biases if position == 2 else weights
            producer = producers.get(name)
            if name in arrays and arrays[name].dtype == np.float32:
                found.add(name)
            elif producer is not None and producer.op_type == "DequantizeLinear":
                stored = producer.input[0]
                if stored in arrays and _integer_range(arrays[stored].dtype) is not None:
                    found.add(stored)
    return weights, biases


def _integer_range(dtype: np.dtype[Any]) -> tuple[int, int] | None:
    """Return the (min, max) of an integer dtype, 4-bit ml_dtypes included, or None for other dtypes."""
    try:
        info = ml_dtypes.iinfo(dtype)
    except ValueError:
        return None
    return int(info.min), int(info.max)


def _weight_range(dtype: np.dtype[Any]) -> tuple[int, int] | None:
    """Return the range of a weight dtype: symmetric for signed types (+-127 for int8), full for unsigned ones."""
    limits = _integer_range(dtype)
    if limits is None or limits[0] == 0:
        return limits
    return -limits[1], limits[1]


def _constant(name: str, array: np.ndarray) -> torch.Tensor:
    """Return an initializer as a tensor; 4-bit integers (ml_dtypes, which torch lacks) become int8."""
    if array.dtype in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4)):
        array = array.astype(np.int8)
    try:
        return torch.from_numpy(np.array(array))
    except TypeError as error:
        raise QuantizationError(
            f"fine-tuning cannot hold initializer {name!r} of dtype {array.dtype} in torch: "
            "quantize without fine-tuning"
        ) from error


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


# Operators: each takes the node, its input values (None for an omitted optional input) and, for
# QuantizeLinear, the integer range; it returns the output values.
_Op = Callable[[onnx.NodeProto, list[Any], "tuple[int, int] | None"], list[torch.Tensor]]


def _attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def _per_axis(parameter: torch.Tensor, node: onnx.NodeProto, values: torch.Tensor) -> torch.Tensor:
    """Shape a per-axis or blocked scale or zero point to broadcast along the node's axis of values."""
    if parameter.dim() == 0 or parameter.numel() == 1:
        return parameter.reshape(())
    rank = values.dim()
    axis = _attribute(node, "axis", 1) % rank
    block_size = _attribute(node, "block_size", 0)
    if block_size:
        # Blocked quantization (opset 21): the parameter has values' rank, one entry per block_size along axis.
        return parameter.repeat_interleave(block_size, dim=axis).narrow(axis, 0, values.shape[axis])
    shape = [1] * rank
    shape[axis] = -1
    return parameter.reshape(shape)


def _quantize(node: onnx.NodeProto, inputs: list[Any], limits: tuple[int, int] | None) -> list[torch.Tensor]:
    values = inputs[0]
    scale = _per_axis(inputs[1].float(), node, values)
    zero_point = _per_axis(inputs[2].float(), node, values) if len(inputs) > 2 and inputs[2] is not None else 0.0
    assert limits is not None
    return [torch.clamp(_round(values / scale) + zero_point, limits[0], limits[1])]


def _dequantize(node: onnx.NodeProto, inputs: list[Any], _limits: tuple[int, int] | None) -> list[torch.Tensor]:
    values = inputs[0].float()
    scale = _per_axis(inputs[1].float(), node, values)
    zero_point = _per_axis(inputs[2].float(), node, values) if len(inputs) > 2 and inputs[2] is not None else 0.0
    return [(values - zero_point) * scale]


def _explicit_pads(node: onnx.NodeProto, spatial: int) -> list[int]:
    auto_pad = _attribute(node, "auto_pad", b"NOTSET")
    if auto_pad not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise QuantizationError(
            f"fine-tuning cannot simulate auto_pad={auto_pad!r} of node {node.name!r}: export with explicit pads"
        )
    return list(_attribute(node, "pads", [0] * (2 * spatial)))


def _padded(values: torch.Tensor, pads: list[int], spatial: int, fill: float = 0.0) -> torch.Tensor:
    """Apply ONNX pads [begin_1, ..., begin_n, end_1, ..., end_n] to the last spatial axes."""
    if not any(pads):
        return values
    torch_pads: list[int] = []
    for axis in reversed(range(spatial)):
        torch_pads += [pads[axis], pads[axis + spatial]]
    return functional.pad(values, torch_pads, value=fill)


def _conv(node: onnx.NodeProto, inputs: list[Any], _limits: tuple[int, int] | None) -> list[torch.Tensor]:
    values, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    spatial = weight.dim() - 2
    if spatial not in (1, 2):
        raise QuantizationError(f"fine-tuning simulates 1-D and 2-D Conv only; node {node.name!r} is {spatial}-D")
    values = _padded(values, _explicit_pads(node, spatial), spatial)
    convolve = functional.conv2d if spatial == 2 else functional.conv1d
    output = convolve(
        values,
        weight,
        bias,
        stride=tuple(_attribute(node, "strides", [1] * spatial)),
        dilation=tuple(_attribute(node, "dilations", [1] * spatial)),
        groups=_attribute(node, "group", 1),
    )
    return [output]


def _gemm(node: onnx.NodeProto, inputs: list[Any], _limits: tuple[int, int] | None) -> list[torch.Tensor]:
    a, b = inputs[0], inputs[1]
    if _attribute(node, "transA", 0):
        a = a.t()
    if _attribute(node, "transB", 0):
        b = b.t()
    output = _attribute(node, "alpha", 1.0) * (a @ b)
    if len(inputs) > 2 and inputs[2] is not None:
        output = output + _attribute(node, "beta", 1.0) * inputs[2]
    return [output]


def _pool(node: onnx.NodeProto, inputs: list[Any], _limits: tuple[int, int] | None) -> list[torch.Tensor]:
    values = inputs[0]
    kernel = list(_attribute(node, "kernel_shape", []))
    spatial = len(kernel)
    if spatial != 2 or _attribute(node, "ceil_mode", 0) or any(d != 1 for d in _attribute(node, "dilations", [1, 1])):
        raise QuantizationError(
            f"fine-tuning simulates 2-D pooling without ceil_mode or dilation only; node {node.name!r} differs"
        )
    strides = tuple(_attribute(node, "strides", [1, 1]))
    pads = _explicit_pads(node, spatial)
    if node.op_type == "MaxPool":
        return [functional.max_pool2d(_padded(values, pads, spatial, float("-inf")), kernel, strides)]
    if _attribute(node, "count_include_pad", 0) or not any(pads):
        return [functional.avg_pool2d(_padded(values, pads, spatial), kernel, strides)]
    ones = _padded(torch.ones_like(values[:1, :1]), pads, spatial)
    total = functional.avg_pool2d(_padded(values, pads, spatial), kernel, strides)
    return [total / functional.avg_pool2d(ones, kernel, strides)]


def _reduce_mean(node: onnx.NodeProto, inputs: list[Any], _limits: tuple[int, int] | None) -> list[torch.Tensor]:
    axes = inputs[1].tolist() if len(inputs) > 1 and inputs[1] is not None else _attribute(node, "axes", None)
    keep = bool(_attribute(node, "keepdims", 1))
    if not axes and _attribute(node, "noop_with_empty_axes", 0):
        return [inputs[0]]
    rank = inputs[0].dim()
    if not axes or 0 in [axis % rank for axis in axes]:
        raise QuantizationError(
            f"ReduceMean node {node.name!r} averages over the batch axis 0 (axes {axes}): fine-tuning treats "
            "samples independently; quantize without fine-tuning"
        )
    return [inputs[0].mean(dim=tuple(axes), keepdim=keep)]


def _reshape(node: onnx.NodeProto, inputs: list[Any], _limits: tuple[int, int] | None) -> list[torch.Tensor]:
    values = inputs[0]
    target = [int(v) for v in inputs[1].tolist()]
    shape = [values.shape[i] if v == 0 and not _attribute(node, "allowzero", 0) else v for i, v in enumerate(target)]
    if not shape or target[0] <= 0:
        return [values.reshape(shape)]
    # A fixed leading size is one sample's size, because onnxruntime runs the graph one sample at a time, so
    # the stacked samples multiply it. With a -1 elsewhere, the leading size is the batch of a graph fixed at 1.
    per_sample = int(np.prod(shape))
    if -1 in shape:
        shape[0] = values.shape[0]
    elif per_sample and values.numel() % per_sample == 0:
        shape[0] *= values.numel() // per_sample
    else:
        raise QuantizationError(
            f"Reshape node {node.name!r} cannot reshape {tuple(values.shape)} to {target} sample by sample; "
            "quantize without fine-tuning"
        )
    return [values.reshape(shape)]


def _flatten(node: onnx.NodeProto, inputs: list[Any], _limits: tuple[int, int] | None) -> list[torch.Tensor]:
    values = inputs[0]
    axis = _attribute(node, "axis", 1)
    axis = axis + values.dim() if axis < 0 else axis  # Flatten's axis may equal the rank.
    return [values.reshape(int(np.prod(values.shape[:axis])), -1)]


def _clip(node: onnx.NodeProto, inputs: list[Any], _limits: tuple[int, int] | None) -> list[torch.Tensor]:
    # Before opset 11 the bounds are the min and max attributes.
    low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else _attribute(node, "min", None)
    high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else _attribute(node, "max", None)
    if low is None and high is None:
        return [inputs[0]]
    return [torch.clamp(inputs[0], None if low is None else float(low), None if high is None else float(high))]


def _softmax_coerced(node: onnx.NodeProto, inputs: list[Any], _limits: tuple[int, int] | None) -> list[torch.Tensor]:
    values = inputs[0]
    axis = _attribute(node, "axis", 1) % values.dim()
    coerced = values.reshape(int(np.prod(values.shape[:axis])), -1)
    return [torch.softmax(coerced, dim=1).reshape(values.shape)]


def _hard_sigmoid(node: onnx.NodeProto, inputs: list[Any], _limits: tuple[int, int] | None) -> list[torch.Tensor]:
    alpha, beta = _attribute(node, "alpha", 0.2), _attribute(node, "beta", 0.5)
    return [torch.clamp(alpha * inputs[0] + beta, 0.0, 1.0)]


def _unary(function: Callable[[torch.Tensor], torch.Tensor]) -> _Op:
    return lambda node, inputs, limits: [function(inputs[0])]


def _binary(function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> _Op:
    return lambda node, inputs, limits: [function(inputs[0], inputs[1])]


_OPS: dict[str, _Op] = {
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(torch.div),
    "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "HardSwish": _unary(functional.hardswish),
    "HardSigmoid": _hard_sigmoid,
    "Identity": _unary(lambda values: values),
    "Clip": _clip,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": _unary(lambda values: values.mean(dim=tuple(range(2, values.dim())), keepdim=True)),
    "ReduceMean": _reduce_mean,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Concat": lambda node, inputs, limits: [torch.cat(inputs, dim=_attribute(node, "axis", 0))],
    "Softmax": lambda node, inputs, limits: [torch.softmax(inputs[0], dim=_attribute(node, "axis", -1))],
}
