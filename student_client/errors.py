"""Typed client errors with one-line messages, mapped from gRPC status codes."""

from __future__ import annotations

import grpc

from maskedkd.text import first_line


class TeacherError(RuntimeError):
    """Any failed teacher call. `code` is the gRPC status name; str(err) is one line that names the problem."""

    def __init__(self, message: str, *, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code


class TeacherAuthError(TeacherError):
    """Missing, unknown or disabled API key (UNAUTHENTICATED / PERMISSION_DENIED)."""


class TeacherQuotaError(TeacherError):
    """The key is over its FLOP quota (RESOURCE_EXHAUSTED); nothing was billed."""


class TeacherInputError(TeacherError):
    """The request was rejected as malformed (INVALID_ARGUMENT, NOT_FOUND for an unknown model, too large), by the
    teacher or, before sending, by the client's own check of the same rules (then INVALID_ARGUMENT)."""

    def __init__(self, message: str, *, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message, code=code)


class TeacherAnswerError(TeacherError):
    """The teacher answered, but with what cannot be distilled (features of another shape, NaN or inf); a retry would
    get the same answer."""

    def __init__(self, message: str, *, code: str = "DATA_LOSS") -> None:
        super().__init__(message, code=code)


class TeacherUnavailableError(TeacherError):
    """The teacher could not be reached or did not answer in time, after all retries."""


# Errors that a retry or a restart cannot fix: training should stop with the message, not retry.
FATAL_ERRORS: tuple[type[TeacherError], ...] = (
    TeacherAuthError,
    TeacherQuotaError,
    TeacherInputError,
    TeacherAnswerError,
)
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def error_from_rpc(err: grpc.RpcError, target: str, *, attempts: int = 1) -> TeacherError:
    """The typed error for a failed call; the message names the teacher and the server's reason."""
    code: grpc.StatusCode = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = first_line(err.details() if hasattr(err, "details") else err) or code.name.lower()
    name = code.name if code is not None else "UNKNOWN"
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return TeacherAuthError(f"teacher at {target} refused the API key: {details}", code=name)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if "larger than max" in details or "message larger" in details:
            return TeacherInputError(
                f"request too large for teacher at {target}: {details} (use smaller batches or raise "
                "max_message_mb on both sides)",
                code=name,
            )
        return TeacherQuotaError(f"teacher at {target}: quota exhausted: {details}", code=name)
    if code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.FAILED_PRECONDITION,
    ):
        return TeacherInputError(f"teacher at {target} rejected the request: {details}", code=name)
    if code in RETRYABLE_CODES:
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return TeacherUnavailableError(f"teacher at {target} is unavailable{tries}: {details}", code=name)
    return TeacherError(f"teacher at {target} failed ({name}): {details}", code=name)
