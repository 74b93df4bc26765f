"""One error catalog: domain errors carry a gRPC status code and a message that is safe to show."""

from __future__ import annotations

import grpc


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
