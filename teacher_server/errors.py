"""Typed errors the service raises; the interceptor maps each to its gRPC status (message passed on verbatim)."""

from __future__ import annotations


class ServiceError(Exception):
    """Base: `status` is the name of the grpc.StatusCode the client gets; the message must name the problem."""

    status = "INTERNAL"


class InvalidRequestError(ServiceError, ValueError):
    status = "INVALID_ARGUMENT"


class AuthenticationError(ServiceError):
    status = "UNAUTHENTICATED"


class ModelNotFoundError(ServiceError, LookupError):
    status = "NOT_FOUND"


class QuotaExceededError(ServiceError):
    """`details`: google.rpc messages (QuotaFailure, RetryInfo) the interceptor packs into the status;
    `trailing_metadata`: the key's x-ratelimit-* / x-quota-* state (quota_status.py)."""

    status = "RESOURCE_EXHAUSTED"

    def __init__(
        self, message: str, *, details: tuple[object, ...] = (), trailing_metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.details = details
        self.trailing_metadata = trailing_metadata
        self.limit = "quota"  # or "rate_limit": which limit refused (counted per reason, refusals.py)


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
