"""Who may read the dashboard: the viewer or the admin token (Bearer header, or in a browser the cookie set by
`/?token=` or the login form); locked without tokens unless public. The cookie never opens the admin API."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from seed_ledger import ADMIN_TOKEN, VIEWER_TOKEN, SeededLedger

from teacher_server.dashboard import create_app
from teacher_server.dashboard.access import COOKIE

pytestmark = pytest.mark.dtype("none")  # no model numerics

READ_VIEWS = ("/api/usage/keys", "/api/usage/timeseries", "/api/usage/latency")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def app(seeded: SeededLedger):  # type: ignore[no-untyped-def]
    return create_app(seeded.settings)


@pytest.mark.parametrize("path", READ_VIEWS)
def test_read_views_need_the_viewer_or_the_admin_token(app, path: str) -> None:  # type: ignore[no-untyped-def]
    client = TestClient(app)
    for headers in ({}, bearer("wrong"), {"Authorization": f"Basic {VIEWER_TOKEN}"}):
        response = client.get(path, headers=headers)
        assert response.status_code == 401 and "viewer token required" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"
    assert client.get(path, headers=bearer(VIEWER_TOKEN)).status_code == 200
    assert client.get(path, headers=bearer(ADMIN_TOKEN)).status_code == 200


def test_the_viewer_token_does_not_open_the_admin_api(app) -> None:  # type: ignore[no-untyped-def]
    client = TestClient(app)
    assert client.get("/api/keys", headers=bearer(VIEWER_TOKEN)).status_code == 401
    assert client.get("/api/keys", headers=bearer(ADMIN_TOKEN)).status_code == 200


def test_browser_sign_in_by_link_sets_an_http_only_cookie(app) -> None:  # type: ignore[no-untyped-def]
    client = TestClient(app, follow_redirects=False)
    page = client.get("/")
    assert page.status_code == 401 and 'action="login"' in page.text and VIEWER_TOKEN not in page.text
    assert client.get("/?token=wrong").status_code == 401 and COOKIE not in client.cookies
    signed = client.get("/", params={"token": VIEWER_TOKEN, "bucket": "hour"})
    assert signed.status_code == 303 and signed.headers["location"] == "./?bucket=hour"  # the token leaves the URL
    set_cookie = signed.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie
    assert client.cookies[COOKIE] and VIEWER_TOKEN not in client.cookies[COOKIE]
    assert client.get("/").status_code == 200 and "body data-state" in client.get("/").text
    assert client.get("/api/usage/keys").status_code == 200  # the page's own fetches carry the cookie
    assert client.get("/api/keys").status_code == 401  # ... which is no admin credential
    client.cookies.clear()
    client.cookies.set(COOKIE, "0" * 64)
    assert client.get("/api/usage/keys").status_code == 401


def test_browser_sign_in_by_form(app) -> None:  # type: ignore[no-untyped-def]
    client = TestClient(app, follow_redirects=False)
    assert client.post("/login", data={"token": "wrong"}).status_code == 401
    signed = client.post("/login", data={"token": ADMIN_TOKEN})
    assert signed.status_code == 303 and signed.headers["location"] == "./"
    assert client.get("/api/usage/latency").status_code == 200


def test_without_tokens_the_read_views_are_locked_unless_public(seeded: SeededLedger) -> None:
    locked = TestClient(create_app(seeded.settings.model_copy(update={"admin_token": None, "viewer_token": None})))
    response = locked.get("/api/usage/keys")
    assert response.status_code == 403 and "MASKEDKD_VIEWER_TOKEN" in response.json()["detail"]
    assert locked.get("/").status_code == 403 and "--dashboard-public" in locked.get("/").text
    public = TestClient(create_app(seeded.settings.model_copy(update={"dashboard_public": True})))
    assert public.get("/api/usage/keys").status_code == 200 and public.get("/").status_code == 200
    assert public.get("/api/keys").status_code == 401  # public read views, admin API still behind its token
    assert locked.get("/healthz").status_code == 200 and locked.get("/static/dashboard.css").status_code == 200
