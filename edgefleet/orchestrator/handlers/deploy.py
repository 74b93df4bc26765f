"""Direct assignment of a model to one device."""

from __future__ import annotations

import logging

from edgefleet.common.errors import FailedPrecondition, InvalidArgument, NotFound
from edgefleet.orchestrator import serde, validation
from edgefleet.orchestrator.domain import Assignment, Device, Variant
from edgefleet.orchestrator.handlers.catalog import get_model
from edgefleet.orchestrator.handlers.devices import describe_device, suggest
from edgefleet.orchestrator.state import OrchestratorState
from edgefleet.orchestrator.store.base import NotFoundError
from edgefleet.v1 import operator_pb2

log = logging.getLogger(__name__)

# The model format each runtime executes.
RUNTIME_FORMATS = {"onnxruntime": "onnx", "litert": "tflite"}
MAX_THREADS = 256


def runnable_formats(device: Device) -> list[str]:
    return [RUNTIME_FORMATS[r.name] for r in device.hardware.runtimes if r.name in RUNTIME_FORMATS]


def choose_variant(device: Device, variants: list[Variant]) -> Variant:
    """Pick the source variant when the device can run it, else the first accepted variant it can run."""
    formats = runnable_formats(device)
    candidates = [v for v in variants if v.status == "accepted" and v.format in formats]
    candidates.sort(key=lambda v: (v.kind != "source", v.precision != "fp32", v.variant_id))
    if not candidates:
        offered = ", ".join(f"{v.variant_id} ({v.format}, {v.status})" for v in variants) or "none"
        raise FailedPrecondition(
            f"no accepted variant runs on device {device.device_id}, which runs {', '.join(formats) or 'no runtime'}; "
            f"variants: {offered}. Add a variant in a format it can run (edgefleet models add --variant-kind)"
        )
    return candidates[0]


def deploy(request: operator_pb2.DeployRequest, state: OrchestratorState) -> operator_pb2.DeployResponse:
    """Set one model in a device's desired state and push the new state to the agent if it is connected."""
    validation.check_device_id(request.device_id)
    if request.threads > MAX_THREADS:
        raise InvalidArgument("threads", f"{request.threads} is over the maximum of {MAX_THREADS}; use 0 for automatic")
    device = state.store.get_device(request.device_id)
    if device is None:
        known = [d.device_id for d in state.store.list_devices()]
        raise NotFound(f"device {request.device_id!r} not found{suggest(request.device_id, known)}")
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
        if variant.format not in runnable_formats(device):
            raise FailedPrecondition(
                f"variant {variant.variant_id} is {variant.format} but device {device.device_id} runs "
                f"{', '.join(runnable_formats(device)) or 'no runtime'}"
            )
    else:
        variant = choose_variant(device, variants)

    assignment = Assignment(
        device_id=device.device_id,
        model_name=model.name,
        model_version=model.version,
        variant_id=variant.variant_id,
        digest=variant.digest,
        size_bytes=variant.size_bytes,
        format=variant.format,
        threads=request.threads,
    )
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
    assert refreshed is not None
    return operator_pb2.DeployResponse(
        device=describe_device(refreshed, state), assignment=serde.assignment_to_proto(assignment)
    )
