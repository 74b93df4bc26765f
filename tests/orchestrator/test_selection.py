"""Tests of variant selection: the accuracy, budget, memory and format rules and their reasons."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime
from typing import Any

import pytest

from edgefleet.common.hardware import HardwareProfile, RuntimeInfo
from edgefleet.common.models import ModelMetadata, TensorSpec
from edgefleet.orchestrator.costmodel.predictor import AnalyticPredictor, Prediction
from edgefleet.orchestrator.domain import Device, Variant
from edgefleet.orchestrator.selection import (
    CHOSEN,
    GATE_PENDING,
    GATE_REJECTED,
    LESS_ACCURATE,
    NOT_RUNNABLE,
    OVER_BUDGET,
    OVER_DISK,
    OVER_MEMORY,
    RUNTIME_TOO_OLD,
    SLOWER,
    accuracy_drop,
    accuracy_rank,
    select_for_fleet,
    select_variant,
)

GIB = 1 << 30
NOW = datetime(2026, 3, 1, tzinfo=UTC)


class TablePredictor:
    """Predicts from a table of p95 by variant id (p50 is 80% of it), counting its calls."""

    def __init__(self, p95_ms: dict[str, float], memory: dict[str, int] | None = None, threads: int = 2) -> None:
        self.p95_ms = p95_ms
        self.memory = memory or {}
        self.threads = threads
        self.calls = 0

    def predict(self, hardware: HardwareProfile, variant: Variant, threads: int | None = None) -> Prediction:
        self.calls += 1
        p95 = self.p95_ms[variant.variant_id]
        return Prediction(
            p50_ms=0.8 * p95,
            p95_ms=p95,
            memory_bytes=self.memory.get(variant.variant_id, 50 << 20),
            threads=threads or self.threads,
            parallel_fraction=0.5,
            basis="analytic",
        )


RUNTIME_VERSIONS = {"onnxruntime": "1.32.0", "litert": "2.3.0"}


def hardware(runtimes: tuple[str, ...] = ("onnxruntime", "litert"), **changes: Any) -> HardwareProfile:
    profile = HardwareProfile(
        cpu_model="Cortex-A76",
        architecture="aarch64",
        logical_cores=4,
        usable_cores=4.0,
        cpu_features=("asimd", "dotprod"),
        memory_total_bytes=2 * GIB,
        memory_available_bytes=GIB,
        disk_free_bytes=10 * GIB,
        runtimes=tuple(RuntimeInfo(name, RUNTIME_VERSIONS[name]) for name in runtimes),
        hardware_class="rpi5-4c",
    )
    return dataclasses.replace(profile, **changes)


def device(device_id: str = "dev-1", **changes: Any) -> Device:
    return Device(
        device_id=device_id,
        instance_key_hash="0" * 64,
        hardware=hardware(**changes),
        labels={},
        agent_version="0.1.0",
        registered_at=NOW,
        last_seen=NOW,
        connected=True,
        profile_revisions=1,
        desired_generation=0,
        reported_generation=0,
    )


def variant(variant_id: str, accuracy: float | None, fmt: str = "onnx", **changes: Any) -> Variant:
    precision = changes.pop("precision", "fp32")
    metadata = ModelMetadata(
        format=fmt,
        inputs=(TensorSpec("image", "float32", (1, 3, 224, 224)),),
        outputs=(TensorSpec("logits", "float32", (1, 1000)),),
        opset=17,
        parameters=4_000_000,
        macs=400_000_000,
        peak_activation_bytes=3_000_000,
        macs_by_op_type={"Conv": 400_000_000},
        precision=precision,
        layers=60,
    )
    base = Variant(
        variant_id=variant_id,
        model_name="effnet",
        model_version="1",
        kind="int8" if precision == "int8" else "pruned",
        format=fmt,
        precision=precision,
        digest="sha256:" + "1" * 64,
        size_bytes=16_000_000,
        metadata=metadata,
        accuracy=accuracy,
        accuracy_metric="top1",
        # As if the gate measured a source at 1.0 on the same samples.
        accuracy_drop=None if accuracy is None else (1.0 - accuracy) * 100.0,
    )
    return dataclasses.replace(base, **changes)


def reasons(selection: Any) -> dict[str, str]:
    return {c.variant.variant_id: c.reason for c in selection.candidates}


def test_select_most_accurate_within_budget() -> None:
    variants = [variant("fp32", 0.80), variant("int8", 0.78, precision="int8"), variant("small", 0.70)]
    predictor = TablePredictor({"fp32": 30.0, "int8": 12.0, "small": 5.0})

    selection = select_variant(device(), variants, budget_ms=15.0, predictor=predictor)

    assert selection.chosen is not None
    assert selection.chosen.variant_id == "int8"
    assert selection.threads == 2
    assert reasons(selection)["fp32"].startswith(OVER_BUDGET)
    assert reasons(selection)["small"].startswith(LESS_ACCURATE)
    assert reasons(selection)["int8"].startswith("chosen")


def test_select_no_budget_most_accurate() -> None:
    variants = [variant("fp32", 0.80), variant("small", 0.70)]
    predictor = TablePredictor({"fp32": 300.0, "small": 5.0})
    selection = select_variant(device(), variants, budget_ms=None, predictor=predictor)
    assert selection.chosen is not None
    assert selection.chosen.variant_id == "fp32"


def test_select_tie_goes_to_faster() -> None:
    variants = [variant("a", 0.75), variant("b", 0.75)]
    predictor = TablePredictor({"a": 9.0, "b": 6.0})
    selection = select_variant(device(), variants, budget_ms=None, predictor=predictor)
    assert selection.chosen is not None
    assert selection.chosen.variant_id == "b"
    assert reasons(selection)["a"].startswith(SLOWER)


def test_select_excludes_format() -> None:
    variants = [variant("tfl", 0.80, fmt="tflite"), variant("onnx", 0.70)]
    predictor = TablePredictor({"tfl": 5.0, "onnx": 5.0})
    selection = select_variant(device(runtimes=("onnxruntime",)), variants, budget_ms=None, predictor=predictor)
    assert selection.chosen is not None
    assert selection.chosen.variant_id == "onnx"
    assert reasons(selection)["tfl"] == f"{NOT_RUNNABLE}: tflite, but the device runs onnx"
    assert math.isnan(selection.candidates[0].predicted_p50_ms)


def test_select_excludes_memory() -> None:
    variants = [variant("big", 0.90), variant("fits", 0.70)]
    predictor = TablePredictor({"big": 5.0, "fits": 5.0}, memory={"big": 3 * GIB, "fits": 100 << 20})
    selection = select_variant(device(), variants, budget_ms=None, predictor=predictor)
    assert selection.chosen is not None
    assert selection.chosen.variant_id == "fits"
    assert reasons(selection)["big"] == f"{OVER_MEMORY}: 3072 MiB predicted, 2048 MiB on the device"
    assert selection.candidates[0].predicted_memory_bytes == 3 * GIB


def test_select_excludes_over_disk() -> None:
    variants = [variant("big", 0.90, size_bytes=2 * GIB), variant("fits", 0.70)]
    predictor = TablePredictor({"big": 5.0, "fits": 5.0})

    selection = select_variant(device(disk_free_bytes=GIB), variants, budget_ms=None, predictor=predictor)

    assert selection.chosen is not None
    assert selection.chosen.variant_id == "fits"
    assert reasons(selection)["big"] == f"{OVER_DISK}: 2.0 GiB file, 1.0 GiB free in its model store"


def test_select_unknown_disk_free() -> None:
    variants = [variant("big", 0.90, size_bytes=2 * GIB)]
    predictor = TablePredictor({"big": 5.0})

    selection = select_variant(device(disk_free_bytes=0), variants, budget_ms=None, predictor=predictor)

    assert selection.chosen is not None
    assert selection.chosen.variant_id == "big"


def test_select_excludes_gate_rejected() -> None:
    variants = [
        variant("bad", 0.95, status="rejected", rejection_reason="top1 drop of 3 points"),
        variant("ok", 0.70),
    ]
    selection = select_variant(device(), variants, budget_ms=None, predictor=TablePredictor({"ok": 5.0}))
    assert reasons(selection)["bad"] == f"{GATE_REJECTED}: top1 drop of 3 points"


def test_select_excludes_gate_pending() -> None:
    variants = [
        variant("uploaded", 0.95, status="pending", rejection_reason="not gated yet"),
        variant("ok", 0.70),
    ]
    selection = select_variant(device(), variants, budget_ms=None, predictor=TablePredictor({"ok": 5.0}))
    assert reasons(selection)["uploaded"] == f"{GATE_PENDING}: not gated yet"


def test_select_none_runnable() -> None:
    variants = [variant("tfl", 0.80, fmt="tflite"), variant("pending", 0.80, status="pending")]
    selection = select_variant(
        device(runtimes=("onnxruntime",)), variants, budget_ms=None, predictor=TablePredictor({})
    )
    assert selection.chosen is None
    assert selection.threads == 0
    assert len(selection.candidates) == 2
    assert not any(c.chosen for c in selection.candidates)
    assert "no variant qualifies" in selection.reason


def test_select_none_within_budget() -> None:
    variants = [variant("a", 0.8), variant("b", 0.7)]
    selection = select_variant(device(), variants, budget_ms=1.0, predictor=TablePredictor({"a": 5.0, "b": 3.0}))
    assert selection.chosen is None
    assert all(reason.startswith(OVER_BUDGET) for reason in reasons(selection).values())


def test_select_unmeasured_ranks_last() -> None:
    variants = [variant("unknown", None), variant("known", 0.5)]
    selection = select_variant(
        device(), variants, budget_ms=None, predictor=TablePredictor({"unknown": 1.0, "known": 9.0})
    )
    assert selection.chosen is not None
    assert selection.chosen.variant_id == "known"


def test_select_source_agreement() -> None:
    # Variants measured as agreement with the source: the unmeasured source agrees with itself fully.
    variants = [
        variant("source", None, kind="source", accuracy_metric=""),
        variant("int8", 0.99, precision="int8", accuracy_metric="top1_agreement"),
    ]
    selection = select_variant(
        device(), variants, budget_ms=None, predictor=TablePredictor({"source": 9.0, "int8": 3.0})
    )
    assert selection.chosen is not None
    assert selection.chosen.variant_id == "source"


def test_select_rejects_budget() -> None:
    with pytest.raises(ValueError, match="budget_ms must be positive"):
        select_variant(device(), [], budget_ms=0.0, predictor=TablePredictor({}))


def test_select_analytic_predictor() -> None:
    variants = [variant("fp32", 0.80), variant("int8", 0.79, precision="int8")]
    selection = select_variant(device(), variants, budget_ms=None, predictor=AnalyticPredictor())
    chosen = [c for c in selection.candidates if c.chosen]
    assert chosen[0].variant.variant_id == "fp32"
    assert 1 <= selection.threads <= 4
    assert chosen[0].basis == "analytic"
    assert chosen[0].predicted_p95_ms >= chosen[0].predicted_p50_ms > 0


def test_fleet_predicts_once_per_class() -> None:
    variants = [variant(f"v{i}", 0.5 + i / 100) for i in range(5)]
    predictor = TablePredictor({v.variant_id: 5.0 for v in variants})
    devices = [device(f"a-{i}") for i in range(50)]
    devices += [device(f"b-{i}", hardware_class="other-class") for i in range(50)]

    selections = select_for_fleet(devices, variants, budget_ms=10.0, predictor=predictor)

    assert len(selections) == 100
    assert predictor.calls == 2 * len(variants)
    assert selections["b-7"].chosen is not None
    assert selections["b-7"].chosen.variant_id == "v4"


def test_fleet_splits_class_by_runtime_version() -> None:
    variants = [variant("opset17", 0.8), dataclasses.replace(variant("opset13", 0.7), metadata=replace_opset(13))]
    predictor = TablePredictor({"opset17": 5.0, "opset13": 5.0})
    old_runtimes = (RuntimeInfo("onnxruntime", "1.10.0"), RuntimeInfo("litert", "2.3.0"))
    old = device("old")
    devices = [
        device("new"),
        dataclasses.replace(old, hardware=dataclasses.replace(old.hardware, runtimes=old_runtimes)),
    ]

    selections = select_for_fleet(devices, variants, budget_ms=10.0, predictor=predictor)

    assert devices[0].hardware.hardware_class == devices[1].hardware.hardware_class
    assert selections["new"].chosen is not None
    assert selections["new"].chosen.variant_id == "opset17"
    assert selections["old"].chosen is not None
    assert selections["old"].chosen.variant_id == "opset13"
    assert selections["old"].candidates[0].reason.startswith(RUNTIME_TOO_OLD)


def test_fleet_splits_class_by_disk_free() -> None:
    variants = [variant("big", 0.90, size_bytes=2 * GIB), variant("fits", 0.70)]
    predictor = TablePredictor({"big": 5.0, "fits": 5.0})
    devices = [device("roomy"), device("full", disk_free_bytes=GIB)]

    selections = select_for_fleet(devices, variants, budget_ms=None, predictor=predictor)

    assert devices[0].hardware.hardware_class == devices[1].hardware.hardware_class
    assert selections["roomy"].chosen is not None
    assert selections["roomy"].chosen.variant_id == "big"
    assert selections["full"].chosen is not None
    assert selections["full"].chosen.variant_id == "fits"


def replace_opset(opset: int) -> ModelMetadata:
    return dataclasses.replace(variant("any", None).metadata, opset=opset)


def test_select_ranks_by_drop_on_own_gate_data() -> None:
    # The int8 variant has the higher top-1, but on other data than the source's latest figure: its
    # own gate measured it 1 point below the source, so the source wins.
    variants = [
        variant("source", 0.90, kind="source", accuracy_drop=0.0),
        variant("int8", 0.94, precision="int8", accuracy_drop=1.0),
        variant("pruned", 0.895, accuracy_drop=0.5),
    ]
    predictor = TablePredictor({"source": 9.0, "int8": 3.0, "pruned": 5.0})

    selection = select_variant(device(), variants, budget_ms=None, predictor=predictor)

    assert selection.chosen is not None
    assert selection.chosen.variant_id == "source"
    assert reasons(selection)["source"].startswith(
        f"{CHOSEN}: most accurate runnable variant (accuracy drop 0.00 points"
    )
    assert reasons(selection)["int8"] == f"{LESS_ACCURATE}: accuracy drop 1.00 points, against 0.00"
    assert reasons(selection)["pruned"] == f"{LESS_ACCURATE}: accuracy drop 0.50 points, against 0.00"


def _gated_on(variant_id: str, drop: float, metric: str, samples: int, data: str, **changes: Any) -> Variant:
    return variant(
        variant_id, 1.0 - drop / 100.0, accuracy_metric=metric, accuracy_drop=drop, evaluation_samples=samples,
        evaluation_digest="sha256:" + data * 64, **changes,
    )


def test_select_notes_other_evaluation_data() -> None:
    """One sample better on 48 labelled samples outranks a drop of 0 on other data, with a note in both reasons."""
    variants = [
        variant("source", None, kind="source", accuracy_drop=0.0),
        _gated_on("pruned", -2.08, "top1", 48, "a"),
        _gated_on("int8", 0.0, "top1_agreement", 64, "b", precision="int8"),
    ]
    predictor = TablePredictor({"source": 9.0, "pruned": 5.0, "int8": 3.0})

    selection = select_variant(device(), variants, budget_ms=None, predictor=predictor)
    explained = reasons(selection)

    assert selection.chosen is not None
    assert selection.chosen.variant_id == "pruned"
    assert "note: it outranks int8 on drops measured on other evaluation data" in explained["pruned"]
    assert explained["int8"].startswith(f"{LESS_ACCURATE}: accuracy drop 0.00 points, against -2.08")
    assert (
        "note: measured on other evaluation data than pruned's (top1_agreement on 64 samples, against top1 on "
        "48 samples), so the two drops compare only roughly"
    ) in explained["int8"]
    assert "note" not in explained["source"]


def test_select_same_evaluation_data_no_note() -> None:
    variants = [
        variant("source", None, kind="source", accuracy_drop=0.0),
        _gated_on("pruned", -2.08, "top1", 48, "a"),
        _gated_on("int8", 0.0, "top1", 48, "a", precision="int8"),
    ]
    predictor = TablePredictor({"source": 9.0, "pruned": 5.0, "int8": 3.0})

    explained = reasons(select_variant(device(), variants, budget_ms=None, predictor=predictor))

    assert "note" not in explained["pruned"]
    assert explained["int8"] == f"{LESS_ACCURATE}: accuracy drop 0.00 points, against -2.08"


def test_select_variant_that_beat_its_source() -> None:
    variants = [
        variant("source", 0.90, kind="source", accuracy_drop=0.0),
        variant("distilled", 0.88, kind="distilled", accuracy_drop=-0.5),
    ]
    predictor = TablePredictor({"source": 9.0, "distilled": 3.0})

    selection = select_variant(device(), variants, budget_ms=None, predictor=predictor)

    assert selection.chosen is not None
    assert selection.chosen.variant_id == "distilled"


def test_accuracy_drop_of_variants_stored_without_one() -> None:
    # Variants gated before the drop was stored: agreement gives it exactly, a top-1 against labels does
    # not, since the source's figure on the same samples is unknown.
    source = variant("source", 0.90, kind="source", accuracy_drop=None)
    agreement = variant("int8", 0.97, precision="int8", accuracy_metric="top1_agreement", accuracy_drop=None)
    labelled = variant("pruned", 0.95, accuracy_drop=None)
    variants = [source, agreement, labelled]

    assert accuracy_drop(source, variants) == 0.0
    assert accuracy_drop(agreement, variants) == pytest.approx(3.0)
    assert accuracy_drop(labelled, variants) is None
    assert accuracy_rank(labelled, variants) == -1.0
