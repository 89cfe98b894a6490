"""Typed errors the service raises; the interceptor maps each to its gRPC status (message passed on verbatim)."""

from __future__ import annotations

from google.protobuf import duration_pb2
from google.rpc import error_details_pb2


class ServiceError(Exception):
    """Base: `status` is the name of the grpc.StatusCode the client gets; the message must name the problem."""

    status = "INTERNAL"


class InvalidRequestError(ServiceError, ValueError):
    status = "INVALID_ARGUMENT"


class AuthenticationError(ServiceError):
    status = "UNAUTHENTICATED"


class PermissionDeniedError(ServiceError):
    status = "PERMISSION_DENIED"


class ModelNotFoundError(ServiceError, LookupError):
    status = "NOT_FOUND"


class RefusalWithDetailsError(ServiceError):
    """A refusal whose status carries google.rpc `details` (QuotaFailure, RetryInfo), packed by the interceptor, and
    `trailing_metadata`; `reason` is what the refusal counters file it under (ledger/refusals.py)."""

    reason = "invalid"

    def __init__(
        self, message: str, *, details: tuple[object, ...] = (), trailing_metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.details = details
        self.trailing_metadata = trailing_metadata


class QuotaExceededError(RefusalWithDetailsError):
    """The key's quota window or rate limit has no room (`reason` says which; quota_status.py)."""

    status = "RESOURCE_EXHAUSTED"
    reason = "quota"  # or "rate_limit"


class OverloadedError(RefusalWithDetailsError):
    """The queue of the key or of the server is full: refused before the request was decoded, with a RetryInfo."""

    status = "RESOURCE_EXHAUSTED"
    reason = "overload"


MIN_RETRY_S = 0.05  # the shortest RetryInfo of a refusal for load (overload, deadline)


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    """The google.rpc detail telling a refused caller when to try again (the client library waits that long)."""
    seconds = max(0.0, seconds)
    return error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))
    )


class DeadlineUnmetError(RefusalWithDetailsError):
    """The request's deadline would pass before its answer could: refused or dropped unrun, nothing billed."""

    status = "DEADLINE_EXCEEDED"
    reason = "deadline"

    @classmethod
    def dropped_unrun(cls, retry_s: float) -> DeadlineUnmetError:
        """A queued request dropped as its batch formed or its forward started: its deadline would pass first."""
        return cls(
            "the request's deadline would pass before its forward ends; not run, nothing billed: retry with a later "
            "deadline or after a while",
            details=(retry_info(max(MIN_RETRY_S, retry_s)),),
        )


class ServiceUnavailableError(ServiceError):
    status = "UNAVAILABLE"


class RequestIdReusedError(ServiceError):
    """A request_id already billed (or in flight) for other inputs: refused, nothing billed."""

    status = "ALREADY_EXISTS"


class ReplayExpiredError(ServiceError):
    """A request_id billed before whose replay payload is gone (retention): refused, never billed twice."""

    status = "FAILED_PRECONDITION"


class LedgerUnavailableError(ServiceError):
    """The ledger could not commit right now (lock timeout, disk full, lost connection): nothing billed, retry."""

    status = "UNAVAILABLE"
