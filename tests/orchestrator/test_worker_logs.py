"""The job worker's filter for onnxruntime's root-logger INFO lines, on a real quantization."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgefleet.common.logs import RootInfoFilter
from edgefleet.orchestrator.compress.quantize import quantize_static_qdq


def tiny_weight_conv(path: Path) -> Path:
    """Save a Conv whose weights are so small next to its bias that onnxruntime raises each channel's scale."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((4, 3, 3, 3)) * 1e-6).astype(np.float32)
    bias = np.full(4, 1e3, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"])],
        "tiny_weight_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 6, 6])],
        [
            helper.make_tensor("w", TensorProto.FLOAT, weight.shape, weight.ravel().tolist()),
            helper.make_tensor("b", TensorProto.FLOAT, bias.shape, bias.tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def root_filter() -> Iterator[RootInfoFilter]:
    root = logging.getLogger()
    installed = RootInfoFilter()
    root.addFilter(installed)
    yield installed
    root.removeFilter(installed)


def test_quantizer_info_lines_counted(
    root_filter: RootInfoFilter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = tiny_weight_conv(tmp_path / "source.onnx")
    calibration = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)

    with caplog.at_level(logging.INFO):
        quantize_static_qdq(source, tmp_path / "int8.onnx", calibration)

    assert not [r for r in caplog.records if "Increased scale" in r.getMessage()]
    assert root_filter.take() >= 4  # One line per output channel at least.
    assert root_filter.take() == 0


def test_root_warnings_pass(root_filter: RootInfoFilter, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        logging.warning("a warning on the root logger")
        logging.error("an error on the root logger")
        logging.getLogger("edgefleet.orchestrator.jobs.worker").info("a named logger's INFO line")

    assert [r.getMessage() for r in caplog.records] == [
        "a warning on the root logger",
        "an error on the root logger",
        "a named logger's INFO line",
    ]
    assert root_filter.take() == 0
