"""Metric retention: merge old metric windows into coarser ones, delete the oldest, reclaim the space."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from edgefleet.orchestrator.config import MAX_METRICS_WINDOW_S, OrchestratorConfig
from edgefleet.orchestrator.outage import RetryLog
from edgefleet.orchestrator.store.base import Store
from edgefleet.orchestrator.store.engine import DatabaseUnavailable

log = logging.getLogger(__name__)

# The first run waits this long after start-up (or one interval, if shorter), so a restart loop
# does not run retention again and again.
FIRST_RUN_DELAY_S = 60.0
# A run that failed on an unavailable database is retried after this delay, doubled after each
# further failure up to the maximum, so retention resumes soon after a short outage.
UNAVAILABLE_RETRY_S = 5.0
UNAVAILABLE_MAX_RETRY_S = 300.0


@dataclass(frozen=True)
class RetentionPolicy:
    """Ages are measured on the orchestrator's clock (receive time), so a device clock cannot defeat them."""

    downsample_after_s: float = 86400.0
    bucket_seconds: int = 300
    delete_after_s: float = 30 * 86400.0

    def __post_init__(self) -> None:
        if self.downsample_after_s <= 0:
            raise ValueError(f"metrics_downsample_after_s must be positive, got {self.downsample_after_s}")
        if self.delete_after_s < self.downsample_after_s:
            raise ValueError(
                f"metrics_delete_after_s ({self.delete_after_s:g}) must be at least metrics_downsample_after_s "
                f"({self.downsample_after_s:g})"
            )
        if not 1 <= self.bucket_seconds <= MAX_METRICS_WINDOW_S:
            raise ValueError(
                f"metrics_downsample_window_s must be 1 to {MAX_METRICS_WINDOW_S} seconds, got {self.bucket_seconds}"
            )

    @classmethod
    def from_config(cls, config: OrchestratorConfig) -> RetentionPolicy:
        """Build the policy from config; raise ValueError for inconsistent ages or window length."""
        return cls(
            downsample_after_s=config.metrics_downsample_after_s,
            bucket_seconds=config.metrics_downsample_window_s,
            delete_after_s=config.metrics_delete_after_s,
        )


@dataclass(frozen=True)
class RetentionResult:
    merged_windows: int  # Windows replaced by merged ones.
    written_windows: int  # Merged windows written.
    deleted_windows: int
    duration_s: float


def apply_retention(
    store: Store, policy: RetentionPolicy, now: datetime | None = None, *, reclaim: bool = True
) -> RetentionResult:
    """Delete windows past delete_after_s, merge those past downsample_after_s, then reclaim the space.

    Deleting first keeps the merge from working on rows that are about to go. Raises the store's
    errors. A run that fails part-way keeps the transactions it committed, and the next run
    continues from there, because both steps only touch rows that are still old enough.
    """
    started = time.monotonic()
    now = now or datetime.now(UTC)
    deleted = store.delete_metric_windows(received_before=now - timedelta(seconds=policy.delete_after_s))
    merged, written = store.downsample_metric_windows(
        received_before=now - timedelta(seconds=policy.downsample_after_s), bucket_seconds=policy.bucket_seconds
    )
    if reclaim and (deleted or merged):
        store.reclaim_space()
    result = RetentionResult(
        merged_windows=merged,
        written_windows=written,
        deleted_windows=deleted,
        duration_s=time.monotonic() - started,
    )
    log.info(
        "metric retention: merged %d windows into %d, deleted %d, in %.1f s",
        merged,
        written,
        deleted,
        result.duration_s,
    )
    return result


def unavailable_retry_s(failures: int, interval_s: float) -> float:
    """Return the delay after the given count of consecutive runs that failed on an unavailable database.

    The delay doubles from UNAVAILABLE_RETRY_S up to UNAVAILABLE_MAX_RETRY_S and never exceeds interval_s.
    """
    delay = UNAVAILABLE_RETRY_S * 2 ** min(max(failures - 1, 0), 16)
    return min(delay, UNAVAILABLE_MAX_RETRY_S, interval_s)


async def retention_forever(
    store: Store,
    policy: RetentionPolicy,
    interval_s: float,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Run apply_retention every interval_s seconds in a worker thread until cancelled; log failures.

    A run that fails because the database is unavailable is retried after a short delay that grows
    with each failure (unavailable_retry_s), and the outage is logged once as a warning. Any other
    error is logged with its traceback and retried after interval_s.
    """
    await sleep(min(FIRST_RUN_DELAY_S, interval_s))
    retry_log = RetryLog(log, "metric retention")
    failures = 0
    while True:
        try:
            await asyncio.to_thread(apply_retention, store, policy)
        except DatabaseUnavailable as error:
            failures += 1
            delay = unavailable_retry_s(failures, interval_s)
            retry_log.failed(error, delay, max_retry_s=unavailable_retry_s(10_000, interval_s))
        except Exception as error:
            failures = 0
            delay = interval_s
            retry_log.failed(error, delay)
        else:
            failures = 0
            delay = interval_s
            retry_log.succeeded()
        await sleep(delay)
