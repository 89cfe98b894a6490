"""The dashboard application: JSON API under /api, the page at /, vendored static files at /static."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from teacher_server.dashboard import access
from teacher_server.dashboard.api import keys, usage
from teacher_server.dashboard.deps import SessionDep
from teacher_server.dashboard.schemas import ErrorMessage, Health
from teacher_server.ledger import database
from teacher_server.settings import ServerSettings

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
PAGE = HERE / "templates" / "index.html"

DESCRIPTION = """Usage and billing of a MaskedKD teacher server, read from its ledger (the same database).

* `/api/usage/...`: read-only totals per API key (costs and prices as billed, refused calls), time series per key and
  minute/hour/day, usage and refusals per UTC day (`/api/usage/daily`, CSV at `/api/usage/daily.csv`), recent latency
  and batch sizes, with `Authorization: Bearer <viewer or admin token>` (`MASKEDKD_VIEWER_TOKEN` /
  `--viewer-token-file`); in a browser, open `/?token=...` once (or sign in with the form): an HttpOnly cookie then
  carries the read access.
* `/api/keys...`: admin operations (create, disable/enable, quota and price), with `Authorization: Bearer <admin
  token>`; the token comes from `MASKEDKD_ADMIN_TOKEN` or `--admin-token-file` (without one, admin calls answer 403).

GFLOPs are real FLOPs (2 per multiply-add); `full_gflops` is what the unmasked teacher would have cost.
"""


def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN/inf (which JSON cannot carry) become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, but also when the rejected input holds NaN (`{"quota_gflops": NaN}` would otherwise be a 500)."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(
        {"detail": _finite(jsonable_encoder(exc.errors()))}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT
    )


def create_app(settings: ServerSettings, *, sessions: sessionmaker[Session] | None = None) -> FastAPI:
    """The dashboard for the ledger at `settings.db` (or the given session factory, e.g. the server's own)."""
    # docs_url/redoc_url off: FastAPI's own pages load their scripts from a CDN; /docs below uses vendored ones
    app = FastAPI(
        title="MaskedKD teacher dashboard",
        version="1",
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        responses={422: {"description": "invalid parameters"}},
    )
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.state.settings = settings
    app.state.sessions = sessions if sessions is not None else database.open_ledger(settings.db)
    app.include_router(usage.router)
    app.include_router(keys.router)
    app.include_router(access.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    page = PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index(request: Request) -> Response:
        return access.page_or_login(request, settings, page)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def api_docs() -> Response:
        """Swagger UI from /static (works offline); relative URLs, as the page's, for a reverse proxy's prefix."""
        return get_swagger_ui_html(
            openapi_url="openapi.json",
            title="MaskedKD teacher dashboard: API",
            swagger_js_url="static/swagger-ui-bundle.js",
            swagger_css_url="static/swagger-ui.css",
            swagger_favicon_url="data:,",
        )

    @app.get(
        "/healthz",
        response_model=Health,
        tags=["health"],
        responses={503: {"model": ErrorMessage}},
        summary="Liveness and ledger reachability",
    )
    def healthz(session: SessionDep) -> Health:
        try:
            session.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, f"ledger unreachable: {exc.__class__.__name__}"
            ) from exc
        return Health(status="ok", database=session.get_bind().dialect.name)

    return app
