"""The API key is checked before a request message is read, and failed checks are rate-limited.

grpc.aio reads (and deserializes) a unary request before it calls the method's behaviour, so an anonymous caller
could make the server hold a near-limit message per call before its key is looked at. `AuthFirstInterceptor` serves
the keyed methods through request-*streaming* handlers instead: the behaviour starts with no message read, checks
the `authorization` metadata, refuses with UNAUTHENTICATED (the transport then resets the stream, so the client stops
sending), and only then reads the one request and runs the method as before. On the wire nothing changes. A valid
key whose queue is full (`admit`, inference.py) is refused the same way, before its message is read: RESOURCE_EXHAUSTED
with a RetryInfo, nothing billed; so is a call whose deadline the work queued ahead of it already outlasts
(DEADLINE_EXCEEDED with a RetryInfo).

Every unknown key costs a ledger query, so failed checks draw from token buckets, one per peer address and one for
all peers: an empty bucket refuses further unknown keys at once, without a query. Keys that passed recently skip the
buckets (the authenticator's own TTL cache still re-reads them, so a disabled key stops working as before). Calls
that arrive with the same key while its first check is under way wait for that check's answer: one query and one
token, however many workers of a training run connect with a new key at once (each reserving its own token had
refused a burst of more than `per_peer_burst` valid first calls from one host while the ledger was slow).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from teacher_server.errors import AuthenticationError
from teacher_server.ledger.keys import hash_secret
from teacher_server.ledger.refusals import RefusalCounter
from teacher_server.metrics import ServerMetrics
from teacher_server.service.accounting.auth import KeyAuthenticator, KeyInfo, bearer_secret
from teacher_server.service.error_interceptor import ServiceInterceptor, rich_trailing_metadata, status_of

KEYED_METHODS = ("Infer", "InferStream", "GetModelInfo")  # GetModelInfo: the key is optional, a wrong one refused
ACCEPTED_TTL_S = 600.0  # how long a key that passed skips the failure buckets
MAX_TRACKED = 10_000  # peers and accepted keys remembered at most (memory bound)


@dataclass
class TokenBucket:
    rate: float  # tokens refilled per second
    burst: float  # capacity
    tokens: float
    updated: float  # time.monotonic() of the last refill

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def wait_s(self) -> float:
        """Seconds until one token is there (0: now)."""
        return max(0.0, (1.0 - self.tokens) / self.rate)


class FailedAuthLimiter:
    """Token buckets of failed key checks, per peer address and over all peers."""

    def __init__(
        self, *, per_peer_per_s: float, per_peer_burst: int, global_per_s: float, global_burst: float | None = None
    ) -> None:
        self._peer_rate, self._peer_burst = per_peer_per_s, float(per_peer_burst)
        burst = 2.0 * global_per_s if global_burst is None else float(global_burst)  # default: 2 s worth
        self._global = TokenBucket(global_per_s, burst, burst, time.monotonic())
        self._peers: dict[str, TokenBucket] = {}

    def _peer(self, peer: str, now: float) -> TokenBucket:
        bucket = self._peers.get(peer)
        if bucket is None:
            if len(self._peers) >= MAX_TRACKED:  # forget the peers whose buckets are full again
                for name, old in list(self._peers.items()):
                    old.refill(now)
                    if old.tokens >= old.burst:
                        del self._peers[name]
            bucket = self._peers[peer] = TokenBucket(self._peer_rate, self._peer_burst, self._peer_burst, now)
        bucket.refill(now)
        return bucket

    def wait_s(self, peer: str) -> float:
        """0 when `peer` may have an unknown key checked now, else the seconds until it may."""
        now = time.monotonic()
        self._global.refill(now)
        return max(self._peer(peer, now).wait_s(), self._global.wait_s())

    def take(self, peer: str) -> float:
        """Reserve one check for `peer` (0), or the seconds to wait. Reserving before the lookup keeps concurrent
        guesses within the burst; `refund` when the key turned out valid."""
        wait = self.wait_s(peer)
        if wait == 0:
            self._add(peer, -1.0)
        return wait

    def refund(self, peer: str) -> None:
        self._add(peer, 1.0)

    def record_failure(self, peer: str) -> None:
        self._add(peer, -1.0)

    def _add(self, peer: str, tokens: float) -> None:
        now = time.monotonic()
        self._global.refill(now)
        bucket = self._peer(peer, now)
        self._global.tokens = min(self._global.burst, self._global.tokens + tokens)
        bucket.tokens = min(bucket.burst, bucket.tokens + tokens)


class _CheckAbandonedError(Exception):
    """A key's first check ended without an answer about the key; the calls that waited for it check anew."""


def peer_host(peer: str) -> str:
    """'ipv4:1.2.3.4:5678' -> '1.2.3.4', 'ipv6:[::1]:5678' -> '::1'; other forms (unix:...) are kept whole."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]") or rest
    return peer


class AuthFirstInterceptor(ServiceInterceptor):
    """Checks the key of TeacherService calls before their message is read; goes first in the interceptor list."""

    def __init__(
        self,
        auth: KeyAuthenticator,
        limiter: FailedAuthLimiter,
        metrics: ServerMetrics,
        refusals: RefusalCounter | None = None,
        admit: Callable[[KeyInfo, float | None], None] | None = None,
    ) -> None:
        self._auth = auth
        self._admit = admit  # (key, seconds left): raises when the key may not queue more or cannot be served in time
        self._refusals = refusals or RefusalCounter()
        self._limiter = limiter
        self._metrics = metrics
        self._accepted: dict[str, float] = {}  # key hash -> until when it skips the buckets
        self._checking: dict[str, asyncio.Future[KeyInfo]] = {}  # key hash -> its first check, while under way

    async def check(self, metadata: Any, peer: str) -> KeyInfo:
        """The call's key; AuthenticationError unless it is valid."""
        secret = bearer_secret(metadata)
        key_hash = hash_secret(secret)
        while self._accepted.get(key_hash, 0.0) < time.monotonic():
            pending = self._checking.get(key_hash)
            if pending is None:
                return await self._first_check(secret, key_hash, peer_host(peer))
            try:
                return await asyncio.shield(pending)  # the same key's check under way: its answer, no token
            except _CheckAbandonedError:
                continue  # that call went away, or the ledger failed it: check anew
        return await self._auth.authenticate(secret)  # cached: no ledger query; still refuses a disabled key

    async def _first_check(self, secret: str, key_hash: str, host: str) -> KeyInfo:
        wait = self._limiter.take(host)
        if wait > 0:
            raise AuthenticationError(
                f"too many failed API key checks from {host}; try again in {max(wait, 0.1):.1f} s"
            )
        answer: asyncio.Future[KeyInfo] = asyncio.get_running_loop().create_future()
        self._checking[key_hash] = answer
        try:
            key = await self._auth.authenticate(secret)  # a failure keeps the reserved token spent
        except AuthenticationError as exc:
            answer.set_exception(exc)
            raise
        except BaseException:  # e.g. the ledger is unreachable, or the call was cancelled: not the caller's failure
            self._limiter.refund(host)
            answer.set_exception(_CheckAbandonedError())
            raise
        finally:
            del self._checking[key_hash]
            if answer.done():  # failed (it is never cancelled): retrieved, as nobody may be waiting
                answer.exception()
        self._limiter.refund(host)
        answer.set_result(key)
        if len(self._accepted) >= MAX_TRACKED:
            self._accepted.clear()
        self._accepted[key_hash] = time.monotonic() + ACCEPTED_TTL_S
        return key

    async def _refuse_or_pass(self, method: str, context: aio.ServicerContext) -> None:
        metadata = context.invocation_metadata()
        if method == "GetModelInfo" and not any(k.lower() == "authorization" for k, _ in metadata or ()):
            return
        try:
            key = await self.check(metadata, context.peer())
        except Exception as exc:  # noqa: BLE001 - AuthenticationError, or a ledger failure mapped like everywhere else
            code, message = status_of(exc)
            if method != "GetModelInfo":
                self._metrics.count_request(model="", key="", code=code.name)
                self._refusals.count(exc)  # no key known: it is the key that was refused
            await context.abort(code, message)
            return
        if method == "Infer" and self._admit is not None:
            try:
                self._admit(key, context.time_remaining())
            except Exception as exc:  # noqa: BLE001 - Overloaded/DeadlineUnmetError: refused before it is read
                code, message = status_of(exc)
                self._metrics.count_request(model="", key=key.name, code=code.name)
                self._refusals.count(exc, key_id=key.id)
                await context.abort(code, message, trailing_metadata=rich_trailing_metadata(exc, code, message))

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if method not in KEYED_METHODS:
            return handler
        if handler.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._guard_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._guard_stream(method, handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _guard_unary(self, method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def unary(request_iterator: AsyncIterator[Any], context: aio.ServicerContext) -> Any:
            await self._refuse_or_pass(method, context)
            request = await context.read()  # the one message of a unary call (not waiting for the half-close)
            if request is grpc.aio.EOF:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method} takes one request message, got none")
            return await behavior(request, context)

        return unary

    def _guard_stream(
        self, method: str, behavior: Callable[..., AsyncIterator[Any]]
    ) -> Callable[..., AsyncIterator[Any]]:
        async def stream(request_iterator: AsyncIterator[Any], context: aio.ServicerContext) -> AsyncIterator[Any]:
            await self._refuse_or_pass(method, context)
            async for response in behavior(request_iterator, context):
                yield response

        return stream
