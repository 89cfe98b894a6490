"""FastAPI dependencies shared by the routers: settings, a ledger session, the admin check."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from teacher_server.settings import ServerSettings

ADMIN_DISABLED_MESSAGE = (
    "admin API disabled: no admin token configured; set the environment variable MASKEDKD_ADMIN_TOKEN "
    "or start the dashboard with --admin-token-file FILE"
)

_bearer = HTTPBearer(auto_error=False, description="the admin token (settings.admin_token)")


def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def get_sessions(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessions


def get_session(sessions: Annotated[sessionmaker[Session], Depends(get_sessions)]) -> Iterator[Session]:
    with sessions() as session:
        yield session


def require_admin(
    settings: Annotated[ServerSettings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """403 when no admin token is configured, 401 when the request's bearer token is missing or wrong."""
    expected = settings.admin_token
    if not expected:
        raise HTTPException(status.HTTP_403_FORBIDDEN, ADMIN_DISABLED_MESSAGE)
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "admin token required: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(credentials.credentials.encode("utf-8"), expected.encode("utf-8")):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "wrong admin token", headers={"WWW-Authenticate": "Bearer"})


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
