"""Run int8 QDQ ONNX graphs in torch, with QuantizeLinear simulated by rounding and clamping."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import torch
import torch.nn.functional as functional
from onnx import helper, numpy_helper

from edgefleet.orchestrator.compress.quantize import QuantizationError, default_opset

_TRAINABLE_CONSUMERS = frozenset({"Conv", "Gemm", "MatMul"})


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
    stay within the largest magnitude the quantizer wrote (+-127 for int8, +-64 with reduce_range).
    A batch along axis 0 gives the outputs of onnxruntime run on each sample alone, stacked along axis 0,
    also for a graph that fixes its batch size at 1. Raises
    QuantizationError for an operator or attribute it does not simulate.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        _check_operators(model.graph)
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
                    limits = _integer_range(array.dtype) if name in biases else _weight_range(array)
                    assert limits is not None  # _trainable_initializers keeps integer dtypes only.
                    self.integer_params[name] = (key, limits)
            else:
                self.constants[name] = _constant(name, array)

        self._node_limits = [self._integer_limits(node) for node in model.graph.node]
        # Softmax before opset 13 flattens its input to 2-D at axis (default 1).
        legacy = {"Softmax": _softmax_coerced} if default_opset(model) < 13 else {}
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
            return self._integer_value(name)
        return self.constants[name]

    def _integer_value(self, name: str) -> torch.Tensor:
        """Return a trainable integer initializer rounded (gradient passed through) and clamped to its range."""
        key, (low, high) = self.integer_params[name]
        return torch.clamp(_round(getattr(self, key)), low, high)

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
        with torch.no_grad():
            return {
                name: self._integer_value(name).numpy().astype(self._arrays[name].dtype) for name in self.integer_params
            }

    def float_tensors(self) -> dict[str, np.ndarray]:
        """Return the trained fp32 initializers."""
        return {name: getattr(self, key).detach().numpy().copy() for name, key in self.float_params.items()}


def _check_operators(graph: onnx.GraphProto) -> None:
    """Raise QuantizationError for a node from a custom domain or an operator the simulation lacks."""
    for node in graph.node:
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


def _weight_range(weight: np.ndarray) -> tuple[int, int] | None:
    """Return the range a quantized weight may take: full for unsigned types, symmetric for signed ones.

    A signed weight stays within +-max|q| of its values, so a 7-bit reduce_range weight (+-64) stays
    7-bit. onnxruntime maps each tensor's or channel's largest magnitude to the end of the range
    (+-127 for int8), so this bound restricts nothing there. An all-zero weight gets the dtype's
    symmetric range.
    """
    limits = _integer_range(weight.dtype)
    if limits is None or limits[0] == 0:
        return limits
    largest = int(np.abs(weight.astype(np.int64)).max(initial=0))
    bound = min(largest, limits[1]) if largest > 0 else limits[1]
    return -bound, bound


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


# Operators: each takes the node, its input values (None for an omitted optional input) and, for
# QuantizeLinear, the integer range; it returns the output values.
_Op = Callable[[onnx.NodeProto, list[Any], "tuple[int, int] | None"], list[torch.Tensor]]


def _attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


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
        raise QuantizationError(
            f"fine-tuning stacks samples along axis 0, so it cannot simulate Gemm node {node.name!r} with "
            "transA=1, which reads them along axis 1; quantize without fine-tuning"
        )
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
    _reject_batch_axis(node, axis, values.dim() + 1)
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
    _reject_batch_axis(node, axis, values.dim())
    coerced = values.reshape(int(np.prod(values.shape[:axis])), -1)
    return [torch.softmax(coerced, dim=1).reshape(values.shape)]


def _hard_sigmoid(node: onnx.NodeProto, inputs: list[Any], _limits: tuple[int, int] | None) -> list[torch.Tensor]:
    alpha, beta = _attribute(node, "alpha", 0.2), _attribute(node, "beta", 0.5)
    return [torch.clamp(alpha * inputs[0] + beta, 0.0, 1.0)]


def _reject_batch_axis(node: onnx.NodeProto, axis: int, rank: int) -> None:
    """Raise QuantizationError when a node works along axis 0, where the simulation stacks the samples."""
    if axis % rank == 0:
        raise QuantizationError(
            f"fine-tuning stacks samples along axis 0, so it cannot simulate {node.op_type} node {node.name!r}, "
            "which works along that axis; quantize without fine-tuning"
        )


def _concat(node: onnx.NodeProto, inputs: list[Any], _limits: tuple[int, int] | None) -> list[torch.Tensor]:
    axis = _attribute(node, "axis", 0)
    _reject_batch_axis(node, axis, inputs[0].dim())
    return [torch.cat(inputs, dim=axis)]


def _softmax(node: onnx.NodeProto, inputs: list[Any], _limits: tuple[int, int] | None) -> list[torch.Tensor]:
    axis = _attribute(node, "axis", -1)
    _reject_batch_axis(node, axis, inputs[0].dim())
    return [torch.softmax(inputs[0], dim=axis)]


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
    "Concat": _concat,
    "Softmax": _softmax,
}
