"""Structured channel pruning of PyTorch CNNs into smaller dense models, with SIMD-friendly widths."""

from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from edgefleet.orchestrator.compress.distill import Augment, TensorPair, distill, train_classifier

logger = logging.getLogger(__name__)

CRITERIA = ("l1", "l2", "bn_gamma")

# Modules and functions that keep the channel axis as it is (element-wise maps and spatial pooling).
_PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Upsample,
)
_PASS_FUNCTIONS: frozenset[Any] = frozenset({
    torch.relu, F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, F.gelu, torch.sigmoid, torch.tanh,
    F.leaky_relu, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
    F.interpolate,
})
_PASS_METHODS = frozenset({"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"})
# Element-wise binary operations: two feature maps joined by one of these share one channel mask.
_BINARY_FUNCTIONS: frozenset[Any] = frozenset({operator.add, operator.iadd, operator.sub, operator.mul,
                                               torch.add, torch.sub, torch.mul})
_BINARY_METHODS = frozenset({"add", "add_", "sub", "mul", "mul_"})
_FLATTEN_FUNCTIONS: frozenset[Any] = frozenset({torch.flatten})
_FLATTEN_METHODS = frozenset({"flatten", "view", "reshape"})
_MEAN_FUNCTIONS: frozenset[Any] = frozenset({torch.mean, torch.amax})
_MEAN_METHODS = frozenset({"mean", "amax"})
# Calls that read shapes or metadata and never change channel contents.
_METADATA_METHODS = frozenset({"size", "dim"})


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be pruned with one shared mask: outputs of producers joined by additions."""

    name: str  # The first producer's module name, or the reason's subject for a frozen group.
    producers: tuple[str, ...]  # Conv2d (groups=1) and Linear modules whose output channels these are.
    channels_before: int
    channels_after: int
    reason_kept: str = ""  # Why the group cannot be pruned; "" for a prunable group.


@dataclass(frozen=True)
class PruneReport:
    """What `prune_model` removed: MACs and parameters per sample, and widths per channel group."""

    ratio: float  # Requested fraction of MACs to remove.
    round_to: int
    criterion: str
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    groups: tuple[ChannelGroup, ...]

    @property
    def achieved_ratio(self) -> float:
        """Fraction of MACs removed."""
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0


@dataclass
class _Group:
    reasons_kept: list[str] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)
    # (module name, flatten factor): the input channels of these modules are cut; a Linear after a
    # flatten of (C, H, W) has C * H * W inputs, so one channel maps to H * W input features.
    consumers: list[tuple[str, int]] = field(default_factory=list)
    followers: list[str] = field(default_factory=list)  # BatchNorm and depthwise Conv2d.


@dataclass(frozen=True)
class _Layer:
    """One Conv2d or Linear call with what its MAC count depends on."""

    name: str
    kind: str  # "conv", "depthwise", "grouped" or "linear".
    positions: int  # Output positions per sample: H_out * W_out for convs, 1 for a 2-D Linear.
    kernel: int  # Kernel elements, 1 for Linear.
    in_channels: int
    out_channels: int
    groups: int
    in_group: int | None
    in_factor: int
    out_group: int | None


class _ChannelGraph:
    """Channel groups of one traced model, found by walking its torch.fx graph in order."""

    def __init__(self, graph_module: torch.fx.GraphModule) -> None:
        self.module = graph_module
        self.parent: list[int] = []
        self.groups: list[_Group] = []
        self.channels: dict[torch.fx.Node, tuple[int, int]] = {}  # node -> (group, flatten factor)
        self.layers: list[_Layer] = []
        self.calls = _count_module_calls(graph_module)
        for node in graph_module.graph.nodes:
            self._visit(node)

    # Union-find over group ids, so an addition can merge two groups after both were created.
    def find(self, group: int) -> int:
        while self.parent[group] != group:
            self.parent[group] = self.parent[self.parent[group]]
            group = self.parent[group]
        return group

    def new_group(self, reason_kept: str = "") -> int:
        self.parent.append(len(self.parent))
        self.groups.append(_Group(reasons_kept=[reason_kept] if reason_kept else []))
        return len(self.parent) - 1

    def union(self, first: int, second: int) -> int:
        a, b = self.find(first), self.find(second)
        if a != b:
            self.parent[b] = a
            merged, other = self.groups[a], self.groups[b]
            merged.reasons_kept += other.reasons_kept
            merged.producers += other.producers
            merged.consumers += other.consumers
            merged.followers += other.followers
        return a

    def keep(self, group: int, reason: str) -> None:
        self.groups[self.find(group)].reasons_kept.append(reason)

    def roots(self) -> list[int]:
        return sorted({self.find(group) for group in range(len(self.parent))})

    def _visit(self, node: torch.fx.Node) -> None:
        inputs = [arg for arg in node.all_input_nodes if arg in self.channels]
        if node.op == "placeholder":
            if _shape(node) is not None:
                self.channels[node] = (self.new_group(f"model input {node.name}"), 1)
        elif node.op == "get_attr":
            if _shape(node) is not None:
                self.channels[node] = (self.new_group(f"constant {node.target}"), 1)
        elif node.op == "output":
            for arg in inputs:
                self.keep(self.channels[arg][0], f"model output {arg.name}")
        elif node.op == "call_module":
            self._visit_module(node, inputs)
        elif node.op == "call_method" and node.target in _METADATA_METHODS:
            return
        elif node.op in ("call_function", "call_method"):
            self._visit_function(node, inputs)

    def _visit_module(self, node: torch.fx.Node, inputs: list[torch.fx.Node]) -> None:
        name = str(node.target)
        module = self.module.get_submodule(name)
        if self.calls[name] > 1 and isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)):
            self._keep_all(node, inputs, f"module {name} is called {self.calls[name]} times")
        elif isinstance(module, nn.Conv2d) and len(inputs) == 1:
            self._visit_conv(node, name, module, inputs[0])
        elif isinstance(module, nn.Linear) and len(inputs) == 1:
            self._visit_linear(node, name, module, inputs[0])
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)) and len(inputs) == 1:
            group, factor = self.channels[inputs[0]]
            if factor != 1:
                self._keep_all(node, inputs, f"{name} normalizes flattened features")
                return
            self.groups[self.find(group)].followers.append(name)
            self.channels[node] = (group, 1)
        elif isinstance(module, _PASS_MODULES) and len(inputs) == 1:
            self.channels[node] = self.channels[inputs[0]]
        elif isinstance(module, nn.Flatten) and len(inputs) == 1:
            self._visit_flatten(node, inputs[0])
        else:
            self._keep_all(node, inputs, f"unsupported module {name} ({type(module).__name__})")

    def _visit_conv(self, node: torch.fx.Node, name: str, module: nn.Conv2d, source: torch.fx.Node) -> None:
        group, _ = self.channels[source]
        positions = _positions(node)
        kernel = module.kernel_size[0] * module.kernel_size[1]
        if module.groups == 1:
            self.groups[self.find(group)].consumers.append((name, 1))
            out_group = self.new_group()
            self.groups[out_group].producers.append(name)
            kind = "conv"
        elif module.groups == module.in_channels == module.out_channels:
            # A depthwise conv keeps channel c as channel c, so it follows its producer's mask.
            self.groups[self.find(group)].followers.append(name)
            out_group = group
            kind = "depthwise"
        else:
            self.keep(group, f"grouped conv {name} (groups={module.groups})")
            out_group = self.new_group(f"grouped conv {name} (groups={module.groups})")
            kind = "grouped"
        self.channels[node] = (out_group, 1)
        self.layers.append(_Layer(name, kind, positions, kernel, module.in_channels, module.out_channels,
                                  module.groups, group, 1, out_group))

    def _visit_linear(self, node: torch.fx.Node, name: str, module: nn.Linear, source: torch.fx.Node) -> None:
        group, factor = self.channels[source]
        source_shape = _shape(source)
        if source_shape is None or len(source_shape) != 2:
            self._keep_all(node, [source], f"{name} is applied to a tensor of rank other than 2")
            return
        self.groups[self.find(group)].consumers.append((name, factor))
        out_group = self.new_group()
        self.groups[out_group].producers.append(name)
        self.channels[node] = (out_group, 1)
        self.layers.append(_Layer(name, "linear", 1, 1, module.in_features, module.out_features, 1, group,
                                  factor, out_group))

    def _visit_flatten(self, node: torch.fx.Node, source: torch.fx.Node) -> None:
        group, factor = self.channels[source]
        before, after = _shape(source), _shape(node)
        if before is not None and after is not None and factor == 1:
            if len(before) == 4 and after == (before[0], before[1] * before[2] * before[3]):
                self.channels[node] = (group, before[2] * before[3])
                return
            if len(before) == 2 and after == before:
                self.channels[node] = (group, 1)
                return
        self._keep_all(node, [source], f"reshape {node.name} from {before} to {after} mixes channels")

    def _visit_function(self, node: torch.fx.Node, inputs: list[torch.fx.Node]) -> None:
        target = node.target
        is_method = node.op == "call_method"
        if (target in _PASS_METHODS if is_method else target in _PASS_FUNCTIONS) and len(inputs) == 1:
            self.channels[node] = self.channels[inputs[0]]
        elif target in _BINARY_METHODS if is_method else target in _BINARY_FUNCTIONS:
            self._visit_binary(node, inputs)
        elif (target in _FLATTEN_METHODS if is_method else target in _FLATTEN_FUNCTIONS) and len(inputs) == 1:
            self._visit_flatten(node, inputs[0])
        elif (target in _MEAN_METHODS if is_method else target in _MEAN_FUNCTIONS) and len(inputs) == 1:
            self._visit_mean(node, inputs[0])
        elif node.op == "call_function" and target is getattr:
            return
        else:
            self._keep_all(node, inputs, f"unsupported operation {node.name} ({target})")

    def _visit_binary(self, node: torch.fx.Node, inputs: list[torch.fx.Node]) -> None:
        if len(inputs) == 1:  # A tensor and a scalar.
            self.channels[node] = self.channels[inputs[0]]
            return
        shapes = [_shape(arg) for arg in inputs]
        factors = {self.channels[arg][1] for arg in inputs}
        same_channels = all(shape is not None and len(shape) >= 2 for shape in shapes) and len(
            {shape[1] for shape in shapes if shape is not None}) == 1
        if len(inputs) != 2 or not same_channels or len(factors) != 1:
            self._keep_all(node, inputs, f"operation {node.name} joins tensors of shapes {shapes}")
            return
        # Residual connection: both operands must keep the same channels, so their groups merge.
        group = self.union(self.channels[inputs[0]][0], self.channels[inputs[1]][0])
        self.channels[node] = (group, factors.pop())

    def _visit_mean(self, node: torch.fx.Node, source: torch.fx.Node) -> None:
        before, after = _shape(source), _shape(node)
        group, factor = self.channels[source]
        if before is not None and after is not None and len(before) == 4 and factor == 1 \
                and after[:2] == before[:2] and after in (before[:2], (*before[:2], 1, 1)):
            self.channels[node] = (group, 1)
            return
        self._keep_all(node, [source], f"reduction {node.name} from {before} to {after} mixes channels")

    def _keep_all(self, node: torch.fx.Node, inputs: list[torch.fx.Node], reason: str) -> None:
        for arg in inputs:
            self.keep(self.channels[arg][0], reason)
        if _shape(node) is not None:
            self.channels[node] = (self.new_group(reason), 1)


def prune_model(
    model: nn.Module,
    ratio: float,
    *,
    round_to: int = 8,
    example_input: torch.Tensor,
    criterion: str = "l1",
) -> tuple[nn.Module, PruneReport]:
    """Remove whole channels from `model` so that about `ratio` of its MACs go, and rebuild it dense.

    The model is traced with torch.fx. Channels are grouped so the graph stays consistent: consumers of
    a pruned output lose the matching input channels, BatchNorm and depthwise convs (groups equal to
    channels) follow their producer, operands of an addition (residual connections) share one mask, and
    a Linear after a flatten loses the H * W features of each removed channel. Channels feeding the
    model output, concatenations, grouped convs, other reshapes and unknown operations are left
    unpruned and listed in the report with the reason.

    Every prunable group keeps the same fraction of its channels, rounded to a multiple of `round_to`
    (at least `round_to`); the largest fraction whose MACs fit within (1 - ratio) of the original is
    chosen. Within a group, channels are ranked by `criterion`: "l1" or "l2", the norm of each output
    filter, summed over the group's producers after scaling each producer's scores to mean 1, or
    "bn_gamma", |gamma| of the BatchNorm layers that follow the group (l1 where a group has none).

    The input model is not changed; the pruned copy has new Conv2d, BatchNorm and Linear modules with
    the kept weights and needs fine-tuning (`fine_tune`) to recover accuracy.

    Raises ValueError for a ratio outside (0, 1), a round_to below 1, an unknown criterion, or a ratio
    that the prunable channels cannot reach at this round_to. Raises RuntimeError when the rebuilt
    model's output shape differs from the original's.
    Returns the pruned model in eval mode and a PruneReport.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio {ratio} is outside the allowed range (0, 1): it is the fraction of MACs "
                         "to remove, e.g. 0.5 for half")
    if round_to < 1:
        raise ValueError(f"round_to {round_to} must be at least 1; 8 or 16 suit SIMD registers")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion {criterion!r} is unknown; use one of {', '.join(CRITERIA)}")

    reference = copy.deepcopy(model).eval()
    graph_module = torch.fx.symbolic_trace(reference)
    with torch.no_grad():
        ShapeProp(graph_module).propagate(example_input)
        expected_shape = tuple(reference(example_input).shape)
    graph = _ChannelGraph(graph_module)
    prunable = {root: _group_channels(graph, root) for root in graph.roots() if _is_prunable(graph, root)}

    macs_before = _estimate_macs(graph, {})
    target = (1.0 - ratio) * macs_before
    widths = _choose_widths(graph, prunable, round_to, target)
    if widths is None:
        smallest = {root: min(channels, round_to) for root, channels in prunable.items()}
        best = 1.0 - _estimate_macs(graph, smallest) / macs_before if macs_before else 0.0
        raise ValueError(f"ratio {ratio} cannot be reached with round_to={round_to}: pruning every prunable "
                         f"channel group to its minimum removes {best:.3f} of the MACs; lower the ratio or "
                         "round_to")

    kept = {root: _rank_channels(graph, reference, root, criterion)[:width].sort().values
            for root, width in widths.items()}
    pruned = _rebuild(model, graph, kept)
    with torch.no_grad():
        actual_shape = tuple(pruned(example_input).shape)
    if actual_shape != expected_shape:
        raise RuntimeError(f"pruned model returns shape {actual_shape}, the original {expected_shape}; the "
                           "forward code probably hard-codes a channel count")

    macs_after = count_macs(pruned, example_input)
    report = PruneReport(
        ratio=ratio, round_to=round_to, criterion=criterion,
        macs_before=count_macs(model, example_input), macs_after=macs_after,
        params_before=count_parameters(model), params_after=count_parameters(pruned),
        groups=tuple(_describe_group(graph, root, widths.get(root)) for root in graph.roots()
                     if graph.groups[root].producers),
    )
    logger.info("pruned %s: MACs %d -> %d (%.1f%% removed, requested %.1f%%), round_to %d",
                type(model).__name__, report.macs_before, macs_after, 100 * report.achieved_ratio, 100 * ratio,
                round_to)
    return pruned, report


def fine_tune(
    model: nn.Module,
    train_data: TensorPair,
    *,
    epochs: int,
    lr: float,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.5,
    batch_size: int = 64,
    seed: int = 0,
    augment: Augment | None = None,
) -> nn.Module:
    """Train a pruned model in place to recover accuracy; with a teacher (e.g. the unpruned model) by
    distillation with `temperature` and `alpha`, else with cross-entropy alone.

    Raises ValueError as `edgefleet.orchestrator.compress.distill.distill` does. Returns the model.
    """
    if teacher is None:
        train_classifier(model, train_data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                         augment=augment)
    else:
        distill(teacher, model, train_data, temperature=temperature, alpha=alpha, epochs=epochs, lr=lr,
                batch_size=batch_size, seed=seed, augment=augment)
    return model


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Run `model` once in eval mode and return the multiply-accumulates of its Conv and Linear layers
    for one sample of `example_input` (the batch axis divided out).

    Other layers (BatchNorm, activations, pooling, additions) are not counted: they add well under 1%
    on CNNs. The model's train or eval mode is restored afterwards.
    """
    total = 0

    def conv_hook(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        kernel = 1
        for size in module.kernel_size:
            kernel *= size
        total += output.numel() * (module.in_channels // module.groups) * kernel

    def linear_hook(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Linear)
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return total // max(1, example_input.shape[0])


def count_parameters(model: nn.Module) -> int:
    """Return the number of parameter elements of `model`."""
    return sum(parameter.numel() for parameter in model.parameters())


def _count_module_calls(graph_module: torch.fx.GraphModule) -> dict[str, int]:
    calls: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    return calls


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(size) for size in shape) if shape is not None else None


def _positions(node: torch.fx.Node) -> int:
    shape = _shape(node)
    assert shape is not None and len(shape) == 4, f"conv output {node.name} has shape {shape}"
    return shape[2] * shape[3]


def _is_prunable(graph: _ChannelGraph, root: int) -> bool:
    group = graph.groups[root]
    return bool(group.producers) and not group.reasons_kept


def _group_channels(graph: _ChannelGraph, root: int) -> int:
    first = graph.module.get_submodule(graph.groups[root].producers[0])
    assert isinstance(first, nn.Conv2d | nn.Linear)
    return first.out_channels if isinstance(first, nn.Conv2d) else first.out_features


def _estimate_macs(graph: _ChannelGraph, widths: dict[int, int]) -> int:
    """MACs per sample of the Conv2d and Linear layers when each group in `widths` keeps that many channels."""
    total = 0
    for layer in graph.layers:
        in_root = graph.find(layer.in_group) if layer.in_group is not None else None
        out_root = graph.find(layer.out_group) if layer.out_group is not None else None
        in_channels = widths.get(in_root, layer.in_channels // layer.in_factor) * layer.in_factor \
            if in_root is not None else layer.in_channels
        out_channels = widths.get(out_root, layer.out_channels) if out_root is not None else layer.out_channels
        if layer.kind == "depthwise":
            total += layer.positions * layer.kernel * out_channels
        elif layer.kind == "grouped":
            total += layer.positions * layer.kernel * layer.in_channels // layer.groups * layer.out_channels
        else:
            total += layer.positions * layer.kernel * in_channels * out_channels
    return total


def _choose_widths(graph: _ChannelGraph, prunable: dict[int, int], round_to: int,
                   target: float) -> dict[int, int] | None:
    """Scale every prunable group by one width multiplier, rounded to multiples of round_to, and
    return the widest choice whose MACs are at most `target`, or None when none is."""
    steps = 1000

    def widths_at(step: int) -> dict[int, int]:
        return {root: _round_width(channels, step / steps, round_to) for root, channels in prunable.items()}

    # MACs never fall as the multiplier grows, so bisect for the largest step that fits.
    if _estimate_macs(graph, widths_at(0)) > target:
        return None
    low, high = 0, steps - 1
    while low < high:
        middle = (low + high + 1) // 2
        if _estimate_macs(graph, widths_at(middle)) <= target:
            low = middle
        else:
            high = middle - 1
    return _fill_widths(graph, prunable, widths_at(low), round_to, target)


def _fill_widths(graph: _ChannelGraph, prunable: dict[int, int], widths: dict[int, int], round_to: int,
                 target: float) -> dict[int, int]:
    """Grow groups by round_to channels while the MACs stay within `target`, because rounding one shared
    multiplier can remove far more than requested; the group with the smallest kept fraction grows first."""
    widths = dict(widths)
    while True:
        candidates = sorted((widths[root] / channels, root) for root, channels in prunable.items()
                            if widths[root] + round_to <= channels)
        for _, root in candidates:
            trial = {**widths, root: widths[root] + round_to}
            if _estimate_macs(graph, trial) <= target:
                widths = trial
                break
        else:
            return widths


def _round_width(channels: int, multiplier: float, round_to: int) -> int:
    if channels <= round_to:
        return channels
    rounded = round_to * round(channels * multiplier / round_to)
    return min(channels, max(round_to, rounded))


def _rank_channels(graph: _ChannelGraph, reference: nn.Module, root: int, criterion: str) -> torch.Tensor:
    """Channel indices of a group, most important first."""
    group = graph.groups[root]
    scores: list[torch.Tensor] = []
    if criterion == "bn_gamma":
        for name in group.followers:
            norm = reference.get_submodule(name)
            if isinstance(norm, nn.BatchNorm2d | nn.BatchNorm1d) and norm.affine:
                scores.append(norm.weight.detach().abs())
    if not scores:
        order = 1 if criterion in ("l1", "bn_gamma") else 2
        for name in group.producers:
            producer = reference.get_submodule(name)
            assert isinstance(producer, nn.Conv2d | nn.Linear)
            scores.append(producer.weight.detach().flatten(1).norm(p=order, dim=1))
    total = sum(score / score.mean().clamp_min(1e-12) for score in scores)
    assert isinstance(total, torch.Tensor)
    return torch.argsort(total, descending=True, stable=True)


def _rebuild(model: nn.Module, graph: _ChannelGraph, kept: dict[int, torch.Tensor]) -> nn.Module:
    """Copy `model` and replace each module touched by a pruned group with a smaller dense one."""
    out_index: dict[str, torch.Tensor] = {}
    in_index: dict[str, tuple[torch.Tensor, int]] = {}
    follower_index: dict[str, torch.Tensor] = {}
    for root, index in kept.items():
        group = graph.groups[root]
        for name in group.producers:
            out_index[name] = index
        for name, factor in group.consumers:
            in_index[name] = (index, factor)
        for name in group.followers:
            follower_index[name] = index

    pruned = copy.deepcopy(model)
    for name in sorted(set(out_index) | set(in_index) | set(follower_index)):
        module = pruned.get_submodule(name)
        if isinstance(module, nn.Conv2d):
            replacement: nn.Module = _prune_conv(module, out_index.get(name), in_index.get(name),
                                                 follower_index.get(name))
        elif isinstance(module, nn.Linear):
            replacement = _prune_linear(module, out_index.get(name), in_index.get(name))
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            replacement = _prune_batch_norm(module, follower_index[name])
        else:
            raise AssertionError(f"module {name} of type {type(module).__name__} cannot be pruned")
        _set_submodule(pruned, name, replacement)
    return pruned.eval()


def _expand(index: torch.Tensor, factor: int) -> torch.Tensor:
    return (index[:, None] * factor + torch.arange(factor)).flatten()


def _prune_conv(module: nn.Conv2d, out_index: torch.Tensor | None, in_index: tuple[torch.Tensor, int] | None,
                depthwise_index: torch.Tensor | None) -> nn.Conv2d:
    weight = module.weight.detach()
    bias = module.bias.detach() if module.bias is not None else None
    if depthwise_index is not None:
        weight = weight[depthwise_index]
        bias = bias[depthwise_index] if bias is not None else None
        channels = len(depthwise_index)
        in_channels, out_channels, groups = channels, channels, channels
    else:
        if out_index is not None:
            weight = weight[out_index]
            bias = bias[out_index] if bias is not None else None
        if in_index is not None:
            weight = weight[:, _expand(*in_index)]
        out_channels, in_channels, groups = weight.shape[0], weight.shape[1], 1
    replacement = nn.Conv2d(
        in_channels, out_channels, cast(tuple[int, int], module.kernel_size),
        stride=cast(tuple[int, int], module.stride), padding=cast(tuple[int, int] | str, module.padding),
        dilation=cast(tuple[int, int], module.dilation), groups=groups, bias=bias is not None,
        padding_mode=module.padding_mode, device=weight.device, dtype=weight.dtype,
    )
    _copy_parameters(replacement, weight, bias)
    return replacement


def _prune_linear(module: nn.Linear, out_index: torch.Tensor | None,
                  in_index: tuple[torch.Tensor, int] | None) -> nn.Linear:
    weight = module.weight.detach()
    bias = module.bias.detach() if module.bias is not None else None
    if out_index is not None:
        weight = weight[out_index]
        bias = bias[out_index] if bias is not None else None
    if in_index is not None:
        weight = weight[:, _expand(*in_index)]
    replacement = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                            dtype=weight.dtype)
    _copy_parameters(replacement, weight, bias)
    return replacement


def _prune_batch_norm(module: nn.BatchNorm2d | nn.BatchNorm1d, index: torch.Tensor) -> nn.Module:
    replacement = type(module)(len(index), eps=module.eps, momentum=module.momentum, affine=module.affine,
                               track_running_stats=module.track_running_stats)
    with torch.no_grad():
        if module.affine:
            replacement.weight.copy_(module.weight[index])
            replacement.bias.copy_(module.bias[index])
        if module.track_running_stats:
            assert module.running_mean is not None and module.running_var is not None
            assert replacement.running_mean is not None and replacement.running_var is not None
            replacement.running_mean.copy_(module.running_mean[index])
            replacement.running_var.copy_(module.running_var[index])
            if module.num_batches_tracked is not None and replacement.num_batches_tracked is not None:
                replacement.num_batches_tracked.copy_(module.num_batches_tracked)
    return replacement.to(module.weight.device if module.affine else "cpu")


def _copy_parameters(module: nn.Conv2d | nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None and module.bias is not None:
            module.bias.copy_(bias)


def _set_submodule(root: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, replacement)


def _describe_group(graph: _ChannelGraph, root: int, width: int | None) -> ChannelGroup:
    group = graph.groups[root]
    channels = _group_channels(graph, root)
    return ChannelGroup(
        name=group.producers[0], producers=tuple(group.producers), channels_before=channels,
        channels_after=width if width is not None else channels,
        reason_kept="; ".join(dict.fromkeys(group.reasons_kept)),
    )
