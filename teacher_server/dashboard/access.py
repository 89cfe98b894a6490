"""Who may read the dashboard: the viewer token or the admin token, as `Authorization: Bearer` or, in a browser, as
an HttpOnly cookie set after `/?token=...` or the login form. `dashboard_public` opens the read views (loopback-only
deployments); with neither token configured and not public, the read views are locked (403, saying how to unlock).

The cookie holds an HMAC of the token, not the token: it opens the read views only, never the admin API.
"""

from __future__ import annotations

import hashlib
import hmac
from html import escape
from typing import Annotated
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from teacher_server.dashboard.deps import get_settings
from teacher_server.settings import ServerSettings

COOKIE = "maskedkd_view"
LOCKED_MESSAGE = (
    "dashboard read views locked: no viewer or admin token configured; set MASKEDKD_VIEWER_TOKEN "
    "(or --viewer-token-file FILE), or start with --dashboard-public on a loopback-only address"
)
_bearer = HTTPBearer(auto_error=False, description="the viewer token or the admin token")


def _tokens(settings: ServerSettings) -> list[str]:
    return [t for t in (settings.viewer_token, settings.admin_token) if t]


def cookie_value(token: str) -> str:
    return hmac.new(token.encode("utf-8"), b"maskedkd-dashboard-view", hashlib.sha256).hexdigest()


def _matches(given: str, settings: ServerSettings, *, as_cookie: bool = False) -> bool:
    ok = False
    for token in _tokens(settings):  # compare against all, so timing does not tell which one matched
        expected = cookie_value(token) if as_cookie else token
        ok |= hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
    return ok


def may_view(request: Request, settings: ServerSettings, credentials: HTTPAuthorizationCredentials | None) -> bool:
    if settings.dashboard_public:
        return True
    if (
        credentials is not None
        and credentials.scheme.lower() == "bearer"
        and _matches(credentials.credentials, settings)
    ):
        return True
    cookie = request.cookies.get(COOKIE)
    return cookie is not None and _matches(cookie, settings, as_cookie=True)


def require_viewer(
    request: Request,
    settings: Annotated[ServerSettings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 without a valid viewer/admin token (header or cookie), 403 when the read views are locked."""
    if may_view(request, settings, credentials):
        return
    if not _tokens(settings):
        raise HTTPException(status.HTTP_403_FORBIDDEN, LOCKED_MESSAGE)
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        "viewer token required: send 'Authorization: Bearer <viewer or admin token>', or open the page with ?token=...",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _login_page(message: str, code: int) -> HTMLResponse:
    return HTMLResponse(
        f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MaskedKD teacher · sign in</title>
<link rel="icon" href="data:,"><link rel="stylesheet" href="static/dashboard.css"></head>
<body><main><h1>MaskedKD teacher</h1><p class="error">{escape(message)}</p>
<form method="post" action="login"><label>viewer or admin token
<input type="password" name="token" autocomplete="current-password" required></label>
<button type="submit">open the dashboard</button></form></main></body></html>""",
        status_code=code,
        headers={"Cache-Control": "no-store"},
    )


def _signed_in(request: Request, token: str, target: str) -> Response:
    response = RedirectResponse(target, status_code=status.HTTP_303_SEE_OTHER)
    response.set_cookie(
        COOKIE, cookie_value(token), httponly=True, samesite="strict", path="/", secure=request.url.scheme == "https"
    )
    return response


def page_or_login(request: Request, settings: ServerSettings, page: str) -> Response:
    """The dashboard page for a viewer; `?token=` signs in (then redirects without it); else the login form."""
    token = request.query_params.get("token")
    if token is not None:
        if not _matches(token, settings):
            return _login_page("wrong token", status.HTTP_401_UNAUTHORIZED)
        rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
        return _signed_in(request, token, "./" + (f"?{rest}" if rest else ""))
    if may_view(request, settings, None):
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})
    if not _tokens(settings):
        return _login_page(LOCKED_MESSAGE, status.HTTP_403_FORBIDDEN)
    return _login_page("sign in with the viewer token (or the admin token)", status.HTTP_401_UNAUTHORIZED)


router = APIRouter(include_in_schema=False)


@router.post("/login")
async def login(request: Request, settings: Annotated[ServerSettings, Depends(get_settings)]) -> Response:
    """The login form: a right token sets the cookie and goes to the page."""
    body = (await request.body())[:4096].decode("utf-8", "replace")
    token = (parse_qs(body).get("token") or [""])[0]
    if not token or not _matches(token, settings):
        return _login_page(
            "wrong token" if _tokens(settings) else LOCKED_MESSAGE,
            status.HTTP_401_UNAUTHORIZED if _tokens(settings) else status.HTTP_403_FORBIDDEN,
        )
    return _signed_in(request, token, "./")
