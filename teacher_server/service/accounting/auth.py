"""Who is calling: the `authorization: Bearer <key>` secret looked up (by its sha256) through a short TTL cache."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from teacher_server.errors import AuthenticationError
from teacher_server.ledger import keys
from teacher_server.ledger.billing import unavailable_on_transient_errors
from teacher_server.ledger.quota_holds import KeyLimits
from teacher_server.ledger.quota_windows import QuotaWindow


@dataclass(frozen=True)
class KeyInfo:
    """What a request needs to know about its caller's key (a snapshot, at most `ttl_s` old)."""

    id: int
    name: str
    disabled: bool
    quota_gflops: float | None
    price_per_gflop: float | None
    quota_window: QuotaWindow = "lifetime"
    rate_limit_gflops_per_min: float | None = None
    weight: float = 1.0  # fair share against other keys with queued work
    priority: str = "standard"  # interactive | standard | batch

    @property
    def limits(self) -> KeyLimits:
        return KeyLimits(self.quota_gflops, self.quota_window, self.rate_limit_gflops_per_min)


def bearer_secret(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The secret from `authorization: Bearer <key>` call metadata; `AuthenticationError` when absent or malformed."""
    for name, value in metadata or ():
        if name.lower() != "authorization":
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("malformed authorization metadata: expected 'Bearer <api key>'")
        return token.strip()
    raise AuthenticationError("missing API key: send call metadata 'authorization: Bearer <api key>'")


class KeyAuthenticator:
    """Resolves secrets to `KeyInfo`. Known keys (enabled or disabled) are cached for `ttl_s`, so a key disabled in
    the ledger (by the CLI or the dashboard, in any process) is refused at most `ttl_s` later. Unknown secrets are
    never cached, so a freshly created key works at once."""

    def __init__(self, sessions: sessionmaker[Session], *, ttl_s: float = 2.0) -> None:
        self._sessions = sessions
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[float, KeyInfo]] = {}  # key_hash -> (expires at, info)

    def invalidate(self) -> None:
        self._cache.clear()

    def _load(self, key_hash: str) -> KeyInfo | None:
        with unavailable_on_transient_errors(), self._sessions() as session:
            row = keys.find_api_key_by_hash(session, key_hash=key_hash)
            if row is None:
                return None
            return KeyInfo(
                row.id,
                row.name,
                bool(row.disabled),
                row.quota_gflops,
                row.price_per_gflop,
                row.quota_window,
                row.rate_limit_gflops_per_min,
                row.weight,
                row.priority,
            )

    async def authenticate(self, secret: str) -> KeyInfo:
        """The enabled key behind `secret`; `AuthenticationError` for unknown or disabled keys."""
        if not secret.startswith(keys.SECRET_PREFIX):
            raise AuthenticationError("unknown API key")
        key_hash = keys.hash_secret(secret)
        now = time.monotonic()
        cached = self._cache.get(key_hash)
        if cached is not None and cached[0] > now:
            info = cached[1]
        else:
            loaded = await asyncio.to_thread(self._load, key_hash)
            if loaded is None:
                self._cache.pop(key_hash, None)
                raise AuthenticationError("unknown API key")
            info = loaded
            if len(self._cache) > 10_000:  # bound memory; entries are cheap to reload
                self._cache.clear()
            self._cache[key_hash] = (now + self._ttl_s, info)
        if info.disabled:
            raise AuthenticationError(f"API key {info.name!r} is disabled")
        return info
