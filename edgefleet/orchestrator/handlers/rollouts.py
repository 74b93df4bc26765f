"""Rollout requests: create, get, list, and the operator actions pause, resume, abort and roll back."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime

from edgefleet.common.errors import FailedPrecondition, InvalidArgument, NotFound
from edgefleet.common.serde import MODEL_STATE_NAMES, enum_to_name, name_to_enum, timestamp
from edgefleet.orchestrator import validation
from edgefleet.orchestrator.handlers.catalog import get_model
from edgefleet.orchestrator.handlers.devices import ROLLOUTS_LISTING, suggest
from edgefleet.orchestrator.rollouts import engine, targets
from edgefleet.orchestrator.rollouts.domain import (
    DEFAULT_MAX_ROLLBACKS,
    DEFAULT_MIN_SAMPLES,
    DEFAULT_SAMPLE_TIMEOUT_S,
    ROLLOUT_ACTIONS,
    ROLLOUT_STATES,
    WAVE_DECISIONS,
    Rollout,
    RolloutSpec,
    Target,
    Wave,
    WaveDevice,
)
from edgefleet.orchestrator.rollouts.store import RolloutStore
from edgefleet.orchestrator.state import OrchestratorState
from edgefleet.orchestrator.store.base import NotFoundError
from edgefleet.v1 import operator_pb2

MAX_MIN_SAMPLES = 10_000_000
MAX_ROLLBACKS = 100
MAX_SAMPLE_TIMEOUT_S = 7 * 24 * 3600.0
MAX_BUDGET_MS = 3_600_000.0


def rollout_store(state: OrchestratorState) -> RolloutStore:
    """Return the state's RolloutStore; raise FailedPrecondition when the server did not set one up."""
    if state.rollouts is None:
        raise FailedPrecondition("rollouts are not available on this orchestrator: it has no rollout store")
    return state.rollouts


def spec_from_request(request: operator_pb2.CreateRolloutRequest) -> RolloutSpec:
    """Check a CreateRolloutRequest and return its spec with defaults filled in; raise InvalidArgument."""
    validation.check_name(request.model_name, "model_name")
    validation.check_text(request.model_version, "model_version", 128)
    validation.check_labels(request.target_labels, "target_labels")
    validation.check_text(request.target_hardware_class, "target_hardware_class")
    try:
        percents = targets.check_wave_percents(list(request.wave_percents) or [100])
    except targets.SelectorError as error:
        raise InvalidArgument("wave_percents", str(error)) from None
    if not (0 < request.budget_ms <= MAX_BUDGET_MS):
        raise InvalidArgument(
            "budget_ms",
            f"{request.budget_ms:.15g} must be above 0 and at most {MAX_BUDGET_MS:.0f}; give the p95 budget in ms",
        )
    for name in ("max_p95_regression_pct", "max_error_rate_pct"):
        value = getattr(request, name)
        if not (math.isfinite(value) and value >= 0):
            raise InvalidArgument(name, f"{value:g} must be a percentage of 0 or more")
    if request.max_error_rate_pct > 100:
        raise InvalidArgument("max_error_rate_pct", f"{request.max_error_rate_pct:g} is over 100")
    if request.min_samples > MAX_MIN_SAMPLES:
        raise InvalidArgument("min_samples", f"{request.min_samples} is over {MAX_MIN_SAMPLES}")
    if request.max_rollbacks > MAX_ROLLBACKS:
        raise InvalidArgument("max_rollbacks", f"{request.max_rollbacks} is over {MAX_ROLLBACKS}")
    timeout_s = request.sample_timeout_seconds
    if not (math.isfinite(timeout_s) and 0 <= timeout_s <= MAX_SAMPLE_TIMEOUT_S):
        raise InvalidArgument(
            "sample_timeout_seconds", f"{timeout_s:g} must be 0 (default) to {MAX_SAMPLE_TIMEOUT_S:g}"
        )
    return RolloutSpec(
        model_name=request.model_name,
        model_version=request.model_version,
        target=Target(labels=dict(request.target_labels), hardware_class=request.target_hardware_class),
        wave_percents=percents,
        budget_ms=request.budget_ms,
        max_p95_regression_pct=request.max_p95_regression_pct,
        max_error_rate_pct=request.max_error_rate_pct,
        min_samples=request.min_samples or DEFAULT_MIN_SAMPLES,
        max_rollbacks=request.max_rollbacks or DEFAULT_MAX_ROLLBACKS,
        sample_timeout_s=timeout_s or DEFAULT_SAMPLE_TIMEOUT_S,
    )


def create_rollout(request: operator_pb2.CreateRolloutRequest, state: OrchestratorState) -> operator_pb2.Rollout:
    """Create a pending rollout of a model version.

    Older rollouts of the model go on until the new one assigns its first device, which supersedes
    them, and the new rollout's reason names them. An empty model_version takes the newest version.
    Raises InvalidArgument for a malformed request, NotFound for an unknown model and
    FailedPrecondition when no variant of the version is accepted.
    """
    spec = spec_from_request(request)
    model = get_model(operator_pb2.GetModelRequest(name=spec.model_name, version=spec.model_version), state)
    variants = state.store.list_variants(model.name, model.version)
    if not any(v.status == "accepted" for v in variants):
        raise FailedPrecondition(
            f"no variant of {model.name}:{model.version} passed the gate; add an accepted variant first"
        )
    spec = replace(spec, model_version=model.version)
    rollouts = rollout_store(state)
    revoked = state.revoked_device_ids()
    devices = [d for d in state.store.list_devices() if d.device_id not in revoked]
    rollout, _ = engine.create_rollout(rollouts, spec, devices=devices)
    return rollout_to_proto(rollout, [])


def get_rollout(request: operator_pb2.GetRolloutRequest, state: OrchestratorState) -> operator_pb2.Rollout:
    rollouts = rollout_store(state)
    return rollout_to_proto(_load(rollouts, request.rollout_id), rollouts.list_waves(request.rollout_id))


def list_rollouts(
    request: operator_pb2.ListRolloutsRequest, state: OrchestratorState
) -> operator_pb2.ListRolloutsResponse:
    """List rollouts newest first, with their waves, filtered by model name and states."""
    try:
        states = [enum_to_name(value, ROLLOUT_STATES, "states") for value in request.states]
    except ValueError as error:
        raise InvalidArgument("states", str(error)) from None
    rollouts = rollout_store(state)
    found = rollouts.list_rollouts(model_name=request.model_name, states=states)
    return operator_pb2.ListRolloutsResponse(
        rollouts=[rollout_to_proto(r, rollouts.list_waves(r.rollout_id)) for r in found]
    )


def update_rollout(request: operator_pb2.UpdateRolloutRequest, state: OrchestratorState) -> operator_pb2.Rollout:
    """Apply an operator action; raise InvalidArgument, NotFound or FailedPrecondition for the wrong state."""
    try:
        action = enum_to_name(request.action, ROLLOUT_ACTIONS, "action")
    except ValueError as error:
        raise InvalidArgument("action", str(error)) from None
    rollouts = rollout_store(state)
    _load(rollouts, request.rollout_id)
    try:
        rollout = engine.apply_action(rollouts, request.rollout_id, action, datetime.now(UTC))
    except engine.RolloutActionError as error:
        raise FailedPrecondition(str(error)) from None
    return rollout_to_proto(rollout, rollouts.list_waves(rollout.rollout_id))


def _load(rollouts: RolloutStore, rollout_id: str) -> Rollout:
    if not rollout_id:
        raise InvalidArgument("rollout_id", "missing; list rollouts with `edgefleet rollout list`")
    validation.check_text(rollout_id, "rollout_id", 64)
    try:
        return rollouts.get_rollout(rollout_id)
    except NotFoundError:
        known = [r.rollout_id for r in rollouts.list_rollouts()]
        raise NotFound(f"rollout {rollout_id!r} not found{suggest(rollout_id, known, ROLLOUTS_LISTING)}") from None


# Conversions


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def wave_device_to_proto(device: WaveDevice) -> operator_pb2.WaveDevice:
    return operator_pb2.WaveDevice(
        device_id=device.device_id,
        variant_id=device.variant_id,
        hardware_class=device.hardware_class,
        state=name_to_enum(device.state, MODEL_STATE_NAMES),
        samples=device.samples,
        p95_ms=_nan(device.p95_ms),
        error_rate=device.error_rate,
        errors=device.errors,
        baseline_p95_ms=_nan(device.baseline_p95_ms),
        verdict=device.verdict,
        note=device.note,
        late=device.late,
        previous_variant_id=device.previous.variant_id if device.previous else "",
        threads=device.threads,
        restored=device.restored,
    )


def wave_to_proto(wave: Wave) -> operator_pb2.Wave:
    return operator_pb2.Wave(
        index=wave.index,
        percent=wave.percent,
        devices=[wave_device_to_proto(d) for d in wave.devices],
        decision=name_to_enum(wave.decision, WAVE_DECISIONS),
        reason=wave.reason,
        attempt=wave.attempt,
        started_at=timestamp(wave.started_at),
        decided_at=timestamp(wave.decided_at),
    )


def rollout_to_proto(rollout: Rollout, waves: list[Wave]) -> operator_pb2.Rollout:
    spec = rollout.spec
    return operator_pb2.Rollout(
        rollout_id=rollout.rollout_id,
        model_name=spec.model_name,
        model_version=spec.model_version,
        target_labels=dict(spec.target.labels),
        target_hardware_class=spec.target.hardware_class,
        wave_percents=list(spec.wave_percents),
        budget_ms=spec.budget_ms,
        max_p95_regression_pct=spec.max_p95_regression_pct,
        max_error_rate_pct=spec.max_error_rate_pct,
        state=name_to_enum(rollout.state, ROLLOUT_STATES),
        waves=[wave_to_proto(w) for w in waves],
        reason=rollout.reason,
        created_at=timestamp(rollout.created_at),
        updated_at=timestamp(rollout.updated_at),
        min_samples=spec.min_samples,
        max_rollbacks=spec.max_rollbacks,
        sample_timeout_seconds=spec.sample_timeout_s,
        rollbacks=rollout.rollbacks,
        stuck=rollout.stuck,
        superseded_by=rollout.superseded_by,
        current_wave=rollout.current_wave,
        started_at=timestamp(rollout.started_at),
    )
