"""Tests of the rollout engine on a real store (SQLite and PostgreSQL) with synthetic metric windows."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from edgefleet.common.hardware import HardwareProfile, RuntimeInfo
from edgefleet.common.models import ModelMetadata, TensorSpec
from edgefleet.common.sketch import LatencySketch
from edgefleet.orchestrator.domain import Assignment, Device, MetricWindow, ModelStatus, ModelVersion, Variant
from edgefleet.orchestrator.rollouts import engine as rollout_engine
from edgefleet.orchestrator.rollouts.domain import Rollout, RolloutSpec, Target, Wave
from edgefleet.orchestrator.rollouts.engine import RolloutActionError, RolloutEngine, apply_action, create_rollout
from edgefleet.orchestrator.rollouts.reconcile import (
    GENERATION_LAG,
    NOT_SERVING,
    OTHER_VARIANT,
    UNEXPECTED,
    Reconciler,
    device_drift,
)
from edgefleet.orchestrator.rollouts.store import RevisionConflictError, SqlRolloutStore
from edgefleet.orchestrator.store import Store
from edgefleet.orchestrator.store.engine import create_store_engine
from edgefleet.orchestrator.store.sql import SqlStore

START = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)
MODEL = "effnet"
WINDOW_S = 10


class Clock:
    """A manual clock for the engine; advance() moves it forward."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def profile(name: str, *, runtimes: tuple[str, ...] = ("onnxruntime", "litert"), cores: float = 2.0) -> HardwareProfile:
    versions = {"onnxruntime": "1.32.0", "litert": "2.3.0"}
    return HardwareProfile(
        cpu_model="Test CPU",
        architecture="x86_64",
        logical_cores=4,
        usable_cores=cores,
        cpu_features=("avx2",),
        memory_total_bytes=2 << 30,
        memory_available_bytes=1 << 30,
        disk_free_bytes=10 << 30,
        runtimes=tuple(RuntimeInfo(r, versions[r]) for r in runtimes),
        profile_name=name,
        hardware_class=f"{name}-class",
    )


def metadata(model_format: str = "onnx") -> ModelMetadata:
    return ModelMetadata(
        format=model_format,
        inputs=(TensorSpec(name="x", dtype="float32", shape=(1, 4)),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=(1, 3)),),
        opset=17,
        parameters=15,
        macs=12,
        peak_activation_bytes=64,
        macs_by_op_type={"MatMul": 12},
        layers=2,
    )


class Fleet:
    """A store with devices, model versions and synthetic metrics, and an engine on a manual clock."""

    def __init__(self, store: Store, rollouts: SqlRolloutStore) -> None:
        self.store = store
        self.rollouts = rollouts
        self.clock = Clock()
        self.pushed: list[str] = []
        self.revoked: set[str] = set()
        self.engine = RolloutEngine(
            store, rollouts, notify=self._notify, clock=self.clock, excluded_devices=lambda: frozenset(self.revoked)
        )
        self._batches = itertools.count()

    def _notify(self, device_id: str) -> bool:
        self.pushed.append(device_id)
        return True

    def device(self, device_id: str, hardware: HardwareProfile, **labels: str) -> Device:
        return self.store.register_device(
            device_id=device_id,
            instance_key_hash=hashlib.sha256(device_id.encode()).hexdigest(),
            hardware=hardware,
            labels={"kind": "camera", **labels},
            agent_version="test",
            peer="ipv4:127.0.0.1:1",
            now=self.clock(),
        )

    def model(self, version: str, *kinds: tuple[str, str, float]) -> list[Variant]:
        """Add a model version with variants given as (kind, format, accuracy); return the variants.

        The ONNX source variant has accuracy 0.9, so the selection prefers it where it runs.
        """
        digest = "sha256:" + hashlib.sha256(f"{version}-source".encode()).hexdigest()
        self.store.add_model_version(
            ModelVersion(MODEL, version, digest, 100, metadata(), self.clock()),
            Variant(
                f"{MODEL}-{version}-source",
                MODEL,
                version,
                "source",
                "onnx",
                "fp32",
                digest,
                100,
                metadata(),
                accuracy=0.9,
            ),
        )
        added = [self.store.get_variant(f"{MODEL}-{version}-source")]
        for kind, model_format, accuracy in kinds:
            variant_digest = "sha256:" + hashlib.sha256(f"{version}-{kind}".encode()).hexdigest()
            added.append(
                self.store.add_variant(
                    Variant(
                        f"{MODEL}-{version}-{kind}",
                        MODEL,
                        version,
                        kind,
                        model_format,
                        "fp32",
                        variant_digest,
                        100,
                        metadata(model_format),
                        accuracy=accuracy,
                    )
                )
            )
        return added

    def assign(self, device_id: str, variant_id: str) -> int:
        variant = self.store.get_variant(variant_id)
        return self.store.set_assignment(
            Assignment(
                device_id, MODEL, variant.model_version, variant_id, variant.digest, variant.size_bytes, variant.format
            )
        )

    def assignment(self, device_id: str) -> Assignment | None:
        _, assignments = self.store.get_desired_state(device_id)
        return next((a for a in assignments if a.model_name == MODEL), None)

    def samples(
        self,
        device_id: str,
        variant_id: str,
        latency_ms: float,
        count: int = 50,
        errors: int = 0,
        *,
        at: datetime,
        rejected: int = 0,
    ) -> None:
        """Store one window of count inferences of latency_ms on a device, starting at at.

        rejected adds calls whose input the device rejected: failed, with no latency in the sketch.
        """
        sketch = LatencySketch()
        for _ in range(count):
            sketch.add(latency_ms)
        device = self.store.get_device(device_id)
        assert device is not None
        variant = self.store.get_variant(variant_id)
        window = MetricWindow(
            device_id=device_id,
            model_name=MODEL,
            model_version=variant.model_version,
            variant_id=variant_id,
            hardware_class=device.hardware.hardware_class,
            window_start=at,
            window_seconds=WINDOW_S,
            received_at=at + timedelta(seconds=WINDOW_S),
            inference_count=count + rejected,
            error_count=errors + rejected,
            sketch=sketch.to_bytes(),
        )
        self.store.add_metric_batch(device_id, f"batch-{next(self._batches)}", [window])

    def report(self, device_id: str, variant_id: str, state: str, error: str = "") -> None:
        variant = self.store.get_variant(variant_id)
        device = self.store.get_device(device_id)
        assert device is not None
        status = ModelStatus(
            device_id, MODEL, variant.model_version, variant_id, variant.digest, state, error=error, threads=1
        )
        self.store.save_reported_state(device_id, device.desired_generation, [status], self.clock())

    def serve_wave(self, rollout: Rollout, latency_ms: float, count: int = 50) -> None:
        """Report latency_ms from every assigned device of the rollout's current wave."""
        wave = self.current_wave(rollout.rollout_id)
        for device in wave.devices:
            if device.variant_id:
                self.samples(device.device_id, device.variant_id, latency_ms, count, at=self.clock())

    def current_wave(self, rollout_id: str) -> Wave:
        rollout = self.rollouts.get_rollout(rollout_id)
        return [w for w in self.rollouts.list_waves(rollout_id) if w.index == rollout.current_wave][-1]

    def step(self, rollout_id: str, seconds: float = 1.0) -> Rollout:
        self.clock.advance(seconds)
        return self.engine.step(rollout_id)

    def create(self, version: str = "2", **changes: Any) -> Rollout:
        spec = RolloutSpec(
            model_name=MODEL,
            model_version=version,
            target=Target(labels={"kind": "camera"}),
            wave_percents=(50, 100),
            budget_ms=20.0,
            max_p95_regression_pct=25.0,
            max_error_rate_pct=5.0,
            min_samples=40,
            sample_timeout_s=300.0,
        )
        rollout, _ = create_rollout(self.rollouts, dataclasses.replace(spec, **changes), self.clock())
        return rollout


@pytest.fixture
def fleet(db_url: str) -> Iterator[Fleet]:
    # db_url is migrated to head already, so the store skips open_store's Alembic check.
    store = SqlStore(create_store_engine(db_url))
    yield Fleet(store, SqlRolloutStore(store.engine))
    store.close()


@pytest.fixture
def two_classes(fleet: Fleet) -> Fleet:
    """Four cameras in two hardware classes, all on version 1, and version 2 with a TFLite variant."""
    for index in range(2):
        fleet.device(f"cam-a{index}", profile("alpha"))
        fleet.device(f"cam-b{index}", profile("beta"))
    fleet.model("1")
    fleet.model("2", ("tflite", "tflite", 0.5))
    for device_id in ("cam-a0", "cam-a1", "cam-b0", "cam-b1"):
        fleet.assign(device_id, f"{MODEL}-1-source")
    return fleet


def test_pending_until_device(fleet: Fleet) -> None:
    fleet.model("2")
    rollout = fleet.create()
    stepped = fleet.step(rollout.rollout_id)
    assert stepped.state == "pending"
    assert "waiting for a device" in stepped.reason


def test_canary_spreads_classes(two_classes: Fleet) -> None:
    rollout = two_classes.create()
    stepped = two_classes.step(rollout.rollout_id)
    wave = two_classes.current_wave(rollout.rollout_id)
    assert stepped.state == "running"
    assert {d.hardware_class for d in wave.devices} == {"alpha-class", "beta-class"}
    assert len(wave.devices) == 2


def test_canary_prefers_connected(two_classes: Fleet) -> None:
    two_classes.store.set_connected("cam-a1", True, two_classes.clock())
    rollout = two_classes.create(wave_percents=(25, 100))
    two_classes.step(rollout.rollout_id)
    wave = two_classes.current_wave(rollout.rollout_id)
    assert [d.device_id for d in wave.devices] == ["cam-a1"]


def test_canary_skips_unrunnable_devices(fleet: Fleet) -> None:
    """A device that no variant suits goes to the last wave, so the canary measures a device that runs it."""
    fleet.device("cam-a0", profile("alpha", runtimes=("litert",)))
    fleet.device("cam-b0", profile("beta", runtimes=("onnxruntime",)))
    fleet.model("2")
    rollout = fleet.create(wave_percents=(50, 100))

    fleet.step(rollout.rollout_id)
    canary = fleet.current_wave(rollout.rollout_id)

    assert [d.device_id for d in canary.devices] == ["cam-b0"]
    assert canary.devices[0].variant_id == f"{MODEL}-2-source"
    assert canary.decision == "waiting"


def test_revoked_device_left_out(two_classes: Fleet) -> None:
    two_classes.revoked.add("cam-a0")
    rollout = two_classes.create(wave_percents=(100,))
    stepped = two_classes.step(rollout.rollout_id)
    wave = two_classes.current_wave(rollout.rollout_id)
    assert "cam-a0" not in stepped.plan
    assert sorted(d.device_id for d in wave.devices) == ["cam-a1", "cam-b0", "cam-b1"]


def test_device_revoked_after_plan_left_out(two_classes: Fleet) -> None:
    rollout = two_classes.create()
    two_classes.step(rollout.rollout_id)
    first = two_classes.current_wave(rollout.rollout_id)
    second_wave = [d for d in two_classes.rollouts.get_rollout(rollout.rollout_id).plan[2:]]
    two_classes.revoked.add(second_wave[0])
    two_classes.serve_wave(two_classes.rollouts.get_rollout(rollout.rollout_id), 5.0)
    for device in first.devices:
        two_classes.report(device.device_id, device.variant_id, "serving")
    two_classes.step(rollout.rollout_id)
    wave = two_classes.current_wave(rollout.rollout_id)
    assert wave.index == 1
    assert [d.device_id for d in wave.devices] == second_wave[1:]


def test_revoked_late_device_not_admitted(two_classes: Fleet) -> None:
    rollout = two_classes.create()
    two_classes.step(rollout.rollout_id)
    two_classes.device("cam-late", profile("alpha"))
    two_classes.revoked.add("cam-late")
    stepped = two_classes.step(rollout.rollout_id)
    assert "cam-late" not in stepped.plan


def test_wave_assigns_with_previous(two_classes: Fleet) -> None:
    rollout = two_classes.create()
    two_classes.step(rollout.rollout_id)
    wave = two_classes.current_wave(rollout.rollout_id)
    device = wave.devices[0]
    assignment = two_classes.assignment(device.device_id)
    assert assignment is not None
    assert (assignment.variant_id, assignment.rollout_id) == (f"{MODEL}-2-source", rollout.rollout_id)
    assert device.previous is not None
    assert device.previous.variant_id == f"{MODEL}-1-source"
    assert sorted(two_classes.pushed) == sorted(d.device_id for d in wave.devices)


def test_waits_for_samples(two_classes: Fleet) -> None:
    rollout = two_classes.create()
    two_classes.step(rollout.rollout_id)
    two_classes.serve_wave(rollout, 5.0, count=10)
    stepped = two_classes.step(rollout.rollout_id)
    wave = two_classes.current_wave(rollout.rollout_id)
    assert stepped.state == "running"
    assert wave.decision == "waiting"
    assert all(d.samples == 10 for d in wave.devices)


def test_waves_succeed(two_classes: Fleet) -> None:
    rollout = two_classes.create()
    two_classes.step(rollout.rollout_id)
    two_classes.serve_wave(rollout, 5.0)
    second = two_classes.step(rollout.rollout_id)
    assert second.current_wave == 1
    two_classes.serve_wave(rollout, 5.0)
    done = two_classes.step(rollout.rollout_id)
    assert done.state == "succeeded"
    waves = two_classes.rollouts.list_waves(rollout.rollout_id)
    assert [w.decision for w in waves] == ["proceed", "proceed"]
    assert all(two_classes.assignment(d) is not None for d in ("cam-a0", "cam-a1", "cam-b0", "cam-b1"))
    versions = {two_classes.assignment(d).model_version for d in ("cam-a0", "cam-a1", "cam-b0", "cam-b1")}  # type: ignore[union-attr]
    assert versions == {"2"}


def test_budget_breach_rolls_back(two_classes: Fleet) -> None:
    rollout = two_classes.create()
    two_classes.step(rollout.rollout_id)
    two_classes.serve_wave(rollout, 50.0)
    stepped = two_classes.step(rollout.rollout_id)
    wave = two_classes.rollouts.list_waves(rollout.rollout_id)[0]
    assert stepped.state == "rolling_back"
    assert wave.decision == "rollback"
    assert {d.verdict for d in wave.devices} == {"over_budget"}
    final = two_classes.step(rollout.rollout_id)
    assert final.state == "rolled_back"
    restored = two_classes.assignment(wave.devices[0].device_id)
    assert restored is not None
    assert restored.variant_id == f"{MODEL}-1-source"


@pytest.mark.parametrize(
    ("count", "errors", "rejected", "reason"),
    [
        (50, 10, 0, "error rate 20.00%"),
        # A variant whose input every application call misses has samples but no latency at all.
        (0, 0, 50, "error rate 100.00%"),
    ],
)
def test_error_rate_rolls_back(two_classes: Fleet, count: int, errors: int, rejected: int, reason: str) -> None:
    rollout = two_classes.create()
    two_classes.step(rollout.rollout_id)
    wave = two_classes.current_wave(rollout.rollout_id)
    device = wave.devices[0]
    two_classes.samples(
        device.device_id, device.variant_id, 5.0, count=count, errors=errors, rejected=rejected, at=two_classes.clock()
    )
    stepped = two_classes.step(rollout.rollout_id)
    assert stepped.state == "rolling_back"
    assert reason in stepped.reason


def test_regression_pauses(two_classes: Fleet) -> None:
    for device_id in ("cam-a0", "cam-a1", "cam-b0", "cam-b1"):
        two_classes.samples(device_id, f"{MODEL}-1-source", 10.0, at=START - timedelta(minutes=5))
    rollout = two_classes.create()
    two_classes.step(rollout.rollout_id)
    two_classes.serve_wave(rollout, 15.0)
    stepped = two_classes.step(rollout.rollout_id)
    wave = two_classes.current_wave(rollout.rollout_id)
    assert stepped.state == "paused"
    assert wave.decision == "pause"
    assert all(d.baseline_p95_ms is not None and 9.0 < d.baseline_p95_ms < 11.0 for d in wave.devices)


def test_resume_accepts_paused_wave(two_classes: Fleet) -> None:
    for device_id in ("cam-a0", "cam-b0"):
        two_classes.samples(device_id, f"{MODEL}-1-source", 10.0, at=START - timedelta(minutes=5))
    rollout = two_classes.create()
    two_classes.step(rollout.rollout_id)
    two_classes.serve_wave(rollout, 15.0)
    two_classes.step(rollout.rollout_id)
    resumed = apply_action(two_classes.rollouts, rollout.rollout_id, "resume", two_classes.clock())
    assert resumed.state == "running"
    stepped = two_classes.step(rollout.rollout_id)
    assert stepped.current_wave == 1


def test_pause_stops_waves(two_classes: Fleet) -> None:
    rollout = two_classes.create()
    two_classes.step(rollout.rollout_id)
    paused = apply_action(two_classes.rollouts, rollout.rollout_id, "pause", two_classes.clock())
    two_classes.serve_wave(rollout, 5.0)
    stepped = two_classes.step(rollout.rollout_id)
    assert paused.state == "paused"
    assert stepped.current_wave == 0
    assert two_classes.current_wave(rollout.rollout_id).devices[0].samples == 50


def test_paused_wave_reason_counts_samples(two_classes: Fleet) -> None:
    rollout = two_classes.create()
    two_classes.step(rollout.rollout_id)
    apply_action(two_classes.rollouts, rollout.rollout_id, "pause", two_classes.clock())
    two_classes.serve_wave(rollout, 5.0, count=10)
    two_classes.step(rollout.rollout_id)
    wave = two_classes.current_wave(rollout.rollout_id)
    assert wave.devices[0].samples == 10
    assert wave.reason.startswith("waiting for 40 samples per device")
    assert f"{wave.devices[0].device_id} 10" in wave.reason


def test_action_wrong_state(two_classes: Fleet) -> None:
    rollout = two_classes.create()
    with pytest.raises(RolloutActionError, match="cannot resume"):
        apply_action(two_classes.rollouts, rollout.rollout_id, "resume", two_classes.clock())


def test_rollback_after_success(two_classes: Fleet) -> None:
    rollout = two_classes.create(wave_percents=(100,))
    two_classes.step(rollout.rollout_id)
    two_classes.serve_wave(rollout, 5.0)
    assert two_classes.step(rollout.rollout_id).state == "succeeded"
    rolling = apply_action(two_classes.rollouts, rollout.rollout_id, "rollback", two_classes.clock())
    final = two_classes.step(rollout.rollout_id)
    assert rolling.state == "rolling_back"
    assert final.state == "rolled_back"
    assert {two_classes.assignment(d).variant_id for d in ("cam-a0", "cam-b1")} == {f"{MODEL}-1-source"}  # type: ignore[union-attr]


def test_rollback_removes_new_model(fleet: Fleet) -> None:
    fleet.device("cam-1", profile("alpha"))
    fleet.model("2")
    rollout = fleet.create(wave_percents=(100,))
    fleet.step(rollout.rollout_id)
    apply_action(fleet.rollouts, rollout.rollout_id, "rollback", fleet.clock())
    fleet.step(rollout.rollout_id)
    assert fleet.assignment("cam-1") is None


def test_rolling_back_waits_for_report(two_classes: Fleet) -> None:
    rollout = two_classes.create(wave_percents=(100,))
    two_classes.step(rollout.rollout_id)
    two_classes.store.set_connected("cam-a0", True, two_classes.clock())
    apply_action(two_classes.rollouts, rollout.rollout_id, "rollback", two_classes.clock())
    waiting = two_classes.step(rollout.rollout_id)
    assert waiting.state == "rolling_back"
    two_classes.report("cam-a0", f"{MODEL}-1-source", "serving")
    done = two_classes.step(rollout.rollout_id)
    assert done.state == "rolled_back"


def test_rollback_keeps_reassigned(two_classes: Fleet) -> None:
    rollout = two_classes.create(wave_percents=(100,))
    two_classes.step(rollout.rollout_id)
    two_classes.assign("cam-a0", f"{MODEL}-2-tflite")
    apply_action(two_classes.rollouts, rollout.rollout_id, "rollback", two_classes.clock())
    two_classes.step(rollout.rollout_id)
    kept = two_classes.assignment("cam-a0")
    wave = two_classes.current_wave(rollout.rollout_id)
    left = next(d for d in wave.devices if d.device_id == "cam-a0")
    others = [d for d in wave.devices if d.device_id != "cam-a0"]
    assert kept is not None
    assert kept.variant_id == f"{MODEL}-2-tflite"
    assert not left.restored
    assert left.note.startswith("left as it is by the rollback: reassigned outside this rollout")
    assert left.note.count("reassigned outside this rollout") == 1
    assert all(d.restored for d in others)


def test_reassigned_device_not_awaited(two_classes: Fleet) -> None:
    rollout = two_classes.create(wave_percents=(50, 100))
    two_classes.step(rollout.rollout_id)
    wave = two_classes.current_wave(rollout.rollout_id)
    moved, kept = wave.devices
    two_classes.assign(moved.device_id, f"{MODEL}-1-source")
    two_classes.samples(kept.device_id, kept.variant_id, 5.0, at=two_classes.clock())
    advanced = two_classes.step(rollout.rollout_id)
    judged = next(w for w in two_classes.rollouts.list_waves(rollout.rollout_id) if w.index == 0)
    reassigned = next(d for d in judged.devices if d.device_id == moved.device_id)
    assert advanced.current_wave == 1
    assert judged.decision == "proceed"
    assert "1 device reassigned outside this rollout" in judged.reason
    assert reassigned.verdict == "reassigned"
    assert f"now {MODEL}-1-source" in reassigned.note


def test_wave_of_reassigned_devices_pauses(two_classes: Fleet) -> None:
    """A wave whose every device an operator moved elsewhere measured nothing, so it does not pass."""
    rollout = two_classes.create(wave_percents=(50, 100))
    two_classes.step(rollout.rollout_id)
    wave = two_classes.current_wave(rollout.rollout_id)
    for device in wave.devices:
        two_classes.assign(device.device_id, f"{MODEL}-1-source")

    paused = two_classes.step(rollout.rollout_id)

    judged = two_classes.current_wave(rollout.rollout_id)
    assert paused.state == "paused"
    assert paused.current_wave == 0
    assert judged.decision == "pause"
    assert "no device of this wave was measured: 2 devices reassigned outside this rollout" in judged.reason
    apply_action(two_classes.rollouts, rollout.rollout_id, "resume", two_classes.clock())
    assert two_classes.step(rollout.rollout_id).current_wave == 1


def test_rollback_note_of_judged_reassigned(two_classes: Fleet) -> None:
    rollout = two_classes.create(wave_percents=(50, 100))
    two_classes.step(rollout.rollout_id)
    wave = two_classes.current_wave(rollout.rollout_id)
    for device in wave.devices:
        two_classes.assign(device.device_id, f"{MODEL}-1-source")
    two_classes.step(rollout.rollout_id)  # The gates judge the devices reassigned, with the new assignment.
    apply_action(two_classes.rollouts, rollout.rollout_id, "rollback", two_classes.clock())
    two_classes.step(rollout.rollout_id)

    notes = [d.note for d in two_classes.current_wave(rollout.rollout_id).devices]
    assert all(n.startswith("left as it is by the rollback: reassigned outside this rollout (now ") for n in notes)
    assert all(n.count("reassigned outside this rollout") == 1 for n in notes)


def test_last_wave_of_reassigned_device_not_counted(fleet: Fleet) -> None:
    """A one-wave rollout whose only device was redeployed does not claim that the device runs the version."""
    fleet.device("cam-1", profile("alpha"))
    fleet.device("cam-2", profile("alpha"))
    fleet.model("1")
    fleet.model("2")
    for device_id in ("cam-1", "cam-2"):
        fleet.assign(device_id, f"{MODEL}-1-source")
    rollout = fleet.create(wave_percents=(100,))
    fleet.step(rollout.rollout_id)
    wave = fleet.current_wave(rollout.rollout_id)
    moved, kept = wave.devices
    fleet.assign(moved.device_id, f"{MODEL}-1-source")
    fleet.samples(kept.device_id, kept.variant_id, 5.0, at=fleet.clock())

    done = fleet.step(rollout.rollout_id)

    assert done.state == "succeeded"
    assert done.reason == f"all 1 waves passed; 1 device runs {MODEL}:2"


def test_failed_variant_not_pushed_again(two_classes: Fleet) -> None:
    rollout = two_classes.create(max_rollbacks=3)
    two_classes.step(rollout.rollout_id)
    first = two_classes.current_wave(rollout.rollout_id)
    failed = first.devices[0]
    two_classes.report(failed.device_id, failed.variant_id, "failed", "cannot load the model")
    retry = two_classes.step(rollout.rollout_id)
    second = two_classes.current_wave(rollout.rollout_id)
    retried = next(d for d in second.devices if d.device_id == failed.device_id)
    assert retry.rollbacks == 1
    assert second.attempt == 1
    assert failed.variant_id == f"{MODEL}-2-source"
    assert retried.variant_id == f"{MODEL}-2-tflite"
    other = next(d for d in second.devices if d.device_id != failed.device_id)
    assert other.variant_id == f"{MODEL}-2-source"


def test_failed_device_skipped_when_nothing_left(fleet: Fleet) -> None:
    fleet.device("cam-1", profile("alpha", runtimes=("onnxruntime",)))
    fleet.device("cam-2", profile("alpha", runtimes=("onnxruntime",)))
    fleet.model("2")
    rollout = fleet.create(max_rollbacks=3, wave_percents=(100,))
    fleet.step(rollout.rollout_id)
    fleet.report("cam-1", f"{MODEL}-2-source", "failed", "out of memory")
    fleet.step(rollout.rollout_id)
    wave = fleet.current_wave(rollout.rollout_id)
    skipped = next(d for d in wave.devices if d.device_id == "cam-1")
    assert skipped.verdict == "skipped"
    assert skipped.variant_id == ""
    assert fleet.assignment("cam-1") is None


def test_repeated_rollbacks_stop(two_classes: Fleet) -> None:
    rollout = two_classes.create(max_rollbacks=2)
    two_classes.step(rollout.rollout_id)
    two_classes.serve_wave(rollout, 50.0)
    first = two_classes.step(rollout.rollout_id)
    two_classes.serve_wave(rollout, 50.0)
    second = two_classes.step(rollout.rollout_id)
    final = two_classes.step(rollout.rollout_id)
    assert first.state == "running"
    assert second.state == "rolling_back"
    assert final.state == "rolled_back"
    assert final.rollbacks == 2
    assert "2 of at most 2 rollbacks" in final.reason


def test_retry_excludes_class_variant(two_classes: Fleet) -> None:
    rollout = two_classes.create(max_rollbacks=2)
    two_classes.step(rollout.rollout_id)
    two_classes.serve_wave(rollout, 50.0)
    two_classes.step(rollout.rollout_id)
    retry = two_classes.current_wave(rollout.rollout_id)
    assert {d.variant_id for d in retry.devices} == {f"{MODEL}-2-tflite"}


def test_late_device_gets_version(two_classes: Fleet) -> None:
    rollout = two_classes.create(wave_percents=(50, 100))
    two_classes.step(rollout.rollout_id)
    two_classes.serve_wave(rollout, 5.0)
    two_classes.step(rollout.rollout_id)
    two_classes.device("cam-late", profile("alpha"))
    two_classes.step(rollout.rollout_id)
    assignment = two_classes.assignment("cam-late")
    waves = two_classes.rollouts.list_waves(rollout.rollout_id)
    late = [d for w in waves for d in w.devices if d.device_id == "cam-late"]
    assert assignment is not None
    assert assignment.model_version == "2"
    assert len(late) == 1
    assert late[0].late
    assert waves[0].devices[-1].device_id == "cam-late"


def test_early_device_joins_plan(two_classes: Fleet) -> None:
    rollout = two_classes.create(wave_percents=(50, 100))
    two_classes.step(rollout.rollout_id)
    two_classes.device("cam-early", profile("alpha"))
    stepped = two_classes.step(rollout.rollout_id)
    assert "cam-early" in stepped.plan
    assert two_classes.assignment("cam-early") is None


def test_device_after_success_gets_version(two_classes: Fleet) -> None:
    rollout = two_classes.create(wave_percents=(100,))
    two_classes.step(rollout.rollout_id)
    two_classes.serve_wave(rollout, 5.0)
    two_classes.step(rollout.rollout_id)
    two_classes.device("cam-new", profile("beta"), site="b")
    two_classes.step(rollout.rollout_id)
    assignment = two_classes.assignment("cam-new")
    assert assignment is not None
    assert assignment.rollout_id == rollout.rollout_id


def test_supersede_names_new(two_classes: Fleet) -> None:
    two_classes.model("3")
    old = two_classes.create()
    two_classes.step(old.rollout_id)
    new = two_classes.create(version="3")
    created = two_classes.rollouts.get_rollout(old.rollout_id)
    two_classes.step(new.rollout_id)
    superseded = two_classes.rollouts.get_rollout(old.rollout_id)
    assert created.state == "running"
    assert old.rollout_id in new.reason
    assert superseded.state == "superseded"
    assert superseded.superseded_by == new.rollout_id
    assert new.rollout_id in superseded.reason


def test_unmatched_rollout_supersedes_nothing(two_classes: Fleet) -> None:
    two_classes.model("3")
    old = two_classes.create()
    two_classes.step(old.rollout_id)
    typo = two_classes.create(version="3", target=Target(labels={"kidn": "camera"}))
    pending = two_classes.step(typo.rollout_id)
    two_classes.serve_wave(old, 5.0)
    advanced = two_classes.step(old.rollout_id)
    assert pending.state == "pending"
    assert "no device has the label 'kidn'" in pending.reason
    assert f"{old.rollout_id} (running) goes on" in pending.reason
    assert advanced.state == "running"
    assert advanced.current_wave == 1


def test_rollout_of_unrunnable_devices_supersedes_nothing(two_classes: Fleet) -> None:
    """A rollout that ends without assigning a device leaves the older rollout in charge."""
    two_classes.model("3")
    old = two_classes.create(wave_percents=(100,))
    two_classes.step(old.rollout_id)
    two_classes.serve_wave(old, 5.0)
    succeeded = two_classes.step(old.rollout_id)
    two_classes.device("cam-tiny", profile("tiny", runtimes=("litert",)), site="tiny")
    unrunnable = two_classes.create(version="3", target=Target(labels={"site": "tiny"}), wave_percents=(100,))
    two_classes.step(unrunnable.rollout_id)
    ended = two_classes.step(unrunnable.rollout_id)
    rolling_back = apply_action(two_classes.rollouts, old.rollout_id, "rollback", two_classes.clock())
    assert succeeded.state == "succeeded"
    assert ended.state == "aborted"
    assert rolling_back.state == "rolling_back"


def test_superseded_rollback_names_newer(two_classes: Fleet) -> None:
    two_classes.model("3")
    old = two_classes.create()
    two_classes.step(old.rollout_id)
    new = two_classes.create(version="3")
    two_classes.step(new.rollout_id)
    with pytest.raises(RolloutActionError) as refused:
        apply_action(two_classes.rollouts, old.rollout_id, "rollback", two_classes.clock())
    assert f"superseded by rollout {new.rollout_id}" in str(refused.value)
    assert f"`edgefleet rollout rollback {new.rollout_id}`" in str(refused.value)


def test_superseded_not_advanced(two_classes: Fleet) -> None:
    two_classes.model("3")
    old = two_classes.create()
    two_classes.step(old.rollout_id)
    new = two_classes.create(version="3")
    two_classes.step(new.rollout_id)
    two_classes.serve_wave(old, 5.0)
    two_classes.clock.advance(1)
    two_classes.engine.tick()
    assert two_classes.rollouts.get_rollout(old.rollout_id).current_wave == 0


def test_stuck_then_abort(two_classes: Fleet) -> None:
    rollout = two_classes.create(sample_timeout_s=60.0)
    two_classes.step(rollout.rollout_id)
    stuck = two_classes.step(rollout.rollout_id, seconds=61)
    aborted = apply_action(two_classes.rollouts, rollout.rollout_id, "abort", two_classes.clock())
    assert stuck.stuck
    assert stuck.reason.startswith("stuck")
    assert aborted.state == "aborted"
    assert "while stuck" in aborted.reason
    kept = two_classes.assignment(two_classes.current_wave(rollout.rollout_id).devices[0].device_id)
    assert kept is not None
    assert kept.model_version == "2"


def test_stuck_abort_clears_flag(two_classes: Fleet) -> None:
    rollout = two_classes.create(sample_timeout_s=60.0)
    two_classes.step(rollout.rollout_id)
    two_classes.step(rollout.rollout_id, seconds=61)
    apply_action(two_classes.rollouts, rollout.rollout_id, "abort", two_classes.clock())
    aborted = two_classes.rollouts.get_rollout(rollout.rollout_id)
    assert aborted.state == "aborted"
    assert not aborted.stuck


def test_stuck_rollback_clears_flag(two_classes: Fleet) -> None:
    rollout = two_classes.create(sample_timeout_s=60.0)
    two_classes.step(rollout.rollout_id)
    stuck = two_classes.step(rollout.rollout_id, seconds=61)
    rolling_back = apply_action(two_classes.rollouts, rollout.rollout_id, "rollback", two_classes.clock())
    rolled_back = two_classes.step(rollout.rollout_id)
    assert stuck.stuck
    assert not rolling_back.stuck
    assert rolled_back.state == "rolled_back"
    assert not rolled_back.stuck


def test_tick_runs_all(two_classes: Fleet) -> None:
    rollout = two_classes.create()
    two_classes.clock.advance(1)
    count = two_classes.engine.tick()
    assert count == 1
    assert two_classes.rollouts.get_rollout(rollout.rollout_id).state == "running"


def test_lease_blocks_other_engine(two_classes: Fleet) -> None:
    rollout = two_classes.create()
    two_classes.engine.tick()
    other = RolloutEngine(two_classes.store, two_classes.rollouts, clock=two_classes.clock, holder="other")
    two_classes.serve_wave(rollout, 5.0)
    assert other.tick() == 0
    two_classes.clock.advance(rollout_engine.LEASE_TTL_S + 1)
    assert other.tick() == 1


def test_save_conflict(two_classes: Fleet) -> None:
    rollout = two_classes.create()
    two_classes.rollouts.save_rollout(dataclasses.replace(rollout, reason="first"), two_classes.clock())
    with pytest.raises(RevisionConflictError):
        two_classes.rollouts.save_rollout(dataclasses.replace(rollout, reason="second"), two_classes.clock())


def test_assign_is_idempotent(two_classes: Fleet) -> None:
    rollout = two_classes.create()
    two_classes.step(rollout.rollout_id)
    before = two_classes.store.get_device("cam-a0")
    wave = two_classes.current_wave(rollout.rollout_id)
    two_classes.engine._assign(rollout, wave)
    after = two_classes.store.get_device("cam-a0")
    assert before is not None
    assert after is not None
    assert after.desired_generation == before.desired_generation


# Reconciliation


def test_drift_generation_lag(two_classes: Fleet) -> None:
    device = two_classes.store.get_device("cam-a0")
    assert device is not None
    _, desired = two_classes.store.get_desired_state("cam-a0")
    kinds = [d.kind for d in device_drift(device, desired, [])]
    assert GENERATION_LAG in kinds


def test_drift_kinds(two_classes: Fleet) -> None:
    two_classes.report("cam-a0", f"{MODEL}-2-tflite", "serving")
    two_classes.report("cam-a1", f"{MODEL}-1-source", "failed", "bad file")
    device_a0 = two_classes.store.get_device("cam-a0")
    device_a1 = two_classes.store.get_device("cam-a1")
    assert device_a0 is not None
    assert device_a1 is not None
    drift_a0 = device_drift(
        device_a0, two_classes.store.get_desired_state("cam-a0")[1], two_classes.store.get_reported_state("cam-a0")
    )
    drift_a1 = device_drift(
        device_a1, two_classes.store.get_desired_state("cam-a1")[1], two_classes.store.get_reported_state("cam-a1")
    )
    assert [d.kind for d in drift_a0] == [OTHER_VARIANT]
    assert [d.kind for d in drift_a1] == [NOT_SERVING]


def test_drift_unexpected(fleet: Fleet) -> None:
    fleet.device("cam-1", profile("alpha"))
    fleet.model("1")
    fleet.report("cam-1", f"{MODEL}-1-source", "serving")
    device = fleet.store.get_device("cam-1")
    assert device is not None
    drift = device_drift(device, [], fleet.store.get_reported_state("cam-1"))
    assert [d.kind for d in drift] == [UNEXPECTED]


def test_reconciler_repushes_after_grace(two_classes: Fleet) -> None:
    reconciler = Reconciler(two_classes.store, lambda device_id: True, clock=two_classes.clock)
    first = reconciler.tick(["cam-a0"])
    two_classes.clock.advance(31)
    second = reconciler.tick(["cam-a0"])
    two_classes.clock.advance(10)
    third = reconciler.tick(["cam-a0"])
    assert first == []
    assert second == ["cam-a0"]
    assert third == []


def test_reconciler_ignores_current(two_classes: Fleet) -> None:
    two_classes.report("cam-a0", f"{MODEL}-1-source", "serving")
    reconciler = Reconciler(two_classes.store, lambda d: True, clock=two_classes.clock)
    reconciler.tick(["cam-a0"])
    two_classes.clock.advance(120)
    assert reconciler.tick(["cam-a0"]) == []
