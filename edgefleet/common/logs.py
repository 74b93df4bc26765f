"""Logging set-up for entry points (one event a line, as text or JSON for journald), and a limit for repeated errors."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
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
