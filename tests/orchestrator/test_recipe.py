"""Tests for compression recipe parsing and validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from edgefleet.orchestrator.compress.recipe import (
    GateConfig,
    PruneConfig,
    Recipe,
    RecipeError,
    load_recipe,
    parse_recipe,
)


def test_recipe_empty_uses_defaults() -> None:
    recipe = parse_recipe({})
    assert recipe == Recipe()
    assert recipe.gate == GateConfig()


def test_recipe_full_dict() -> None:
    recipe = parse_recipe({
        "quantize": {
            "method": "static",
            "per_channel": False,
            "activation_type": "int8",
            "calibration_size": 64,
            "calibration": {
                "images": "photos/",
                "preprocess": {"height": 320, "width": 320, "mean": [127, 127, 127], "std": [128, 128, 128],
                               "scale": 1.0, "layout": "NHWC"},
            },
        },
        "prune": {"ratio": 0.5, "round_to": 16},
        "distill": {"student_family": "fire", "mac_budget": 1_000_000},
        "tflite": {"precisions": ["fp32", "int8"]},
        "gate": {"max_accuracy_drop": 0.5, "runtimes": ["onnxruntime", "litert"], "threads": [1]},
    })
    assert recipe.quantize is not None
    assert recipe.quantize.activation_type == "int8"
    assert recipe.quantize.bias_correction is True
    assert recipe.quantize.weight_rounding == "nearest"
    assert recipe.quantize.fine_tune_steps == 0
    assert recipe.quantize.calibration.preprocess.mean == (127.0, 127.0, 127.0)
    assert recipe.quantize.calibration.preprocess.layout == "NHWC"
    assert recipe.prune == PruneConfig(ratio=0.5, round_to=16)
    assert recipe.tflite is not None
    assert recipe.tflite.precisions == ("fp32", "int8")
    assert recipe.gate.threads == (1,)


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"prune": {"ratio": 1.0}}, ("prune.ratio", "1.0", "(0, 1)")),
        ({"prune": {"ratio": 0}}, ("prune.ratio", "0", "(0, 1)")),
        ({"prune": {"round_to": 4}}, ("prune.round_to", "4", "[8, 16]")),
        ({"prune": {"ratio": "half"}}, ("prune.ratio", '"half"', "number")),
        ({"prune": {"speed": 2}}, ("prune.speed", "2", "allowed keys")),
        ({"quantise": {}}, ("quantise", "allowed sections")),
        ({"quantize": {"method": "fast"}}, ("quantize.method", '"fast"', '"static"')),
        ({"quantize": {"per_channel": 1}}, ("quantize.per_channel", "1", "true or false")),
        ({"quantize": {"calibration_size": 0}}, ("quantize.calibration_size", "0", "> 0")),
        ({"quantize": {"fine_tune_steps": -1}}, ("quantize.fine_tune_steps", "-1", ">= 0")),
        ({"quantize": {"weight_rounding": "stochastic"}}, ("quantize.weight_rounding", '"stochastic"', '"adaround"')),
        ({"quantize": {"bias_correction": "yes"}}, ("quantize.bias_correction", '"yes"', "true or false")),
        ({"quantize": {"calibration": {"images": "a", "npz": "b.npz"}}}, ("quantize.calibration.npz",)),
        ({"quantize": {"calibration": {"preprocess": {"layout": "CHW"}}}},
         ("quantize.calibration.preprocess.layout", '"CHW"', "NCHW")),
        ({"quantize": {"calibration": {"preprocess": {"mean": [0.5]}}}},
         ("quantize.calibration.preprocess.mean", "3 numbers")),
        ({"distill": {"alpha": 1.5}}, ("distill.alpha", "1.5", "[0, 1]")),
        ({"distill": {"student_family": "resnet"}}, ("distill.student_family", '"resnet"', "fire")),
        ({"tflite": {"precisions": ["int4"]}}, ("tflite.precisions", "int4", "fp16")),
        ({"gate": {"max_accuracy_drop": -1}}, ("gate.max_accuracy_drop", "-1", "from 0 to 100")),
        ({"gate": {"runtimes": ["tensorrt"]}},
         ('gate.runtimes = ["tensorrt"] is invalid', '["onnxruntime", "litert"]')),
        ({"gate": {"threads": [0]}}, ("gate.threads = [0] is out of range", "from 1 to 64")),
        ({"gate": {"threads": [1, 65]}}, ("gate.threads", "from 1 to 64")),
        ({"quantize": {"calibration_size": True}}, ("quantize.calibration_size = true is invalid", "integer")),
        ({"quantize": {"calibration": {"preprocess": {"std": [0.2, -0.2, 0.2]}}}},
         ("quantize.calibration.preprocess.std = [0.2, -0.2, 0.2] is out of range", "above 0 for each channel")),
        ({"gate": {"max_accuracy_drop": 101}}, ("gate.max_accuracy_drop", "101", "from 0 to 100")),
        ({"gate": {"max_accuracy_drop": math.inf}}, ("gate.max_accuracy_drop", "inf", "finite number")),
        ({"distill": {"temperature": math.inf}}, ("distill.temperature", "inf", "finite number")),
        ({"prune": {"lr": math.inf}}, ("prune.lr", "inf", "finite number")),
        ({"quantize": {"calibration": {"preprocess": {"scale": math.inf}}}},
         ("quantize.calibration.preprocess.scale", "inf", "finite number")),
        ({"quantize": {"calibration": {"preprocess": {"std": [math.nan, 1, 1]}}}},
         ("quantize.calibration.preprocess.std[0]", "nan", "finite number")),
        ({"gate": {"evaluation": {"preprocess": {"mean": [0, -math.inf, 0]}}}},
         ("gate.evaluation.preprocess.mean[1]", "-inf", "finite number")),
    ],
)
def test_recipe_invalid(data: dict[str, object], fragments: tuple[str, ...]) -> None:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(data)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_recipe_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text('[quantize]\nactivation_type = "int8"\n[gate]\nmax_accuracy_drop = 2\n', encoding="utf-8")
    recipe = load_recipe(path)
    assert recipe.quantize is not None
    assert recipe.quantize.activation_type == "int8"
    assert recipe.quantize.bias_correction is True
    assert recipe.quantize.weight_rounding == "nearest"
    assert recipe.gate.max_accuracy_drop == 2.0


def test_recipe_json_file(tmp_path: Path) -> None:
    path = tmp_path / "recipe.json"
    path.write_text('{"prune": {"ratio": 0.25}}', encoding="utf-8")
    assert load_recipe(path).prune == PruneConfig(ratio=0.25)


def test_recipe_json_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "recipe.json"
    path.write_text('{"prune": ', encoding="utf-8")
    with pytest.raises(RecipeError, match="invalid recipe file"):
        load_recipe(path)


def test_recipe_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text("[prune]\nratio = 1.0\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"recipe\.toml: prune\.ratio"):
        load_recipe(path)


def test_recipe_toml_nan_rejected(tmp_path: Path) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text("[quantize.calibration.preprocess]\nstd = [nan, nan, nan]\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"recipe\.toml: quantize\.calibration\.preprocess\.std\[0\] = nan"):
        load_recipe(path)


def test_recipe_yaml_rejected(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("prune: {}\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"\.json or \.toml"):
        load_recipe(path)
