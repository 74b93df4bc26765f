"""Compression jobs: create (with up-front checks of the recipe and its data), get, list and cancel."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from edgefleet.common.errors import FailedPrecondition, InvalidArgument, NotFound
from edgefleet.common.serde import timestamp
from edgefleet.orchestrator import validation
from edgefleet.orchestrator.compress.recipe import RecipeError
from edgefleet.orchestrator.domain import Variant
from edgefleet.orchestrator.handlers.catalog import get_model
from edgefleet.orchestrator.handlers.devices import suggest
from edgefleet.orchestrator.jobs.plan import PlanError, load_recipe_json, plan_job
from edgefleet.orchestrator.jobs.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job, JobStore
from edgefleet.orchestrator.state import OrchestratorState
from edgefleet.orchestrator.store.base import NotFoundError
from edgefleet.v1 import operator_pb2

log = logging.getLogger(__name__)

STATE_TO_PROTO = {
    QUEUED: operator_pb2.JOB_STATE_QUEUED,
    RUNNING: operator_pb2.JOB_STATE_RUNNING,
    SUCCEEDED: operator_pb2.JOB_STATE_SUCCEEDED,
    FAILED: operator_pb2.JOB_STATE_FAILED,
    CANCELLED: operator_pb2.JOB_STATE_CANCELLED,
}


def job_to_proto(job: Job) -> operator_pb2.CompressionJob:
    """Return the API message of a job."""
    return operator_pb2.CompressionJob(
        job_id=job.job_id,
        model_name=job.model_name,
        model_version=job.model_version,
        recipe_json=job.recipe_json,
        state=STATE_TO_PROTO[job.state],
        progress=job.progress,
        stage=job.stage,
        error=job.error,
        variant_ids=list(job.variant_ids),
        created_at=timestamp(job.created_at),
        updated_at=timestamp(job.updated_at),
    )


def _job_store(state: OrchestratorState) -> JobStore:
    if state.jobs is None:
        raise FailedPrecondition("compression jobs are not enabled on this orchestrator")
    return state.jobs


def create_compression_job(
    request: operator_pb2.CreateCompressionJobRequest, state: OrchestratorState
) -> operator_pb2.CompressionJob:
    """Check the recipe and its data sources against the source model, then queue the job.

    Raises InvalidArgument naming the recipe key or the data source value that is wrong, NotFound for
    an unknown model, and FailedPrecondition when jobs are disabled.
    """
    jobs = _job_store(state)
    model = get_model(operator_pb2.GetModelRequest(name=request.model_name, version=request.model_version), state)
    source = next(
        (v for v in state.store.list_variants(model.name, model.version) if v.kind == "source"),
        None,
    )
    if source is None:
        raise FailedPrecondition(f"model {model.name}:{model.version} has no source variant to compress")
    try:
        data = load_recipe_json(request.recipe_json)
        plan_job(data, source.metadata, _gated_variant(data, model.name, model.version, state))
    except RecipeError as error:
        raise InvalidArgument("recipe", str(error)) from None
    except PlanError as error:
        # A PlanError about the recipe as a whole has the field "recipe", which needs no second mention.
        field = "recipe" if error.field == "recipe" else f"recipe {error.field}"
        raise InvalidArgument(field, str(error).removeprefix(f"{error.field}: ")) from None
    now = datetime.now(UTC)
    job = Job(
        job_id=uuid.uuid4().hex[:12],
        model_name=model.name,
        model_version=model.version,
        source_variant_id=source.variant_id,
        source_digest=source.digest,
        source_format=source.format,
        recipe_json=json.dumps(data, sort_keys=True),
        created_at=now,
        updated_at=now,
    )
    stored = jobs.add_job(job)
    if state.job_runner is not None:
        state.job_runner.wake()
    log.info("queued compression job %s for %s:%s", stored.job_id, model.name, model.version)
    return job_to_proto(stored)


def _gated_variant(data: dict[str, Any], name: str, version: str, state: OrchestratorState) -> Variant | None:
    """Return the uploaded variant that the recipe's gate.variant names, or None when it names none.

    Raises InvalidArgument when the variant is unknown or of another model version, and
    FailedPrecondition when it does not wait for the gate (it is accepted or rejected already).
    """
    gate = data.get("gate")
    variant_id = gate.get("variant") if isinstance(gate, dict) else None
    if not isinstance(variant_id, str) or not variant_id:
        return None  # parse_recipe rejects a value of the wrong type.
    known = [v.variant_id for v in state.store.list_variants(name, version)]
    if variant_id not in known:
        raise InvalidArgument(
            "recipe gate.variant",
            f"{variant_id!r} is not a variant of {name}:{version}; list them with "
            f"`edgefleet models variants {name}:{version}`{suggest(variant_id, known)}",
        )
    variant = state.store.get_variant(variant_id)
    if variant.status != "pending":
        raise FailedPrecondition(
            f"variant {variant_id} is {variant.status} already; a gate job measures only uploaded variants "
            "that wait for the gate (status pending). Upload the file as another kind or version to gate it again"
        )
    return variant


def _get(job_id: str, jobs: JobStore) -> Job:
    if not job_id:
        raise InvalidArgument("job_id", "missing; pass a job id (`edgefleet jobs list` lists them)")
    validation.check_device_id(job_id, "job_id")
    try:
        return jobs.get_job(job_id)
    except NotFoundError:
        raise NotFound(f"compression job {job_id!r} not found; list jobs with edgefleet jobs list") from None


def get_compression_job(
    request: operator_pb2.GetCompressionJobRequest, state: OrchestratorState
) -> operator_pb2.CompressionJob:
    return job_to_proto(_get(request.job_id, _job_store(state)))


def list_compression_jobs(
    request: operator_pb2.ListCompressionJobsRequest, state: OrchestratorState
) -> operator_pb2.ListCompressionJobsResponse:
    if request.model_name:
        validation.check_name(request.model_name, "model_name")
    jobs = _job_store(state).list_jobs(request.model_name or None)
    return operator_pb2.ListCompressionJobsResponse(jobs=[job_to_proto(job) for job in jobs])


def cancel_compression_job(
    request: operator_pb2.CancelCompressionJobRequest, state: OrchestratorState
) -> operator_pb2.CompressionJob:
    """Cancel a queued job at once, or a running one by ending its worker process; nothing is stored.

    A job that is cancelled already is returned unchanged, so a retried cancel succeeds. Raises NotFound
    for an unknown job and FailedPrecondition for a job that succeeded or failed.
    """
    jobs = _job_store(state)
    existing = _get(request.job_id, jobs)
    job, changed = jobs.cancel(existing.job_id, datetime.now(UTC))
    if not changed and job.state == CANCELLED:
        log.info("compression job %s is cancelled already", job.job_id)
        return job_to_proto(job)
    if not changed:
        raise FailedPrecondition(f"job {job.job_id} already {job.state}; only queued or running jobs cancel")
    runner = state.job_runner
    if existing.state == RUNNING and runner is not None and not runner.cancel(job.job_id):
        log.warning("worker of cancelled job %s is still ending", job.job_id)
    log.info("cancelled compression job %s (was %s)", job.job_id, existing.state)
    return job_to_proto(jobs.get_job(job.job_id))
