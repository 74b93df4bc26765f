"""One error catalog: domain errors carry a gRPC status code and a message that is safe to show."""

from __future__ import annotations

import re

import grpc

# The orchestrator tags each INTERNAL error with a new id ("internal error (id 8b07e1f27bf1)"), so that
# operators can find its traceback in the log.
_INTERNAL_ERROR_ID = re.compile(r"\(id [0-9a-f]+\)")


def internal_error_message(error_id: str) -> str:
    """Return the message of an INTERNAL error whose traceback the orchestrator logged under error_id."""
    return f"internal error (id {error_id}); see the orchestrator log"


def without_error_id(message: str) -> str:
    """Return message with the id of an INTERNAL error masked, so that repeats of one failure compare equal."""
    return _INTERNAL_ERROR_ID.sub("(id ...)", message)


class EdgefleetError(Exception):
    """An expected failure whose message names the bad value and the fix; shown to the caller as is."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(EdgefleetError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid {field}: {message}")
        self.field = field


class NotFound(EdgefleetError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(EdgefleetError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(EdgefleetError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(EdgefleetError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(EdgefleetError):
    code = grpc.StatusCode.UNAVAILABLE


# Start of the message of every call that failed because the orchestrator lost its database, so the
# CLI can tell it from an orchestrator it cannot reach.
DATABASE_UNAVAILABLE_TEXT = "the orchestrator's database is unavailable"


# Process exit codes. systemd's RestartPreventExitStatus= lists the ones where a restart cannot help.
EXIT_OK = 0
EXIT_FAILURE = 1  # Unexpected error; a restart may help.
EXIT_USAGE = 2  # Invalid flags or configuration; fix the configuration first.
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: a service this process needs is unreachable.
EXIT_CONFIG = 78  # EX_CONFIG: a configuration file is missing or malformed.
