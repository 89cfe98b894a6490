"""API keys: `mkd_<43 url-safe chars>` secrets, stored only as sha256 hashes, looked up through a short TTL cache."""
from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from teacher_server import ledger
from teacher_server.errors import AuthenticationError
from teacher_server.ledger_billing import KeyLimits, unavailable_on_transient_errors

SECRET_PREFIX = "mkd_"
DISPLAY_PREFIX_CHARS = 12  # stored in clear for display: "mkd_" + 8 random chars
MAX_NAME_CHARS = 200       # the width of api_keys.name


def generate_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)  # 32 random bytes -> 43 url-safe chars


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_api_key(
    sessions: sessionmaker[Session], *, name: str, quota_gflops: float | None = None,
    price_per_gflop: float | None = None, quota_window: str = "lifetime",
    rate_limit_gflops_per_min: float | None = None,
) -> tuple[str, ledger.ApiKey]:
    """Create and store a key; returns (secret, row). The secret exists only in this return value."""
    if not name or not name.strip():
        raise ValueError("a key needs a non-empty name")
    if len(name.strip()) > MAX_NAME_CHARS or "\x00" in name:  # the ledger's column; Postgres enforces both
        raise ValueError(f"a key name has at most {MAX_NAME_CHARS} characters and no NUL character")
    if quota_gflops is not None and quota_gflops < 0:
        raise ValueError("quota_gflops must be >= 0")
    if price_per_gflop is not None and price_per_gflop < 0:
        raise ValueError("price_per_gflop must be >= 0")
    validate_limits(quota_window=quota_window, rate_limit_gflops_per_min=rate_limit_gflops_per_min)
    secret = generate_secret()
    with sessions() as session:
        row = ledger.add_api_key(session, name=name.strip(), key_prefix=secret[:DISPLAY_PREFIX_CHARS],
                                 key_hash=hash_secret(secret), quota_gflops=quota_gflops,
                                 price_per_gflop=price_per_gflop, quota_window=quota_window,
                                 rate_limit_gflops_per_min=rate_limit_gflops_per_min)
    return secret, row


def validate_limits(*, quota_window: str, rate_limit_gflops_per_min: float | None) -> None:
    if quota_window not in ledger.QUOTA_WINDOWS:
        raise ValueError(f"quota window must be one of {', '.join(ledger.QUOTA_WINDOWS)}, not {quota_window!r}")
    if rate_limit_gflops_per_min is not None and not rate_limit_gflops_per_min > 0:
        raise ValueError("rate_limit_gflops_per_min must be > 0")


@dataclass(frozen=True)
class KeyInfo:
    """What a request needs to know about its caller's key (a snapshot, at most `ttl_s` old)."""

    id: int
    name: str
    disabled: bool
    quota_gflops: float | None
    price_per_gflop: float | None
    quota_window: str = "lifetime"
    rate_limit_gflops_per_min: float | None = None

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
            row = ledger.find_api_key_by_hash(session, key_hash=key_hash)
            if row is None:
                return None
            return KeyInfo(row.id, row.name, bool(row.disabled), row.quota_gflops, row.price_per_gflop,
                           row.quota_window, row.rate_limit_gflops_per_min)

    async def authenticate(self, secret: str) -> KeyInfo:
        """The enabled key behind `secret`; `AuthenticationError` for unknown or disabled keys."""
        if not secret.startswith(SECRET_PREFIX):
            raise AuthenticationError("unknown API key")
        key_hash = hash_secret(secret)
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
