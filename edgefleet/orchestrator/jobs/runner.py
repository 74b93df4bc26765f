"""Runs queued compression jobs one at a time, each in a fresh worker process, and supervises them.

The worker process is started with the spawn method, so torch, onnxruntime's quantizer and the model
data never load into the orchestrator process. The worker opens its own connection to the database and
writes progress there. The runner (a thread of the orchestrator) claims the oldest queued job, starts
the worker, records a heartbeat on the job while the worker runs, terminates the worker when the job is
cancelled (SIGTERM, then SIGKILL after terminate_grace_s) and records a failure when the worker dies
without recording an outcome. A worker that loses the database exits with EXIT_DATABASE_UNAVAILABLE,
and the runner queues its job again once it can write that.

Recovery: a job stays RUNNING in the database when its orchestrator dies (kill -9, power loss). A runner
puts such a job back in the queue, to run again from the start under a new attempt, when its owner
(HOST:PID:TOKEN) is on this host and that process no longer exists, or when its heartbeat is older than
lease_s (the only test for owners on other hosts). This check runs at start-up and then every
lease_s / 4 seconds, and also removes the work directories of attempts that no longer run. Writes
of the dead attempt's worker, if it still runs, are ignored, and it exits within a second of noticing
that its orchestrator is gone. A graceful stop also requeues the running job.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

from edgefleet.orchestrator.jobs.store import CANCELLED, FAILED, RUNNING, SUCCEEDED, Job, JobStore
from edgefleet.orchestrator.outage import RetryLog

if TYPE_CHECKING:
    from edgefleet.orchestrator.state import OrchestratorState

logger = logging.getLogger(__name__)

# Exit status of a worker whose job was cancelled or requeued while it ran.
EXIT_ABANDONED = 3
# Exit status of a worker that lost the database. The runner queues its job again.
EXIT_DATABASE_UNAVAILABLE = 4
# Work directories are named JOBID-ATTEMPT. Other entries under work_root are never removed.
_WORK_DIR_NAME = re.compile(r"[0-9A-Za-z]+-[0-9]+")


@dataclass(frozen=True)
class RunnerConfig:
    """Runner settings: the database and artifact locations that workers use, and the timing."""

    db_url: str
    artifacts_root: Path
    work_root: Path  # Scratch space; each attempt gets a subdirectory, removed when its worker exits.
    poll_interval_s: float = 0.5
    heartbeat_interval_s: float = 2.0
    lease_s: float = 60.0
    terminate_grace_s: float = 5.0
    log_level: str = "info"
    log_format: str = "text"
    # A job whose worker loses the database goes back to the queue until this many attempts in a row lost it.
    # The runner reached the database to claim each of them, so workers that lose it again and again point at
    # a fault of the workers' own connections (a full max_connections, for example), not a passing outage.
    max_database_losses: int = 10
    # Maximum wait before the runner claims a job again after a worker lost the database.
    max_claim_delay_s: float = 30.0


@dataclass(frozen=True)
class WorkerArgs:
    """Everything a worker process needs; plain values, so it pickles for the spawn start method."""

    db_url: str
    artifacts_root: str
    work_dir: str
    job_id: str
    attempt: int
    parent_pid: int
    log_level: str = "info"
    log_format: str = "text"


@dataclass
class _Running:
    job: Job
    process: BaseProcess
    work_dir: Path
    last_heartbeat: float
    stop_reason: str = ""  # "cancelled" or "stopping" once the runner decided to end the worker.


def _worker_entry(args: WorkerArgs) -> None:
    """Process target: imports the worker module, and with it onnxruntime, in the child only."""
    from edgefleet.orchestrator.jobs import worker

    worker.main(args)


class JobRunner:
    """Claims and runs compression jobs in worker processes; see the module docstring."""

    def __init__(self, store: JobStore, config: RunnerConfig) -> None:
        self.store = store
        self.config = config
        # HOST:PID:TOKEN; the token tells apart runners of one process (tests start several orchestrators).
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._context = multiprocessing.get_context("spawn")
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._retry_log = RetryLog(logger, "job runner step")
        self._changed = threading.Condition()
        self._running: _Running | None = None
        self._cancel_requests: set[str] = set()
        self._thread: threading.Thread | None = None
        self._next_recovery = 0.0
        # Attempts in a row whose workers lost the database, by job id. A worker exit with any other
        # status, of any job, clears every entry.
        self._database_losses: dict[str, set[int]] = {}
        self._claim_after = 0.0  # time.monotonic() before which the runner claims no job.

    @property
    def current_job_id(self) -> str:
        """Return the id of the job whose worker runs now, or ""."""
        running = self._running
        return running.job.job_id if running is not None else ""

    def start(self) -> None:
        """Requeue jobs orphaned by a dead orchestrator and start the scheduling thread."""
        self.config.work_root.mkdir(parents=True, exist_ok=True)
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
        self._thread.start()
        logger.info("compression job runner started as %s", self.owner)

    def wake(self) -> None:
        """Look at the queue now instead of at the next poll."""
        self._wake.set()

    def cancel(self, job_id: str, timeout_s: float | None = None) -> bool:
        """End the worker of job_id if this runner runs it, after the store marked the job cancelled.

        Waits until the worker process is gone, at most timeout_s (default: the grace period plus 5 s).
        Returns whether no worker of job_id runs here any more.
        """
        limit = self.config.terminate_grace_s + 5.0 if timeout_s is None else timeout_s
        with self._changed:
            if self.current_job_id != job_id:
                return True
            self._cancel_requests.add(job_id)
            self._wake.set()
            return self._changed.wait_for(lambda: self.current_job_id != job_id, limit)

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop scheduling, end a running worker and put its job back in the queue."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.config.terminate_grace_s + 10.0 if timeout_s is None else timeout_s)
            if self._thread.is_alive():
                logger.error("job runner thread did not stop in time")
        logger.info("compression job runner stopped")

    def recover(self) -> list[str]:
        """Requeue running jobs whose owner is dead or whose heartbeat is older than the lease; return their ids."""
        now = datetime.now(UTC)
        requeued = []
        current = self._running
        for job in self.store.list_jobs(states=[RUNNING]):
            if current is not None and current.job.job_id == job.job_id and current.job.attempt == job.attempt:
                continue
            reason = self._orphan_reason(job, now)
            if reason and self.store.requeue(job.job_id, job.attempt, reason, now):
                logger.warning("requeued job %s (attempt %d): %s", job.job_id, job.attempt, reason)
                requeued.append(job.job_id)
        self._remove_stale_work_dirs()
        self._next_recovery = time.monotonic() + self.config.lease_s / 4
        return requeued

    def _remove_stale_work_dirs(self) -> None:
        """Remove the work directories of attempts that no longer run, such as those of a killed orchestrator.

        A directory is kept while its job runs under that attempt, because another replica sharing the
        data directory may run it. A directory changed after the listing is kept too, because a replica
        may have just claimed its job.
        """
        work_root = self.config.work_root
        if not work_root.is_dir():
            return
        listed_at = time.time()
        running = {f"{job.job_id}-{job.attempt}" for job in self.store.list_jobs(states=[RUNNING])}
        current = self._running
        if current is not None:
            running.add(current.work_dir.name)
        for entry in work_root.iterdir():
            if entry.name in running or not _WORK_DIR_NAME.fullmatch(entry.name) or not entry.is_dir():
                continue
            try:
                if entry.stat().st_mtime >= listed_at - 1.0:
                    continue
            except FileNotFoundError:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            logger.info("removed work directory %s of a compression job attempt that no longer runs", entry)

    def _orphan_reason(self, job: Job, now: datetime) -> str:
        host, pid_text = [*job.owner.split(":"), "", ""][:2]
        if host == socket.gethostname() and pid_text.isdigit():
            pid = int(pid_text)
            if job.owner == self.owner:
                return "this orchestrator no longer runs it"
            if pid != os.getpid() and not _process_exists(pid):
                return f"orchestrator process {pid} that ran it is gone"
        stale_since = now - timedelta(seconds=self.config.lease_s)
        if job.heartbeat_at is None or job.heartbeat_at < stale_since:
            return f"no heartbeat from {job.owner or 'its owner'} for {self.config.lease_s:g} s"
        return ""

    # The scheduling thread.

    def _loop(self) -> None:
        while True:
            try:
                if self._stopping.is_set():
                    self._end_running("stopping")
                    return
                self._step()
                self._retry_log.succeeded()
            except Exception as error:
                self._retry_log.failed(error, self.config.poll_interval_s)
            self._wake.wait(self.config.poll_interval_s)
            self._wake.clear()

    def _step(self) -> None:
        running = self._running
        if running is not None:
            self._supervise(running)
        if self._running is None and not self._stopping.is_set() and time.monotonic() >= self._claim_after:
            job = self.store.claim_next(self.owner, datetime.now(UTC))
            if job is not None:
                self._launch(job)
        if time.monotonic() >= self._next_recovery:
            self.recover()

    def _launch(self, job: Job) -> None:
        work_dir = self.config.work_root / f"{job.job_id}-{job.attempt}"
        args = WorkerArgs(
            db_url=self.config.db_url,
            artifacts_root=str(self.config.artifacts_root),
            work_dir=str(work_dir),
            job_id=job.job_id,
            attempt=job.attempt,
            parent_pid=os.getpid(),
            log_level=self.config.log_level,
            log_format=self.config.log_format,
        )
        process = self._context.Process(target=_worker_entry, args=(args,), name=f"job-{job.job_id}", daemon=False)
        process.start()
        logger.info("job %s attempt %d runs in worker process %s", job.job_id, job.attempt, process.pid)
        with self._changed:
            self._running = _Running(job, process, work_dir, time.monotonic())

    def _supervise(self, running: _Running) -> None:
        job = running.job
        if not running.process.is_alive():
            self._reap(running)
            return
        if job.job_id in self._cancel_requests:
            self._end_running("cancelled")
            return
        if time.monotonic() - running.last_heartbeat >= self.config.heartbeat_interval_s:
            running.last_heartbeat = time.monotonic()
            if not self.store.heartbeat(job.job_id, job.attempt, datetime.now(UTC)):
                state = self.store.get_job(job.job_id).state
                if state in (SUCCEEDED, FAILED):
                    # The worker recorded its own result and is exiting; the next step reaps it.
                    return
                # Cancelled (possibly through another orchestrator) or requeued: the worker's work is void.
                self._end_running("cancelled" if state == CANCELLED else "requeued")

    def _end_running(self, reason: str) -> None:
        running = self._running
        if running is None:
            return
        running.stop_reason = reason
        process = running.process
        if process.is_alive():
            logger.info("terminating worker %s of job %s (%s)", process.pid, running.job.job_id, reason)
            process.terminate()
            process.join(self.config.terminate_grace_s)
            if process.is_alive():
                logger.warning(
                    "worker %s ignored SIGTERM for %.0f s; killing it", process.pid, self.config.terminate_grace_s
                )
                process.kill()
        self._reap(running)

    def _reap(self, running: _Running) -> None:
        process = running.process
        process.join()
        code = process.exitcode
        job = running.job
        now = datetime.now(UTC)
        if running.stop_reason == "stopping":
            if self.store.requeue(job.job_id, job.attempt, "the orchestrator stopped", now):
                logger.info("job %s goes back to the queue: the orchestrator stopped", job.job_id)
        elif running.stop_reason == "" and code == EXIT_DATABASE_UNAVAILABLE:
            self._database_lost(job, now)
        elif running.stop_reason == "" and code not in (0, EXIT_ABANDONED):
            message = f"the worker process exited with status {code}"
            if code is not None and code < 0:
                message = f"the worker process was killed by {signal.Signals(-code).name}"
            if self.store.fail(job.job_id, job.attempt, message + "; see the orchestrator log", now):
                logger.error("job %s failed: %s", job.job_id, message)
        if code != EXIT_DATABASE_UNAVAILABLE:
            self._database_losses.clear()
        shutil.rmtree(running.work_dir, ignore_errors=True)
        with self._changed:
            self._cancel_requests.discard(job.job_id)
            self._running = None
            self._changed.notify_all()
        logger.info("worker of job %s exited with status %s", job.job_id, code)

    def _database_lost(self, job: Job, now: datetime) -> None:
        """Queue the job again after its worker lost the database, or fail it after too many losses in a row.

        Both writes raise DatabaseUnavailable while an outage lasts, and the next step reaps the worker
        again, so each attempt counts once. Each loss doubles the wait before the next claim.
        """
        lost = self._database_losses.setdefault(job.job_id, set())
        lost.add(job.attempt)
        if len(lost) < self.config.max_database_losses:
            if self.store.requeue(job.job_id, job.attempt, "the worker lost the database", now):
                logger.warning("job %s goes back to the queue: its worker lost the database", job.job_id)
            delay_s = min(self.config.poll_interval_s * 2 ** len(lost), self.config.max_claim_delay_s)
            self._claim_after = time.monotonic() + delay_s
            return
        message = (
            f"the workers of {len(lost)} attempts in a row lost the database; check that the database accepts "
            "more connections (PostgreSQL max_connections) and create the job again"
        )
        if self.store.fail(job.job_id, job.attempt, message, now):
            logger.error("job %s failed: %s", job.job_id, message)
        self._database_losses.pop(job.job_id, None)


def _process_exists(pid: int) -> bool:
    """Return whether a live (not zombie) process has this pid on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # The state is the field after the parenthesized command name.
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def start_jobs(state: OrchestratorState) -> JobRunner | None:
    """Give the orchestrator state its job store and a started runner; return the runner.

    Returns None, leaving compression jobs disabled, when the state's store is not the SQL store.
    """
    from edgefleet.orchestrator.jobs.store import SqlJobStore

    engine = getattr(state.store, "engine", None)
    if not isinstance(engine, Engine):
        logger.warning("compression jobs are disabled: the store %s is not an SQL store", type(state.store).__name__)
        return None
    config = state.config
    state.jobs = SqlJobStore(engine)
    runner = JobRunner(
        state.jobs,
        RunnerConfig(
            db_url=config.db_url,
            artifacts_root=config.data_dir / "artifacts",
            work_root=config.data_dir / "jobs",
            log_level=config.log_level,
            log_format=config.log_format,
        ),
    )
    runner.start()
    state.job_runner = runner
    return runner
