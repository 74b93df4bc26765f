"""AdaRound: learned int8 rounding of the Conv weights of an fp32 ONNX model, fitted on calibration data."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as functional
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType, quantize_data

from edgefleet.orchestrator.compress.quantize import set_initializer_input

logger = logging.getLogger(__name__)

# Stretch of the rectified sigmoid h(V) = clip(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1), as in Nagel et al.
# 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization".
ZETA = 1.1
GAMMA = -0.1


@dataclass(frozen=True)
class AdaRoundConfig:
    """Settings of the per-layer rounding optimisation.

    Each layer is fitted on rows, where a row is one output position of one calibration sample. The rows are
    up to positions_per_sample random positions of each of the first max_samples samples. Layers with long
    input patches get fewer rows, so that rows x patch length stays within max_patch_values.
    """

    iterations: int = 200
    batch_rows: int = 512
    max_samples: int = 64
    positions_per_sample: int = 32
    max_patch_values: int = 1 << 24
    learning_rate: float = 0.05
    # Weight of the regularizer that drives h(V) to 0 or 1, relative to the reconstruction error of
    # nearest rounding (the error is divided by that value, so it starts near 1).
    regularization: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # Fraction of the iterations without the regularizer.
    seed: int = 0
    # Read by quantize_static_qdq only: quantize the activations in the runs that produce each layer's
    # input, with the ranges of a first quantization with nearest rounding. It measured no gain on
    # EfficientNet-Lite0 (docs/compression.md), so it is off by default.
    quantized_inputs: bool = False


@dataclass(frozen=True)
class AdaRoundResult:
    """A model whose rounded Conv weights lie on the int8 grid, and the per-layer error it reached.

    error_ratios maps each rounded node to its mean squared output error with the learned rounding
    divided by that with nearest rounding, both on the same calibration rows and quantized inputs.
    """

    model: onnx.ModelProto
    rounded_nodes: tuple[str, ...]
    error_ratios: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _ConvLayer:
    node: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilations: tuple[int, int]
    groups: int
    clamp: tuple[float, float] | None  # The Relu or Clip that is the conv's only consumer.


def adaround_weights(
    model: onnx.ModelProto,
    batches: list[dict[str, np.ndarray]],
    *,
    per_channel: bool = True,
    reduce_range: bool = False,
    nodes_to_exclude: tuple[str, ...] = (),
    correct_biases: bool = True,
    config: AdaRoundConfig | None = None,
    activation_quantization: dict[str, tuple[onnx.TensorProto, onnx.TensorProto]] | None = None,
) -> AdaRoundResult:
    """Choose the int8 rounding of each 2-D Conv weight to minimise the layer's output error.

    Conv nodes with float32 weight initializers are processed in graph order (skipping nodes_to_exclude).
    For each, the input comes from the model with the already processed layers rounded. The target is the
    fp32 model's output of that layer, passed through the Relu or Clip that follows it. AdaRound then
    learns per weight whether to round down or up. The int8 grid is onnxruntime's symmetric one, per
    output channel when per_channel and 7-bit when reduce_range. Each channel's largest weight keeps its
    value, so onnxruntime's quantizer picks the same scale and rounds the returned fp32 weights to exactly
    the chosen integers. With correct_biases, each bias then absorbs the mean output
    error per channel, which also covers errors from the layers before it. activation_quantization maps
    activation tensors to their scale and zero point initializers (see activation_quantization_params).
    Those tensors are then quantized and dequantized in the runs that produce each layer's input, so the
    learned rounding also accounts for the activation errors of the int8 model. Without it, activations
    stay fp32.

    Returns the model copy and per-layer figures. Raises ValueError when batches is empty. onnxruntime's
    exceptions propagate when the model does not run on the batches.
    """
    if not batches:
        raise ValueError("adaround_weights needs at least one calibration batch, got none")
    settings = config or AdaRoundConfig()
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    layers = _conv_layers(rounded, nodes_to_exclude)
    if not layers:
        logger.info("AdaRound found no 2-D Conv node with a float32 weight initializer")
        return AdaRoundResult(rounded, ())

    samples = _split_samples(batches, settings.max_samples)
    rng = np.random.default_rng(settings.seed)
    started = time.monotonic()
    targets = _reference_rows(model, layers, samples, settings, rng)
    _qmin, qmax = get_qmin_qmax_for_qType(TensorProto.INT8, reduce_range=reduce_range, symmetric=True)

    ratios: dict[str, float] = {}
    for layer, (positions, target) in zip(layers, targets, strict=True):
        layer_started = time.monotonic()
        inputs = _layer_input_rows(rounded, layer, samples, positions, activation_quantization or {})
        rows = _limit_rows(inputs, target, settings, rng)
        inputs_seconds = time.monotonic() - layer_started
        weight, scale = _grid(layer.weight, per_channel, reduce_range)
        integers, ratio = _learn_rounding(layer, rows[0], rows[1], weight, scale, int(qmax), settings)
        new_weight = (integers * scale).astype(np.float32)
        bias = layer.bias
        if correct_biases:
            bias = (layer.bias + _mean_residual(layer, rows[0], rows[1], new_weight)).astype(np.float32)
        _write_layer(rounded, layer.node, new_weight, bias)
        ratios[layer.node.name] = ratio
        logger.debug(
            "AdaRound %s: %d rows x %d, output error %.3f of nearest rounding, inputs %.1f s, total %.1f s",
            layer.node.name,
            rows[0].shape[0],
            rows[0].shape[1],
            ratio,
            inputs_seconds,
            time.monotonic() - layer_started,
        )

    logger.info(
        "AdaRound rounded %d Conv nodes on %d calibration samples in %.1f s (median error ratio %.3f)",
        len(layers),
        len(samples),
        time.monotonic() - started,
        float(np.median(list(ratios.values()))),
    )
    return AdaRoundResult(rounded, tuple(layer.node.name for layer in layers), ratios)


def _conv_layers(model: onnx.ModelProto, nodes_to_exclude: tuple[str, ...]) -> list[_ConvLayer]:
    initializers = {init.name: init for init in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    layers = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name in nodes_to_exclude or len(node.input) < 2:
            continue
        weight_init = initializers.get(node.input[1])
        if weight_init is None or weight_init.data_type != TensorProto.FLOAT or len(weight_init.dims) != 4:
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            logger.info("AdaRound skips %s: auto_pad %s is not supported", node.name, attributes["auto_pad"])
            continue
        bias_name = node.input[2] if len(node.input) > 2 else ""
        if bias_name and (bias_name not in initializers or initializers[bias_name].data_type != TensorProto.FLOAT):
            continue
        weight = numpy_helper.to_array(weight_init).astype(np.float32)
        bias = numpy_helper.to_array(initializers[bias_name]) if bias_name else np.zeros(weight.shape[0])
        pads = tuple(int(p) for p in attributes.get("pads", [0, 0, 0, 0]))
        layers.append(
            _ConvLayer(
                node=node,
                weight=weight,
                bias=bias.astype(np.float32),
                strides=_pair(attributes.get("strides", [1, 1])),
                pads=(pads[0], pads[1], pads[2], pads[3]),
                dilations=_pair(attributes.get("dilations", [1, 1])),
                groups=int(attributes.get("group", 1)),
                clamp=_following_clamp(model, node, consumers, initializers),
            )
        )
    return layers


def _pair(values: list[int]) -> tuple[int, int]:
    return int(values[0]), int(values[1])


def _following_clamp(
    model: onnx.ModelProto,
    node: onnx.NodeProto,
    consumers: dict[str, list[onnx.NodeProto]],
    initializers: dict[str, onnx.TensorProto],
) -> tuple[float, float] | None:
    users = consumers.get(node.output[0], [])
    if len(users) != 1 or any(output.name == node.output[0] for output in model.graph.output):
        return None
    user = users[0]
    if user.op_type == "Relu":
        return 0.0, float("inf")
    if user.op_type != "Clip":
        return None
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    bounds = [-float("inf"), float("inf")]
    for position in (1, 2):
        name = user.input[position] if len(user.input) > position else ""
        if not name:
            continue
        if name in initializers:
            bounds[position - 1] = float(numpy_helper.to_array(initializers[name]))
        elif name in constants:
            bounds[position - 1] = float(numpy_helper.to_array(constants[name].attribute[0].t))
        else:
            return None
    for attribute in user.attribute:  # Clip before opset 11 has min and max attributes.
        if attribute.name in ("min", "max"):
            bounds[0 if attribute.name == "min" else 1] = float(helper.get_attribute_value(attribute))
    return bounds[0], bounds[1]


def _split_samples(batches: list[dict[str, np.ndarray]], max_samples: int) -> list[dict[str, np.ndarray]]:
    """Split batches into single-sample feeds, because the model may have a fixed batch size of 1."""
    samples = []
    for batch in batches:
        size = int(next(iter(batch.values())).shape[0])
        for index in range(size):
            samples.append({name: value[index : index + 1] for name, value in batch.items()})
            if len(samples) == max_samples:
                return samples
    return samples


def _reference_rows(
    model: onnx.ModelProto,
    layers: list[_ConvLayer],
    samples: list[dict[str, np.ndarray]],
    settings: AdaRoundConfig,
    rng: np.random.Generator,
) -> list[tuple[list[np.ndarray], np.ndarray]]:
    """Run the fp32 model once; per layer, return the sampled output positions and fp32 outputs there."""
    names = [layer.node.output[0] for layer in layers]
    session = _session(_with_outputs(model, names))
    positions: list[list[np.ndarray]] = [[] for _ in layers]
    rows: list[list[np.ndarray]] = [[] for _ in layers]
    for sample in samples:
        for index, output in enumerate(session.run(names, sample)):
            flat = np.asarray(output, dtype=np.float32).reshape(output.shape[1], -1)
            count = min(settings.positions_per_sample, flat.shape[1])
            chosen = rng.choice(flat.shape[1], size=count, replace=False)
            positions[index].append(chosen)
            rows[index].append(flat[:, chosen].T)
    return [(positions[i], np.concatenate(rows[i])) for i in range(len(layers))]


def _layer_input_rows(
    model: onnx.ModelProto,
    layer: _ConvLayer,
    samples: list[dict[str, np.ndarray]],
    positions: list[np.ndarray],
    activation_quantization: dict[str, tuple[onnx.TensorProto, onnx.TensorProto]],
) -> np.ndarray:
    """Run the model up to the layer's input and return the input patch at each sampled output position."""
    name = layer.node.input[0]
    graph_inputs = {value.name for value in model.graph.input}
    if activation_quantization:
        simulated = _with_fake_quantization(model, activation_quantization)
        name = _dequantized_name(name) if name in activation_quantization else name
        session = _session(_prefix(simulated, name), optimize=False)
    elif name in graph_inputs:
        session = None
    else:
        session = _session(_prefix(model, name))
    kernel = layer.weight.shape[2:]
    top, left, bottom, right = layer.pads
    patches = []
    for sample, chosen in zip(samples, positions, strict=True):
        value = sample[name] if session is None else session.run([name], sample)[0]
        tensor = torch.from_numpy(np.asarray(value, dtype=np.float32))
        tensor = functional.pad(tensor, (left, right, top, bottom))
        unfolded = functional.unfold(tensor, kernel, dilation=layer.dilations, stride=layer.strides)
        patches.append(unfolded[0][:, torch.from_numpy(chosen)].T.numpy())
    return np.concatenate(patches)


def _limit_rows(
    inputs: np.ndarray, target: np.ndarray, settings: AdaRoundConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    limit = max(1, settings.max_patch_values // inputs.shape[1])
    if inputs.shape[0] <= limit:
        return inputs, target
    chosen = rng.choice(inputs.shape[0], size=limit, replace=False)
    return inputs[chosen], target[chosen]


def _grid(weight: np.ndarray, per_channel: bool, reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """Return the weight in grid units (weight / scale) and the scale, broadcastable to the weight."""
    channels = weight.reshape(weight.shape[0], -1) if per_channel else weight.reshape(1, -1)
    scales = np.empty(channels.shape[0], dtype=np.float32)
    for index, values in enumerate(channels):
        _zero_point, scale, _quantized = quantize_data(values, TensorProto.INT8, True, reduce_range)
        scales[index] = np.float32(scale)
    scale = scales.reshape((-1,) + (1,) * (weight.ndim - 1)) if per_channel else scales.reshape((1,) * weight.ndim)
    return weight / scale, scale


def _learn_rounding(
    layer: _ConvLayer,
    inputs: np.ndarray,
    target: np.ndarray,
    grid_weight: np.ndarray,
    scale: np.ndarray,
    qmax: int,
    settings: AdaRoundConfig,
) -> tuple[np.ndarray, float]:
    """Return the chosen integers (as float32) and the output error ratio against nearest rounding."""
    generator = torch.Generator().manual_seed(settings.seed)
    x = torch.from_numpy(inputs)
    y = torch.from_numpy(target)
    bias = torch.from_numpy(layer.bias)
    scale_t = torch.from_numpy(scale)
    floor = torch.from_numpy(np.floor(grid_weight))
    fraction = torch.from_numpy(grid_weight) - floor
    # Each channel's largest weight is pinned to +-qmax: it sets the scale that onnxruntime computes.
    pinned = _pinned_mask(grid_weight, scale.size > 1)
    nearest = torch.clamp(torch.round(torch.from_numpy(grid_weight)), -qmax, qmax)

    def output(integers: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        result = _conv_rows(rows, integers * scale_t, layer.groups) + bias
        return result if layer.clamp is None else torch.clamp(result, layer.clamp[0], layer.clamp[1])

    def error(integers: torch.Tensor, rows: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
        return ((output(integers, rows) - expected) ** 2).sum(dim=1).mean()

    with torch.no_grad():
        y = y if layer.clamp is None else torch.clamp(y, layer.clamp[0], layer.clamp[1])
        nearest_error = float(error(nearest, x, y))
    if nearest_error == 0.0:
        return nearest.numpy(), 1.0

    ratio = torch.clamp((fraction - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
    logits = torch.log(ratio / (1 - ratio)).requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=settings.learning_rate)
    warmup = int(settings.warmup * settings.iterations)
    for step in range(settings.iterations):
        chosen = torch.randint(0, x.shape[0], (min(settings.batch_rows, x.shape[0]),), generator=generator)
        soft = torch.clamp(torch.sigmoid(logits) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
        integers = torch.where(pinned, nearest, torch.clamp(floor + soft, -qmax, qmax))
        loss = error(integers, x[chosen], y[chosen]) / nearest_error
        if step >= warmup:
            progress = (step - warmup) / max(1, settings.iterations - warmup)
            beta = settings.beta_end + 0.5 * (settings.beta_start - settings.beta_end) * (1 + np.cos(np.pi * progress))
            loss = loss + settings.regularization * (1 - torch.abs(2 * soft - 1) ** beta).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        up = torch.sigmoid(logits) * (ZETA - GAMMA) + GAMMA >= 0.5
        integers = torch.where(pinned, nearest, torch.clamp(floor + up.float(), -qmax, qmax))
        learned_error = float(error(integers, x, y))
    if learned_error > nearest_error:
        # Hard rounding can lose against nearest rounding when the relaxation did not settle.
        return nearest.numpy(), 1.0
    return integers.numpy(), learned_error / nearest_error


def _pinned_mask(grid_weight: np.ndarray, per_channel: bool) -> torch.Tensor:
    flat = np.abs(grid_weight.reshape(grid_weight.shape[0], -1) if per_channel else grid_weight.reshape(1, -1))
    mask = np.zeros_like(flat, dtype=bool)
    mask[np.arange(flat.shape[0]), flat.argmax(axis=1)] = True
    return torch.from_numpy(mask.reshape(grid_weight.shape))


def _conv_rows(rows: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Apply a grouped conv to unfolded input patches: rows (R, C_in * kh * kw) -> (R, C_out)."""
    out_channels = weight.shape[0]
    if groups == out_channels and weight.shape[1] == 1:
        # Depthwise: an elementwise product is much faster than a batched matmul with one output per group.
        return (rows.reshape(rows.shape[0], groups, -1) * weight.reshape(1, groups, -1)).sum(dim=2)
    grouped_rows = rows.reshape(rows.shape[0], groups, -1)
    grouped_weight = weight.reshape(groups, out_channels // groups, -1)
    return torch.einsum("rgj,goj->rgo", grouped_rows, grouped_weight).reshape(rows.shape[0], out_channels)


def _mean_residual(layer: _ConvLayer, inputs: np.ndarray, target: np.ndarray, weight: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        actual = _conv_rows(torch.from_numpy(inputs), torch.from_numpy(weight), layer.groups).numpy() + layer.bias
    return (target.astype(np.float64) - actual).mean(axis=0)


def _write_layer(model: onnx.ModelProto, node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray) -> None:
    initializers = {init.name: init for init in model.graph.initializer}
    uses = Counter(name for n in model.graph.node for name in n.input)
    target = next(n for n in model.graph.node if n.name == node.name and n.output[0] == node.output[0])
    set_initializer_input(model, target, 1, weight, "adaround_weight", initializers, uses)
    if (len(target.input) > 2 and target.input[2]) or np.any(bias != 0):
        set_initializer_input(model, target, 2, bias, "adaround_bias", initializers, uses)


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    existing = {output.name for output in extended.graph.output}
    for name in names:
        if name not in existing:
            extended.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return extended.SerializeToString()


def _prefix(model: onnx.ModelProto, tensor: str) -> bytes:
    """Return the serialized subgraph that computes tensor, with tensor as its only output."""
    producers = {output: node for node in model.graph.node for output in node.output}
    required: set[int] = set()
    pending = [tensor]
    while pending:
        node = producers.get(pending.pop())
        if node is None or id(node) in required:
            continue
        required.add(id(node))
        pending.extend(name for name in node.input if name)
    nodes = [node for node in model.graph.node if id(node) in required]
    used = {name for node in nodes for name in node.input}
    graph = helper.make_graph(
        nodes,
        model.graph.name,
        [value for value in model.graph.input if value.name in used or value.name == tensor],
        [helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None)],
        initializer=[init for init in model.graph.initializer if init.name in used],
    )
    prefix = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return prefix.SerializeToString()


def _session(model: bytes, *, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:
        # Graph optimizations would fuse the fake quantization into int8 kernels and re-quantize fp32
        # weights that sit between DequantizeLinear and QuantizeLinear.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def activation_quantization_params(qdq_model: onnx.ModelProto) -> dict[str, tuple[onnx.TensorProto, onnx.TensorProto]]:
    """Return the scale and zero point initializers of each activation that a QDQ model quantizes.

    Reads the QuantizeLinear nodes whose input is not an initializer, as onnxruntime's quantize_static
    writes them. Nodes whose scale or zero point is not an initializer are skipped.
    """
    initializers = {init.name: init for init in qdq_model.graph.initializer}
    params = {}
    for node in qdq_model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in initializers or len(node.input) < 3:
            continue
        if node.input[1] in initializers and node.input[2] in initializers:
            params[node.input[0]] = (initializers[node.input[1]], initializers[node.input[2]])
    return params


def _dequantized_name(tensor: str) -> str:
    return f"{tensor}_adaround_dequantized"


def _with_fake_quantization(
    model: onnx.ModelProto, params: dict[str, tuple[onnx.TensorProto, onnx.TensorProto]]
) -> onnx.ModelProto:
    """Return a copy of model in which each tensor in params passes through QuantizeLinear and DequantizeLinear."""
    simulated = onnx.ModelProto()
    simulated.CopyFrom(model)
    graph = simulated.graph
    produced = {value.name for value in graph.input} | {output for node in graph.node for output in node.output}
    present = {name: value for name, value in params.items() if name in produced}
    for name, (scale, zero_point) in present.items():
        graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(scale), f"{name}_adaround_scale"))
        graph.initializer.append(
            numpy_helper.from_array(numpy_helper.to_array(zero_point), f"{name}_adaround_zero_point")
        )

    def fake_quantize(name: str) -> list[onnx.NodeProto]:
        quantized = f"{name}_adaround_quantized"
        arguments = [f"{name}_adaround_scale", f"{name}_adaround_zero_point"]
        return [
            helper.make_node("QuantizeLinear", [name, *arguments], [quantized]),
            helper.make_node("DequantizeLinear", [quantized, *arguments], [_dequantized_name(name)]),
        ]

    nodes = [node for value in graph.input if value.name in present for node in fake_quantize(value.name)]
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name in present:
                node.input[position] = _dequantized_name(name)
        copied = onnx.NodeProto()
        copied.CopyFrom(node)
        nodes.append(copied)
        nodes.extend(n for output in node.output if output in present for n in fake_quantize(output))
    del graph.node[:]
    graph.node.extend(nodes)
    return simulated
