"""Logging set-up for entry points (one event a line, as text or JSON for journald), and limits for repeated errors."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

_CHATTY_LIBRARIES = ("alembic", "onnx_ir", "onnxscript", "jax", "torchao")

# LogRecord attributes that are not extra fields passed by the caller.
_STANDARD_ATTRIBUTES = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Format each record as one JSON object with the extra fields (device_id, model, ...) kept."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES:
                event[key] = value
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Send logs to stderr as text or JSON lines. Call only from an entry point."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif fmt == "text":
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        raise ValueError(f"invalid log format {fmt!r}; allowed: text, json")
    root = logging.getLogger()
    root.handlers[:] = [handler]
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"invalid log level {level!r}; allowed: debug, info, warning, error")
    root.setLevel(numeric)
    # These libraries log routine steps at INFO: each Alembic plug-in, each ONNX graph rewrite of the
    # PyTorch exporter, JAX's search for TPUs during TFLite export. Their warnings still show.
    for name in _CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


class RepeatedErrors:
    """Logs an error that repeats per key (a model name, say) without flooding the log.

    The first occurrence of a key is logged in full, then one line every `every` occurrences with the
    count so far. Keys are kept for the object's lifetime, so use keys from a bounded set. Safe to call
    from several threads.
    """

    def __init__(self, logger: logging.Logger, every: int = 1000) -> None:
        self._logger = logger
        self._every = every
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def exception(self, key: str, message: str, *args: object) -> None:
        """Log message % args for key from an except block: at error level, the first time with the traceback."""
        count = self._count(key)
        if count == 1:
            self._logger.exception(message, *args)
        elif count % self._every == 0:
            self._logger.error(message + " (%d times so far, logged every %d)", *args, count, self._every)

    def warning(self, key: str, message: str, *args: object) -> None:
        """Log message % args for key at warning level, as described in the class, without a traceback."""
        count = self._count(key)
        if count == 1:
            self._logger.warning(message, *args)
        elif count % self._every == 0:
            self._logger.warning(message + " (%d times so far, logged every %d)", *args, count, self._every)

    def _count(self, key: str) -> int:
        with self._lock:
            count = self._counts[key] = self._counts.get(key, 0) + 1
        return count


@dataclass
class _FailureStreak:
    error: str
    started: float
    warned: float
    failures: int = 1
    failures_since_warning: int = 0


class RetryLog:
    """Logs the failed attempts of an operation that is retried, one streak of failures per key.

    The first failure of a key, and a failure whose error differs from the key's previous one, are
    logged in full at the level given. Identical repeats are logged at debug level, plus a warning at
    most every interval_s that gives the failures since the last warning and the last one in full.
    The first success after failures logs one info line and ends the streak. Keys without a success
    are kept, so use keys from a bounded set. Safe to call from several threads.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._streaks: dict[Hashable, _FailureStreak] = {}
        self._lock = threading.Lock()

    def failed(self, key: Hashable, error: str, message: str, *args: object, level: int = logging.WARNING) -> bool:
        """Record a failure of key and log message % args as described in the class.

        error is compared with the key's previous failure, so it leaves out what changes between
        identical failures, such as a request id. Returns whether the message was logged at level.
        """
        now = self._clock()
        text = message % args if args else message
        with self._lock:
            streak = self._streaks.get(key)
            if streak is None or streak.error != error:
                failures = streak.failures + 1 if streak is not None else 1
                started = streak.started if streak is not None else now
                self._streaks[key] = _FailureStreak(error, started, now, failures)
                self._logger.log(level, "%s", text)
                return True
            streak.failures += 1
            streak.failures_since_warning += 1
            if now - streak.warned < self.interval_s:
                self._logger.debug("%s", text)
                return False
            self._logger.warning(
                "%d more identical failures in the %.0f s since the last warning, %d over %.0f s in all; the last: %s",
                streak.failures_since_warning,
                now - streak.warned,
                streak.failures,
                now - streak.started,
                text,
            )
            streak.warned = now
            streak.failures_since_warning = 0
            return False

    def succeeded(self, key: Hashable, operation: str) -> None:
        """End the key's streak; if it had failures, log at info level that operation succeeded after them."""
        with self._lock:
            streak = self._streaks.pop(key, None)
        if streak is not None:
            self._logger.info(
                "%s succeeded after %d failed attempts over %.0f s",
                operation,
                streak.failures,
                self._clock() - streak.started,
            )


@dataclass
class _LoggedValue:
    value: float
    logged_at: float
    repeats: int = 0


class MeasurementLog:
    """Logs a measured value that repeats per key, such as a device's clock skew, without flooding the log.

    A key's first value is logged at the level given. So is a value that differs from the last value
    logged by more than the tolerance, which is absolute_tolerance or relative_tolerance times the last
    value, whichever is larger, and any value interval_s or more after the key's last line. Other values
    are logged at debug level. Keys are kept for the object's lifetime, so use keys from a bounded set.
    Safe to call from several threads.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        absolute_tolerance: float,
        relative_tolerance: float = 0.0,
        interval_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self.absolute_tolerance = absolute_tolerance
        self.relative_tolerance = relative_tolerance
        self.interval_s = interval_s
        self._clock = clock
        self._values: dict[Hashable, _LoggedValue] = {}
        self._lock = threading.Lock()

    def log(self, key: Hashable, value: float, level: int, message: str, *args: object) -> bool:
        """Log message % args for key's value as the class describes. Returns whether it was logged at level."""
        now = self._clock()
        with self._lock:
            last = self._values.get(key)
            if last is not None and not self._is_new(last, value, now):
                last.repeats += 1
                logged = False
            else:
                self._values[key] = _LoggedValue(value, now)
                logged = True
        if not logged:
            self._logger.debug(message, *args)
        elif last is not None and last.repeats:
            suffix = " (%d more at debug level in the %.0f s since the last such line)"
            self._logger.log(level, message + suffix, *args, last.repeats, now - last.logged_at)
        else:
            self._logger.log(level, message, *args)
        return logged

    def _is_new(self, last: _LoggedValue, value: float, now: float) -> bool:
        tolerance = max(self.absolute_tolerance, self.relative_tolerance * abs(last.value))
        return abs(value - last.value) > tolerance or now - last.logged_at >= self.interval_s


class RootInfoFilter(logging.Filter):
    """Drop and count INFO and DEBUG records logged straight to the root logger; warnings and errors pass.

    onnxruntime's quantizer (1.32) logs with the module-level logging.info: one "Increased scale[...]
    for weight ..." line per channel whose weight scale it raised, about 300 per EfficientNet-Lite0
    job. A filter on the root logger applies only to records created there, not to those of named loggers, so
    this project's own log lines are unaffected.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        self.dropped += 1
        return False

    def take(self) -> int:
        """Return the number of records dropped since the last call."""
        dropped, self.dropped = self.dropped, 0
        return dropped
