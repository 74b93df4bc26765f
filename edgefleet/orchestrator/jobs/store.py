"""Durable compression jobs: the Job record, the JobStore interface and its SQL implementation."""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, Row

from edgefleet.orchestrator.domain import Variant
from edgefleet.orchestrator.store import queries, rows
from edgefleet.orchestrator.store.base import AlreadyExistsError, NotFoundError, StoreError
from edgefleet.orchestrator.store.engine import SqlTransactions
from edgefleet.orchestrator.store.tables import variants
from edgefleet.orchestrator.store.tables_jobs import compression_jobs

logger = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
JOB_STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})
# How many times claim_next retries when another orchestrator took the chosen job first.
_CLAIM_RETRIES = 5
# The variants columns that a gate job writes over an uploaded variant that waited for the gate.
_GATE_COLUMNS = (
    "status",
    "rejection_reason",
    "accuracy",
    "accuracy_metric",
    "accuracy_drop",
    "evaluation_samples",
    "evaluation_digest",
    "latency_ms",
    "source_latency_ms",
    "parent_variant_id",
)


@dataclass(frozen=True)
class Job:
    """One compression job: the source model, the recipe, and its state and progress."""

    job_id: str
    model_name: str
    model_version: str
    source_variant_id: str
    source_digest: str
    source_format: str  # "onnx" or "tflite".
    recipe_json: str
    created_at: datetime
    updated_at: datetime
    state: str = QUEUED  # One of JOB_STATES.
    progress: float = 0.0  # 0 to 1.
    stage: str = "queued"
    error: str = ""
    variant_ids: tuple[str, ...] = field(default_factory=tuple)
    attempt: int = 0  # Incremented each time a runner starts the job.
    owner: str = ""  # "HOST:PID:TOKEN" of the runner running it; empty unless running.
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES


class JobStore(abc.ABC):
    """Compression jobs. Methods are synchronous and thread-safe; each one is one transaction.

    Writes on behalf of a running job name the attempt that runs it and return False, changing
    nothing, when the job is no longer running under that attempt (it was cancelled or requeued).
    """

    @abc.abstractmethod
    def add_job(self, job: Job) -> Job:
        """Store a new job; raise AlreadyExistsError for a known job_id."""

    @abc.abstractmethod
    def get_job(self, job_id: str) -> Job:
        """Return a job; raise NotFoundError."""

    @abc.abstractmethod
    def list_jobs(self, model_name: str | None = None, states: Sequence[str] = ()) -> list[Job]:
        """Return jobs, newest first, of one model and in the given states when those are given."""

    @abc.abstractmethod
    def claim_next(self, owner: str, now: datetime) -> Job | None:
        """Move the oldest queued job to running under a new attempt owned by owner; None when none waits."""

    @abc.abstractmethod
    def report_progress(self, job_id: str, attempt: int, progress: float, stage: str, now: datetime) -> bool:
        """Record the progress (clamped to [0, 1]) and stage of a running job; also a heartbeat."""

    @abc.abstractmethod
    def heartbeat(self, job_id: str, attempt: int, now: datetime) -> bool:
        """Record that the owner of a running job is alive."""

    @abc.abstractmethod
    def get_variant(self, variant_id: str) -> Variant:
        """Return a catalog variant, such as the uploaded one a gate job measures; raise NotFoundError."""

    @abc.abstractmethod
    def finish(
        self,
        job_id: str,
        attempt: int,
        results: Sequence[Variant],
        now: datetime,
        *,
        source_top1: float | None = None,
        source_samples: int = 0,
    ) -> bool:
        """Store the job's variants and mark it succeeded, in one transaction.

        A result whose id is an existing variant with status "pending" (an upload that waited for the
        gate) updates that variant's gate figures: status, reason, accuracy, accuracy drop, sample count
        and latency. source_top1, the source's top-1 accuracy that a gate with labels measured on
        source_samples samples, is stored on the job's source variant for display. Selection ranks by
        each variant's accuracy drop. Returns False, storing nothing, when the job is no longer running
        under attempt. Raises AlreadyExistsError, storing nothing, when a variant id exists already and
        is not pending.
        """

    @abc.abstractmethod
    def fail(self, job_id: str, attempt: int, error: str, now: datetime) -> bool:
        """Mark a running job failed with error."""

    @abc.abstractmethod
    def requeue(self, job_id: str, attempt: int, reason: str, now: datetime) -> bool:
        """Put a running job back in the queue (its owner died or stopped); it runs again from the start."""

    @abc.abstractmethod
    def cancel(self, job_id: str, now: datetime) -> tuple[Job, bool]:
        """Cancel a queued or running job; return the job and whether this call changed it.

        A job that already finished is returned unchanged. Raises NotFoundError.
        """

    @abc.abstractmethod
    def close(self) -> None: ...


def job_values(job: Job) -> dict[str, Any]:
    """Return the compression_jobs row of a job."""
    return {
        "job_id": job.job_id,
        "model_name": job.model_name,
        "model_version": job.model_version,
        "source_variant_id": job.source_variant_id,
        "source_digest": job.source_digest,
        "source_format": job.source_format,
        "recipe_json": job.recipe_json,
        "state": job.state,
        "progress": float(job.progress),
        "stage": job.stage,
        "error": job.error,
        "variant_ids": list(job.variant_ids),
        "attempt": job.attempt,
        "owner": job.owner,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "heartbeat_at": job.heartbeat_at,
    }


def job_from_row(row: Row[Any]) -> Job:
    return Job(
        job_id=row.job_id,
        model_name=row.model_name,
        model_version=row.model_version,
        source_variant_id=row.source_variant_id,
        source_digest=row.source_digest,
        source_format=row.source_format,
        recipe_json=row.recipe_json,
        state=row.state,
        progress=float(row.progress),
        stage=row.stage,
        error=row.error,
        variant_ids=tuple(row.variant_ids),
        attempt=int(row.attempt),
        owner=row.owner,
        created_at=row.created_at,
        updated_at=row.updated_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        heartbeat_at=row.heartbeat_at,
    )


class SqlJobStore(SqlTransactions, JobStore):
    """A JobStore on the SQL store's engine (SqlStore.engine or engine.create_store_engine), schema at head.

    close() disposes the engine only when owns_engine is set, so a store built on a shared engine
    leaves it to its owner.
    """

    def __init__(self, engine: Engine, *, owns_engine: bool = False) -> None:
        super().__init__(engine)
        self._owns_engine = owns_engine

    def add_job(self, job: Job) -> Job:
        if job.state not in JOB_STATES:
            raise StoreError(f"invalid job state {job.state!r}; expected one of {JOB_STATES}")
        for name in ("created_at", "updated_at"):
            rows.require_aware(name, getattr(job, name))
        with self._write() as connection:
            if not queries.insert_unless_exists(connection, compression_jobs, job_values(job)):
                raise AlreadyExistsError(f"job {job.job_id!r} already exists; choose another id")
            return _load(connection, job.job_id)

    def get_job(self, job_id: str) -> Job:
        with self._read() as connection:
            return _load(connection, job_id)

    def list_jobs(self, model_name: str | None = None, states: Sequence[str] = ()) -> list[Job]:
        query = sa.select(compression_jobs).order_by(
            compression_jobs.c.created_at.desc(), compression_jobs.c.job_id.desc()
        )
        if model_name is not None:
            query = query.where(compression_jobs.c.model_name == model_name)
        if states:
            query = query.where(compression_jobs.c.state.in_(list(states)))
        with self._read() as connection:
            return [job_from_row(row) for row in connection.execute(query)]

    def claim_next(self, owner: str, now: datetime) -> Job | None:
        rows.require_aware("now", now)
        oldest = (
            sa.select(compression_jobs.c.job_id)
            .where(compression_jobs.c.state == QUEUED)
            .order_by(compression_jobs.c.created_at, compression_jobs.c.job_id)
            .limit(1)
        )
        for _ in range(_CLAIM_RETRIES):
            with self._write() as connection:
                job_id = connection.execute(oldest).scalar()
                if job_id is None:
                    return None
                # The state condition makes the claim safe against another orchestrator on PostgreSQL:
                # only one UPDATE finds the row still queued.
                claimed = connection.execute(
                    sa.update(compression_jobs)
                    .where(compression_jobs.c.job_id == job_id, compression_jobs.c.state == QUEUED)
                    .values(
                        state=RUNNING,
                        attempt=compression_jobs.c.attempt + 1,
                        owner=owner,
                        progress=0.0,
                        stage="starting",
                        error="",
                        started_at=now,
                        heartbeat_at=now,
                        updated_at=now,
                    )
                )
                if claimed.rowcount == 1:
                    job = _load(connection, job_id)
                    logger.info("claimed job %s (attempt %d) for %s", job_id, job.attempt, owner)
                    return job
        return None

    def report_progress(self, job_id: str, attempt: int, progress: float, stage: str, now: datetime) -> bool:
        rows.require_aware("now", now)
        clamped = min(1.0, max(0.0, float(progress)))
        return self._update_running(job_id, attempt, progress=clamped, stage=stage, heartbeat_at=now, updated_at=now)

    def heartbeat(self, job_id: str, attempt: int, now: datetime) -> bool:
        rows.require_aware("now", now)
        return self._update_running(job_id, attempt, heartbeat_at=now)

    def finish(
        self,
        job_id: str,
        attempt: int,
        results: Sequence[Variant],
        now: datetime,
        *,
        source_top1: float | None = None,
        source_samples: int = 0,
    ) -> bool:
        rows.require_aware("now", now)
        values = [rows.variant_values(variant, created_at=now) for variant in results]
        with self._write() as connection:
            # The update comes first: on PostgreSQL it locks the job row, so a concurrent cancel either
            # waits for this transaction or has already moved the job out of running.
            changed = connection.execute(
                _running(job_id, attempt).values(
                    state=SUCCEEDED,
                    progress=1.0,
                    stage="done",
                    variant_ids=[variant.variant_id for variant in results],
                    owner="",
                    finished_at=now,
                    updated_at=now,
                    heartbeat_at=now,
                )
            )
            if changed.rowcount != 1:
                return False
            for variant, row in zip(results, values, strict=True):
                queries.load_model_version(connection, variant.model_name, variant.model_version)
                if queries.insert_unless_exists(connection, variants, row, ("variant_id",)):
                    continue
                gated = connection.execute(
                    sa.update(variants)
                    .where(variants.c.variant_id == variant.variant_id, variants.c.status == "pending")
                    .values({key: row[key] for key in _GATE_COLUMNS})
                )
                if gated.rowcount != 1:
                    # Leaving the block with an exception rolls the whole transaction back.
                    raise AlreadyExistsError(
                        f"variant {variant.variant_id!r} already exists and does not wait for the gate "
                        "(another job gated it first); nothing was stored"
                    )
            if source_top1 is not None:
                source_variant_id = sa.select(compression_jobs.c.source_variant_id).where(
                    compression_jobs.c.job_id == job_id
                )
                connection.execute(
                    sa.update(variants)
                    .where(variants.c.variant_id == source_variant_id.scalar_subquery())
                    .values(accuracy=source_top1, accuracy_metric="top1", evaluation_samples=source_samples)
                )
        logger.info("job %s succeeded with variants %s", job_id, [v.variant_id for v in results])
        return True

    def get_variant(self, variant_id: str) -> Variant:
        with self._read() as connection:
            return queries.load_variant(connection, variant_id)

    def fail(self, job_id: str, attempt: int, error: str, now: datetime) -> bool:
        rows.require_aware("now", now)
        return self._update_running(
            job_id, attempt, state=FAILED, error=error, stage="failed", owner="", finished_at=now, updated_at=now
        )

    def requeue(self, job_id: str, attempt: int, reason: str, now: datetime) -> bool:
        rows.require_aware("now", now)
        return self._update_running(
            job_id,
            attempt,
            state=QUEUED,
            progress=0.0,
            stage=f"queued again: {reason}",
            owner="",
            heartbeat_at=None,
            updated_at=now,
        )

    def cancel(self, job_id: str, now: datetime) -> tuple[Job, bool]:
        rows.require_aware("now", now)
        with self._write() as connection:
            changed = connection.execute(
                sa.update(compression_jobs)
                .where(compression_jobs.c.job_id == job_id, compression_jobs.c.state.in_([QUEUED, RUNNING]))
                .values(state=CANCELLED, stage="cancelled", owner="", finished_at=now, updated_at=now)
            )
            return _load(connection, job_id), changed.rowcount == 1

    def close(self) -> None:
        if self._owns_engine:
            self._engine.dispose()

    def _update_running(self, job_id: str, attempt: int, **values: Any) -> bool:
        with self._write() as connection:
            return bool(connection.execute(_running(job_id, attempt).values(**values)).rowcount == 1)


def _running(job_id: str, attempt: int) -> sa.Update:
    return sa.update(compression_jobs).where(
        compression_jobs.c.job_id == job_id,
        compression_jobs.c.attempt == attempt,
        compression_jobs.c.state == RUNNING,
    )


def _load(connection: Connection, job_id: str) -> Job:
    row = connection.execute(sa.select(compression_jobs).where(compression_jobs.c.job_id == job_id)).first()
    if row is None:
        raise NotFoundError(f"compression job {job_id!r} not found")
    return job_from_row(row)


def open_job_store(url: str) -> SqlJobStore:
    """Open the job store on its own engine at url, migrating the schema to the newest revision.

    For processes that have no SqlStore to share an engine with, such as the job worker. Raises
    ValueError for an unsupported URL, DatabaseUnavailable when the PostgreSQL server cannot be reached
    and the driver's OperationalError for other connection failures.
    """
    from edgefleet.orchestrator.store.engine import create_store_engine, database_errors, upgrade_to_head

    engine = create_store_engine(url)
    try:
        with database_errors(engine):
            upgrade_to_head(engine)
    except BaseException:
        engine.dispose()
        raise
    return SqlJobStore(engine, owns_engine=True)
