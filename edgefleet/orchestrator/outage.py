"""Logging for background loops that retry while the database is unavailable."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from edgefleet.orchestrator.store.engine import DatabaseUnavailable

# How often a loop repeats its warning while the database stays unavailable.
REPEAT_WARNING_S = 60.0


class RetryLog:
    """Logs the failed steps of one background loop that retries on its own.

    A lost database fails every step until it returns, so its outage is logged once as a warning when
    it starts, again every repeat_s with the count of failed steps, and once at info when a step
    succeeds again. Any other error is logged at each step, with its traceback.
    """

    def __init__(
        self,
        logger: logging.Logger,
        action: str,
        *,
        repeat_s: float = REPEAT_WARNING_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.action = action
        self.repeat_s = repeat_s
        self.clock = clock
        self._outage_started: float | None = None
        self._last_warning = 0.0
        self._failures = 0

    def failed(self, error: BaseException, retry_s: float, *, max_retry_s: float | None = None) -> None:
        """Log a failed step that the loop retries after retry_s seconds.

        max_retry_s is the longest delay of a loop that backs off, for the first warning of an outage.
        """
        if not isinstance(error, DatabaseUnavailable):
            self.logger.error("%s failed; retrying in %.1f s", self.action, retry_s, exc_info=error)
            return
        now = self.clock()
        self._failures += 1
        if self._outage_started is None:
            self._outage_started = now
            self._last_warning = now
            if max_retry_s is None:
                self.logger.warning("%s failed: %s; retrying every %.1f s", self.action, error.message, retry_s)
            else:
                self.logger.warning(
                    "%s failed: %s; retrying in %.1f s, then at longer intervals up to %.0f s",
                    self.action,
                    error.message,
                    retry_s,
                    max_retry_s,
                )
        elif now - self._last_warning >= self.repeat_s:
            self._last_warning = now
            self.logger.warning(
                "%s still failing after %.0f s and %d tries: %s",
                self.action,
                now - self._outage_started,
                self._failures,
                error.message,
            )

    def succeeded(self) -> None:
        """Log the end of an outage, if one was logged."""
        if self._outage_started is None:
            return
        self.logger.info(
            "%s works again after %.0f s and %d failed tries",
            self.action,
            self.clock() - self._outage_started,
            self._failures,
        )
        self._outage_started = None
        self._failures = 0
