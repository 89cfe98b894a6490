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
    status = "RESOURCE_EXHAUSTED"


class ServiceUnavailableError(ServiceError):
    status = "UNAVAILABLE"
