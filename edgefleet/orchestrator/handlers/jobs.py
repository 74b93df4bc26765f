"""Compression jobs: create (with up-front checks of the recipe and its data), get, list and cancel."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime

from edgefleet.common.errors import FailedPrecondition, InvalidArgument, NotFound
from edgefleet.common.serde import timestamp
from edgefleet.orchestrator import validation
from edgefleet.orchestrator.compress.recipe import RecipeError
from edgefleet.orchestrator.handlers.catalog import get_model
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
        plan_job(data, source.metadata)
    except RecipeError as error:
        raise InvalidArgument("recipe", str(error)) from None
    except PlanError as error:
        raise InvalidArgument(f"recipe {error.field}", str(error).removeprefix(f"{error.field}: ")) from None
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


def _get(job_id: str, jobs: JobStore) -> Job:
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

    Raises NotFound for an unknown job and FailedPrecondition for a job that already finished.
    """
    jobs = _job_store(state)
    existing = _get(request.job_id, jobs)
    job, changed = jobs.cancel(existing.job_id, datetime.now(UTC))
    if not changed:
        raise FailedPrecondition(f"job {job.job_id} already {job.state}; only queued or running jobs cancel")
    runner = state.job_runner
    if existing.state == RUNNING and runner is not None and not runner.cancel(job.job_id):
        log.warning("worker of cancelled job %s is still ending", job.job_id)
    log.info("cancelled compression job %s (was %s)", job.job_id, existing.state)
    return job_to_proto(jobs.get_job(job.job_id))
