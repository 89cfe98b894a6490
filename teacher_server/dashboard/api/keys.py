"""/api/keys: the admin API (list, create, disable/enable, set quota, window, rate limit and price), behind the admin
bearer token. Every change goes through the key service (ledger/keys.py), which checks the values and makes each call
one transaction: a PATCH with one invalid field changes nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, status
from sqlalchemy.orm import Session, sessionmaker

from teacher_server.dashboard.deps import SessionDep, get_sessions, require_admin
from teacher_server.dashboard.schemas import ApiKeyView, CreatedKey, CreateKeyRequest, ErrorMessage, UpdateKeyRequest
from teacher_server.ledger import keys, models

_AUTH_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorMessage, "description": "missing or wrong admin token"},
    403: {"model": ErrorMessage, "description": "no admin token configured on the server"},
}
router = APIRouter(
    prefix="/api/keys", tags=["admin: keys"], dependencies=[Depends(require_admin)], responses=_AUTH_ERRORS
)

NamePath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=200,
        pattern=r"^[^\x00]*$",  # Postgres text holds no NUL
        description="the key's name",
    ),
]
_CHANGE_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorMessage, "description": "an invalid value (nothing changed)"},
    404: {"model": ErrorMessage, "description": "no such key"},
}


@contextmanager
def _as_http_errors() -> Iterator[None]:
    """The key service's refusals as HTTP statuses: 404 no such key, 409 name taken, 400 an invalid value."""
    try:
        yield
    except models.UnknownKeyNameError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except models.DuplicateKeyNameError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from exc


@router.get("", response_model=list[ApiKeyView], summary="List API keys (never their secrets)")
def list_keys(session: SessionDep) -> list[ApiKeyView]:
    return [ApiKeyView.model_validate(k) for k in keys.list_api_keys(session)]


@router.post(
    "",
    response_model=CreatedKey,
    status_code=status.HTTP_201_CREATED,
    responses={400: _CHANGE_ERRORS[400], 409: {"model": ErrorMessage, "description": "name taken"}},
    summary="Create an API key; the secret is in this response only",
)
def create_key(body: CreateKeyRequest, sessions: Annotated[sessionmaker[Session], Depends(get_sessions)]) -> CreatedKey:
    with _as_http_errors():
        secret, row = keys.create_api_key_from(sessions, body)
    return CreatedKey(secret=secret, **ApiKeyView.model_validate(row).model_dump())


@router.patch(
    "/{name}",
    response_model=ApiKeyView,
    responses=_CHANGE_ERRORS,
    summary="Change a key: disabled, quota_gflops, price_per_gflop, quota_window, "
    "rate_limit_gflops_per_min (only the fields sent, all or nothing)",
)
def update_key(name: NamePath, body: UpdateKeyRequest, session: SessionDep) -> ApiKeyView:
    with _as_http_errors():
        key = keys.update_api_key(session, name=name, change=keys.KeyChange(**body.model_dump(exclude_unset=True)))
    return ApiKeyView.model_validate(key)


def _switch(action: str, summary: str) -> Callable[[Callable[..., ApiKeyView]], Callable[..., ApiKeyView]]:
    """The route POST /{name}/<action> of disable and enable: the key as it is now, or 404."""
    return router.post(
        f"/{{name}}/{action}", response_model=ApiKeyView, responses={404: _CHANGE_ERRORS[404]}, summary=summary
    )


def _set_disabled(session: Session, name: str, *, disabled: bool) -> ApiKeyView:
    with _as_http_errors():
        return ApiKeyView.model_validate(keys.set_api_key_disabled(session, name=name, disabled=disabled))


@_switch("disable", "Disable a key (its requests are refused within the server's auth cache TTL)")
def disable_key(name: NamePath, session: SessionDep) -> ApiKeyView:
    return _set_disabled(session, name, disabled=True)


@_switch("enable", "Re-enable a disabled key")
def enable_key(name: NamePath, session: SessionDep) -> ApiKeyView:
    return _set_disabled(session, name, disabled=False)
