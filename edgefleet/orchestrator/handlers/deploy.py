"""Direct assignment of a model to one device."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from datetime import UTC, datetime

from edgefleet.common.errors import FailedPrecondition, InvalidArgument, NotFound
from edgefleet.orchestrator import serde, validation
from edgefleet.orchestrator.domain import Assignment, Device, Variant
from edgefleet.orchestrator.handlers.catalog import get_model
from edgefleet.orchestrator.handlers.devices import describe_device, device_not_found, suggest
from edgefleet.orchestrator.handlers.explain import calibrated_predictor
from edgefleet.orchestrator.runtime_compat import check_runtime_version
from edgefleet.orchestrator.selection import (
    NOT_RUNNABLE,
    OVER_DISK,
    OVER_MEMORY,
    RUNTIME_TOO_OLD,
    runnable_formats,
    select_variant,
)
from edgefleet.orchestrator.state import OrchestratorState
from edgefleet.orchestrator.store.base import NotFoundError
from edgefleet.v1 import operator_pb2

log = logging.getLogger(__name__)

MAX_THREADS = 256


def choose_variant(device: Device, variants: list[Variant], state: OrchestratorState) -> tuple[Variant, int]:
    """Choose the most accurate variant the device can run, and its thread count, with the cost model.

    Raises FailedPrecondition listing every variant and why it was excluded when none fits.
    """
    predictor = calibrated_predictor(state, variants, [device.hardware.hardware_class])
    reported = state.store.get_reported_state(device.device_id)
    selection = select_variant(device, variants, budget_ms=None, predictor=predictor, reported=reported)
    if selection.chosen is None:
        reasons = "; ".join(f"{c.variant.variant_id}: {c.reason}" for c in selection.candidates) or "no variants"
        hints = []
        if any(c.reason.startswith(OVER_MEMORY) for c in selection.candidates):
            hints.append("a smaller variant (edgefleet models compress --int8)")
        if any(c.reason.startswith(OVER_DISK) for c in selection.candidates):
            hints.append(
                "a variant with a smaller file, or delete files on the device; its agent reports the free space "
                "within a heartbeat or two"
            )
        if any(c.reason.startswith(RUNTIME_TOO_OLD) for c in selection.candidates):
            hints.append("a variant that the device's runtime version loads, or upgrade the runtime on the device")
        if not hints or any(c.reason.startswith(NOT_RUNNABLE) for c in selection.candidates):
            hints.append("a variant in a format it can run (edgefleet models add --variant-kind)")
        raise FailedPrecondition(
            f"no variant runs on device {device.device_id} "
            f"(runtimes: {', '.join(f'{r.name} {r.version}'.strip() for r in device.hardware.runtimes) or 'none'}): "
            f"{reasons}. "
            f"Add {' or '.join(hints)}"
        )
    return selection.chosen, selection.threads


def thread_budget(device: Device) -> int:
    """Return the maximum intra-op threads worth running on a device: its usable cores rounded down, at least 1."""
    return max(1, math.floor(device.hardware.usable_cores))


def capped_threads(request: operator_pb2.DeployRequest, device: Device) -> int:
    """Return the request's thread count lowered to the device's thread budget; 0 stays 0 (choose automatically).

    Threads beyond the usable cores only compete for them, so the cost model never chooses more either.
    The reply's assignment carries the lowered count, and the caller compares it with its request.
    """
    budget = thread_budget(device)
    if request.threads <= budget:
        return request.threads
    log.info(
        "lowered threads from %d to %d for device_id=%s: it has %g usable cores",
        request.threads,
        budget,
        device.device_id,
        device.hardware.usable_cores,
    )
    return budget


def deploy(request: operator_pb2.DeployRequest, state: OrchestratorState) -> operator_pb2.DeployResponse:
    """Set one model in a device's desired state and push the new state to the agent if it is connected."""
    validation.check_device_id(request.device_id)
    if request.threads > MAX_THREADS:
        raise InvalidArgument("threads", f"{request.threads} is over the maximum of {MAX_THREADS}; use 0 for automatic")
    device = state.store.get_device(request.device_id)
    if device is None:
        raise device_not_found(request.device_id, state)
    if device.device_id in state.revoked_device_ids():
        raise FailedPrecondition(
            f"device {device.device_id!r} is revoked, so it cannot fetch models; enroll it again first "
            "(edgefleet enroll create)"
        )
    model = get_model(operator_pb2.GetModelRequest(name=request.model_name, version=request.model_version), state)
    variants = state.store.list_variants(model.name, model.version)
    if request.variant_id:
        matching = [v for v in variants if v.variant_id == request.variant_id]
        if not matching:
            raise NotFound(
                f"variant {request.variant_id!r} of {model.name}:{model.version} not found"
                f"{suggest(request.variant_id, [v.variant_id for v in variants])}"
            )
        variant = matching[0]
        if variant.status != "accepted":
            raise FailedPrecondition(f"variant {variant.variant_id} is {variant.status}: {variant.rejection_reason}")
        if variant.format not in runnable_formats(device.hardware):
            raise FailedPrecondition(
                f"variant {variant.variant_id} is {variant.format} but device {device.device_id} runs "
                f"{', '.join(runnable_formats(device.hardware)) or 'no runtime'}"
            )
        runtime_check = check_runtime_version(device.hardware, variant)
        if not runtime_check.loads:
            raise FailedPrecondition(
                f"variant {variant.variant_id} cannot be deployed to device {device.device_id}: {runtime_check.reason}"
            )
        if runtime_check.reason:
            log.warning(
                "deploying variant=%s to device_id=%s: %s", variant.variant_id, device.device_id, runtime_check.reason
            )
        threads = capped_threads(request, device)
    else:
        variant, chosen_threads = choose_variant(device, variants, state)
        threads = capped_threads(request, device) or chosen_threads

    assignment = Assignment(
        device_id=device.device_id,
        model_name=model.name,
        model_version=model.version,
        variant_id=variant.variant_id,
        digest=variant.digest,
        size_bytes=variant.size_bytes,
        format=variant.format,
        threads=threads,
    )
    if state.security is not None:
        # Only the assignment deployed with the flag carries it, so a later deploy ends the order.
        if request.rollback:
            state.security.store.set_rollback_order(device.device_id, model.name, variant.digest, datetime.now(UTC))
        else:
            state.security.store.clear_rollback_order(device.device_id, model.name)
    try:
        generation = state.store.set_assignment(assignment)
        generation, assignments = state.store.get_desired_state(device.device_id)
    except NotFoundError as error:
        raise NotFound(str(error)) from None
    pushed = state.hub.push_threadsafe(device.device_id, serde.desired_state_message(generation, assignments))
    log.info(
        "deployed model=%s:%s variant=%s to device_id=%s generation=%d (%s)",
        model.name,
        model.version,
        variant.variant_id,
        device.device_id,
        generation,
        "pushed" if pushed else "device not connected; it syncs on reconnect",
    )
    refreshed = state.store.get_device(device.device_id)
    if refreshed is None:  # An operator removed the device after the assignment was stored.
        raise device_not_found(device.device_id, state)
    return operator_pb2.DeployResponse(
        device=describe_device(refreshed, state), assignment=serde.assignment_to_proto(assignment)
    )


def replan_for_hardware(device: Device, state: OrchestratorState) -> int:
    """Re-plan the device's assignments that its hardware, as just registered, cannot run; return how many changed.

    An agent restarted with another profile, runtime or CPU share keeps its desired state, which may
    name a format it no longer runs, a runtime version it lacks, or more threads than its cores. An
    assignment whose variant the device cannot load gets the variant and threads that an automatic
    deploy of the same model version would choose. When no variant fits, it stays, and the agent
    reports it failed. One whose variant still loads keeps it, with threads lowered to the cores.
    """
    _, assignments = state.store.get_desired_state(device.device_id)
    changed = 0
    for assignment in assignments:
        variants = state.store.list_variants(assignment.model_name, assignment.model_version)
        current = next((v for v in variants if v.variant_id == assignment.variant_id), None)
        problem = _variant_problem(device, assignment, current)
        if problem:
            try:
                variant, threads = choose_variant(device, variants, state)
            except FailedPrecondition as error:
                log.warning(
                    "device_id=%s keeps variant=%s although %s: %s",
                    device.device_id,
                    assignment.variant_id,
                    problem,
                    error.message,
                )
                continue
        elif current is not None and assignment.threads > thread_budget(device):
            # The variant still loads, so the operator's or the rollout's choice of it is kept.
            problem = (
                f"it has {device.hardware.usable_cores:g} usable cores now, fewer than {assignment.threads} threads"
            )
            variant, threads = current, thread_budget(device)
        else:
            continue
        replanned = replace(
            assignment,
            variant_id=variant.variant_id,
            digest=variant.digest,
            size_bytes=variant.size_bytes,
            format=variant.format,
            threads=threads,
        )
        try:
            generation = state.store.set_assignment(replanned)
        except NotFoundError:
            return changed  # An operator removed the device meanwhile.
        changed += 1
        log.info(
            "re-planned device_id=%s model=%s:%s from variant=%s threads=%d to variant=%s threads=%d "
            "generation=%d, because %s",
            device.device_id,
            assignment.model_name,
            assignment.model_version,
            assignment.variant_id,
            assignment.threads,
            variant.variant_id,
            threads,
            generation,
            problem,
        )
    return changed


def _variant_problem(device: Device, assignment: Assignment, variant: Variant | None) -> str:
    """Return why the device cannot load the assignment's variant, or "" when it can."""
    formats = runnable_formats(device.hardware)
    if assignment.format not in formats:
        return f"it runs {', '.join(formats) or 'no runtime'} now, not {assignment.format}"
    if variant is not None:
        runtime_check = check_runtime_version(device.hardware, variant)
        if not runtime_check.loads:
            return runtime_check.reason
    return ""
