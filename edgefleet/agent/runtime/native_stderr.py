"""Capture of what native code writes to file descriptor 2, logged again as one record per line.

LiteRT's C++ code prints lines such as "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
straight to fd 2, which would put plain text into a log that --log-format json promises to keep to
one JSON object a line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import IO, Any, TypeGuard

logger = logging.getLogger(__name__)

# LiteRT (ai-edge-litert 2.3.0) prints this once per process, when the first interpreter that
# applies XNNPACK allocates its tensors. It is routine, so it is logged at debug level.
_XNNPACK_CREATED = re.compile(r"INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.?")

_STDERR_FD = 2


class _Redirect:
    """fd 2 pointed at a temporary file, with the real stderr kept in a duplicate descriptor.

    Log handlers that wrote to fd 2 write to that duplicate until stop(), so records that other
    threads log meanwhile reach the real stderr at once instead of the temporary file.
    """

    def __init__(self) -> None:
        self.tasks: list[str] = []
        _flush_sys_stderr()
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop(), not in this block.
        try:
            self._saved_fd = os.dup(_STDERR_FD)
        except OSError:
            self._file.close()
            raise
        try:
            encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
            self._stream = os.fdopen(
                self._saved_fd, "w", buffering=1, encoding=encoding, errors="backslashreplace", closefd=False
            )
        except (OSError, ValueError):
            os.close(self._saved_fd)
            self._file.close()
            raise
        self._handlers = _handlers_on_fd2()
        self._previous = [handler.setStream(self._stream) for handler in self._handlers]
        try:
            os.dup2(self._file.fileno(), _STDERR_FD)
        except OSError:
            self._restore_handlers()
            self._file.close()
            raise

    def stop(self) -> bytes:
        """Point fd 2 back at the real stderr and return what was written to it meanwhile."""
        _flush_sys_stderr()
        try:
            os.dup2(self._saved_fd, _STDERR_FD)
        finally:
            self._restore_handlers()
        with self._file:
            self._file.seek(0)
            return self._file.read()

    def _restore_handlers(self) -> None:
        for handler, stream in zip(self._handlers, self._previous, strict=True):
            handler.setStream(stream)
        self._stream.close()  # With closefd=False this only flushes.
        os.close(self._saved_fd)


_lock = threading.Lock()
_redirect: _Redirect | None = None
_users = 0


@contextlib.contextmanager
def capture_native_stderr(task: str) -> Iterator[None]:
    """Redirect fd 2 to a temporary file while the block runs, then log each line written there.

    task names the work in the log records, as in "loading model.tflite". The XNNPACK line above is
    logged at debug level and any other line at warning level, so bytes that other threads write to
    fd 2 in that window come out too. Blocks in several threads share one redirection, which ends
    when the last of them ends; its lines are then logged once, naming every task. If the
    redirection cannot be set up, the block runs with fd 2 untouched.
    """
    joined = _join(task)
    try:
        yield
    finally:
        if joined:
            _leave()


def _join(task: str) -> bool:
    global _redirect, _users
    with _lock:
        if _redirect is None:
            try:
                _redirect = _Redirect()
            except (OSError, ValueError) as error:
                logger.debug("not capturing stderr while %s: %s", task, error)
                return False
        _redirect.tasks.append(task)
        _users += 1
        return True


def _leave() -> None:
    global _redirect, _users
    with _lock:
        _users -= 1
        if _users > 0 or _redirect is None:
            return
        redirect, _redirect = _redirect, None
        output = redirect.stop()
    # Logged outside the lock: a redirection that another thread starts now moves the handlers too.
    _log_output(output, redirect.tasks)


def _log_output(output: bytes, tasks: list[str]) -> None:
    during = "; ".join(dict.fromkeys(tasks))
    for raw_line in output.decode("utf-8", errors="backslashreplace").splitlines():
        line = raw_line.rstrip()
        if not line:
            continue
        level = logging.DEBUG if _XNNPACK_CREATED.fullmatch(line) else logging.WARNING
        logger.log(level, "stderr output while %s: %s", during, line)


def _handlers_on_fd2() -> list[logging.StreamHandler[Any]]:
    """Return the stream handlers of all loggers that write to fd 2, such as configure_logging's."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    found: list[logging.StreamHandler[Any]] = []
    for candidate in loggers:
        if not isinstance(candidate, logging.Logger):
            continue  # A logging.PlaceHolder for a logger that was never created.
        for handler in candidate.handlers:
            if _writes_to_fd2(handler) and handler not in found:
                found.append(handler)
    return found


def _writes_to_fd2(handler: logging.Handler) -> TypeGuard[logging.StreamHandler[Any]]:
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    stream: IO[str] = handler.stream
    try:
        return stream.fileno() == _STDERR_FD
    except (AttributeError, OSError, ValueError):  # io.StringIO and pytest's capture have no descriptor.
        return False


def _flush_sys_stderr() -> None:
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stderr.flush()
