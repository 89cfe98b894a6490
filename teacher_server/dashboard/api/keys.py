"""/api/keys: the admin API (list, create, disable/enable, set quota and price), behind the admin bearer token."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, status
from sqlalchemy.orm import Session, sessionmaker

from teacher_server.dashboard.deps import SessionDep, get_sessions, require_admin
from teacher_server.dashboard.schemas import (
    CreatedKey,
    CreateKeyRequest,
    ErrorMessage,
    KeyInfo,
    UpdateKeyRequest,
)
from teacher_server.ledger import keys, models

_AUTH_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorMessage, "description": "missing or wrong admin token"},
    403: {"model": ErrorMessage, "description": "no admin token configured on the server"},
}
router = APIRouter(prefix="/api/keys", tags=["admin: keys"], dependencies=[Depends(require_admin)],
                   responses=_AUTH_ERRORS)

NamePath = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[^\x00]*$",  # Postgres text holds no NUL
                               description="the key's name")]
_NOT_FOUND: dict[int | str, dict[str, object]] = {404: {"model": ErrorMessage, "description": "no such key"}}


def _existing(session: Session, name: str) -> models.ApiKey:
    key = keys.find_api_key_by_name(session, name=name)
    if key is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no API key named {name!r}")
    return key


@router.get("", response_model=list[KeyInfo], summary="List API keys (never their secrets)")
def list_keys(session: SessionDep) -> list[KeyInfo]:
    return [KeyInfo.model_validate(k) for k in keys.list_api_keys(session)]


@router.post("", response_model=CreatedKey, status_code=status.HTTP_201_CREATED,
             responses={409: {"model": ErrorMessage, "description": "name taken"}},
             summary="Create an API key; the secret is in this response only")
def create_key(body: CreateKeyRequest,
               sessions: Annotated[sessionmaker[Session], Depends(get_sessions)]) -> CreatedKey:
    try:
        secret, row = keys.create_api_key(sessions, name=body.name, quota_gflops=body.quota_gflops,
                                          price_per_gflop=body.price_per_gflop, quota_window=body.quota_window,
                                          rate_limit_gflops_per_min=body.rate_limit_gflops_per_min)
    except models.DuplicateKeyNameError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from exc
    return CreatedKey(secret=secret, **KeyInfo.model_validate(row).model_dump())


@router.patch("/{name}", response_model=KeyInfo, responses=_NOT_FOUND,
              summary="Change a key: disabled, quota_gflops, price_per_gflop, quota_window, "
                      "rate_limit_gflops_per_min (only the fields sent)")
def update_key(name: NamePath, body: UpdateKeyRequest, session: SessionDep) -> KeyInfo:
    key = _existing(session, name)
    sent = body.model_fields_set
    if "disabled" in sent:
        if body.disabled is None:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "`disabled` must be true or false, not null")
        key = keys.set_api_key_disabled(session, name=name, disabled=body.disabled)
    if sent & {"quota_gflops", "price_per_gflop"}:
        key = keys.set_api_key_limits(
            session, name=name,
            quota_gflops=body.quota_gflops if "quota_gflops" in sent else key.quota_gflops,
            price_per_gflop=body.price_per_gflop if "price_per_gflop" in sent else key.price_per_gflop,
        )
    if sent & {"quota_window", "rate_limit_gflops_per_min"}:
        if "quota_window" in sent and body.quota_window is None:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "`quota_window` must be lifetime, month or day")
        keys.set_key_limits(
            session, name=name, quota_gflops=key.quota_gflops, quota_window=body.quota_window or key.quota_window,
            rate_limit_gflops_per_min=(body.rate_limit_gflops_per_min if "rate_limit_gflops_per_min" in sent
                                       else key.rate_limit_gflops_per_min))
        key = _existing(session, name)
    return KeyInfo.model_validate(key)


@router.post("/{name}/disable", response_model=KeyInfo, responses=_NOT_FOUND,
             summary="Disable a key (its requests are refused within the server's auth cache TTL)")
def disable_key(name: NamePath, session: SessionDep) -> KeyInfo:
    _existing(session, name)
    return KeyInfo.model_validate(keys.set_api_key_disabled(session, name=name, disabled=True))


@router.post("/{name}/enable", response_model=KeyInfo, responses=_NOT_FOUND, summary="Re-enable a disabled key")
def enable_key(name: NamePath, session: SessionDep) -> KeyInfo:
    _existing(session, name)
    return KeyInfo.model_validate(keys.set_api_key_disabled(session, name=name, disabled=False))
