"""Structured channel pruning: graph consistency, widths, MACs, and ONNX export of the pruned model."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgefleet.orchestrator.compress.prune import PruneReport, count_macs, count_parameters, prune_model

ROUND_TO = 8


class ResidualDepthwiseNet(nn.Module):
    """Conv stem, a residual block, a depthwise separable stage, then flatten into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.res1 = nn.Conv2d(64, 64, 3, padding=1)
        self.res_bn1 = nn.BatchNorm2d(64)
        self.res2 = nn.Conv2d(64, 64, 3, padding=1)
        self.res_bn2 = nn.BatchNorm2d(64)
        self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.depthwise_bn = nn.BatchNorm2d(64)
        self.pointwise = nn.Conv2d(64, 128, 1)
        self.pointwise_bn = nn.BatchNorm2d(128)
        self.fc = nn.Linear(128 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        residual = F.relu(self.res_bn1(self.res1(x)))
        x = F.relu(x + self.res_bn2(self.res2(residual)))
        x = F.relu(self.depthwise_bn(self.depthwise(x)))
        x = F.max_pool2d(F.relu(self.pointwise_bn(self.pointwise(x))), 2)
        return self.fc(torch.flatten(x, 1))


class ConcatNet(nn.Module):
    """Two branches joined by a channel concatenation, which the pruner leaves unpruned."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 32, 3, padding=1)
        self.left = nn.Conv2d(32, 32, 1)
        self.right = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Conv2d(64, 64, 1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        x = F.relu(self.head(x))
        return self.fc(x.mean((2, 3)))


def example() -> torch.Tensor:
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def trained_like(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics, as training would, and switch to eval mode."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8))
    return model.eval()


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return trained_like(ResidualDepthwiseNet())


@pytest.fixture(scope="module")
def pruned_half(net: nn.Module) -> tuple[nn.Module, PruneReport]:
    return prune_model(net, 0.5, round_to=ROUND_TO, example_input=example())


def test_prune_output_shape(net: nn.Module, pruned_half: tuple[nn.Module, PruneReport]) -> None:
    pruned, _ = pruned_half
    assert pruned(example()).shape == net(example()).shape


def test_prune_parameters_drop(net: nn.Module, pruned_half: tuple[nn.Module, PruneReport]) -> None:
    pruned, _ = pruned_half
    assert count_parameters(pruned) < count_parameters(net)


def test_prune_macs_reach_ratio(net: nn.Module, pruned_half: tuple[nn.Module, PruneReport]) -> None:
    pruned, _ = pruned_half
    assert count_macs(pruned, example()) <= 0.5 * count_macs(net, example())


def test_prune_report_matches_counts(net: nn.Module, pruned_half: tuple[nn.Module, PruneReport]) -> None:
    pruned, report = pruned_half
    assert report.macs_before == count_macs(net, example())
    assert report.macs_after == count_macs(pruned, example())


def test_prune_widths_rounded(pruned_half: tuple[nn.Module, PruneReport]) -> None:
    pruned, _ = pruned_half
    widths = {name: module.out_channels for name, module in pruned.named_modules() if isinstance(module, nn.Conv2d)}
    assert all(width % ROUND_TO == 0 for width in widths.values()), widths


def test_prune_residual_shares_mask(pruned_half: tuple[nn.Module, PruneReport]) -> None:
    pruned, _ = pruned_half
    assert isinstance(pruned.conv2, nn.Conv2d) and isinstance(pruned.res2, nn.Conv2d)
    assert pruned.conv2.out_channels == pruned.res2.out_channels


def test_prune_residual_actually_pruned(pruned_half: tuple[nn.Module, PruneReport]) -> None:
    pruned, _ = pruned_half
    assert isinstance(pruned.conv2, nn.Conv2d)
    assert pruned.conv2.out_channels < 64


def test_prune_depthwise_follows_producer(pruned_half: tuple[nn.Module, PruneReport]) -> None:
    pruned, _ = pruned_half
    depthwise = pruned.depthwise
    assert isinstance(depthwise, nn.Conv2d) and isinstance(pruned.conv2, nn.Conv2d)
    channels = pruned.conv2.out_channels
    assert (depthwise.in_channels, depthwise.out_channels, depthwise.groups) == (channels, channels, channels)


def test_prune_flatten_into_linear(pruned_half: tuple[nn.Module, PruneReport]) -> None:
    pruned, _ = pruned_half
    assert isinstance(pruned.fc, nn.Linear) and isinstance(pruned.pointwise, nn.Conv2d)
    assert pruned.fc.in_features == pruned.pointwise.out_channels * 4 * 4


def test_prune_keeps_output_classes(pruned_half: tuple[nn.Module, PruneReport]) -> None:
    pruned, _ = pruned_half
    assert isinstance(pruned.fc, nn.Linear)
    assert pruned.fc.out_features == 10


def test_prune_leaves_input_model(net: nn.Module, pruned_half: tuple[nn.Module, PruneReport]) -> None:
    assert isinstance(net.conv2, nn.Conv2d)
    assert net.conv2.out_channels == 64


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_gamma"])
def test_prune_dead_channels_exact(criterion: str) -> None:
    # A channel whose filter and BatchNorm affine terms are zero outputs exactly 0 after ReLU. Every
    # criterion ranks such channels last, so removing them must leave the output unchanged.
    torch.manual_seed(1)
    model = trained_like(ResidualDepthwiseNet())
    live = 16  # Equal to round_to, the smallest width pruning keeps.
    # Producers of one channel group (joined by the residual add) share one set of dead channels.
    groups = {
        "conv1": (["conv1"], ["bn1"]),
        "residual": (["conv2", "res2"], ["bn2", "res_bn2", "depthwise_bn"]),
        "res1": (["res1"], ["res_bn1"]),
        "pointwise": (["pointwise"], ["pointwise_bn"]),
    }
    with torch.no_grad():
        for seed, (producers, norms) in enumerate(groups.values()):
            first = model.get_submodule(producers[0])
            assert isinstance(first, nn.Conv2d)
            dead = torch.randperm(first.out_channels, generator=torch.Generator().manual_seed(seed))[live:]
            for name in producers:
                conv = model.get_submodule(name)
                assert isinstance(conv, nn.Conv2d) and conv.bias is not None
                conv.weight[dead] = 0.0
                conv.bias[dead] = 0.0
            for name in norms:
                norm = model.get_submodule(name)
                assert isinstance(norm, nn.BatchNorm2d)
                norm.weight[dead] = 0.0
                norm.bias[dead] = 0.0
    inputs = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    pruned, _ = prune_model(model, 0.6, round_to=16, example_input=inputs, criterion=criterion)
    with torch.no_grad():
        assert torch.allclose(pruned(inputs), model(inputs), atol=1e-5)


def test_prune_onnx_runs(pruned_half: tuple[nn.Module, PruneReport], tmp_path: Path) -> None:
    pruned, _ = pruned_half
    path = tmp_path / "pruned.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            pruned,
            (example(),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    output = session.run(None, {"input": example().numpy()})[0]
    with torch.no_grad():
        expected = pruned(example()).numpy()
    np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ratio", [0.0, -0.2, 1.0, 1.5])
def test_prune_rejects_ratio(net: nn.Module, ratio: float) -> None:
    with pytest.raises(ValueError, match=rf"ratio {ratio} is outside the allowed range \(0, 1\)"):
        prune_model(net, ratio, round_to=ROUND_TO, example_input=example())


def test_prune_rejects_unreachable_ratio(net: nn.Module) -> None:
    with pytest.raises(ValueError, match="cannot be reached with round_to=32"):
        prune_model(net, 0.95, round_to=32, example_input=example())


def test_prune_rejects_unknown_criterion(net: nn.Module) -> None:
    with pytest.raises(ValueError, match="criterion 'taylor' is unknown"):
        prune_model(net, 0.5, round_to=ROUND_TO, example_input=example(), criterion="taylor")


def test_prune_concat_kept() -> None:
    torch.manual_seed(0)
    model = ConcatNet().eval()
    pruned, report = prune_model(model, 0.2, round_to=ROUND_TO, example_input=example())
    reasons = {group.name: group.reason_kept for group in report.groups}
    assert "unsupported operation" in reasons["left"]
    assert isinstance(pruned.left, nn.Conv2d) and pruned.left.out_channels == 32
    assert isinstance(pruned.stem, nn.Conv2d) and pruned.stem.out_channels < 32


def test_count_macs_conv_linear() -> None:
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    assert count_macs(model, torch.zeros(3, 1, 8, 8)) == 8 * 8 * 9 * 8 + 8 * 8 * 8 * 10
