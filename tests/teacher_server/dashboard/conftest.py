"""Fixtures of the dashboard tests: the seeded SQLite ledger, the dashboard serving it on 127.0.0.1, and its API
in this process (a FastAPI test client)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from api_testkit import VIEWER
from fastapi.testclient import TestClient
from seed_ledger import ADMIN_TOKEN, DEFAULT_PRICE, VIEWER_TOKEN, SeededLedger, seed_usage

from teacher_server.dashboard import create_app
from teacher_server.dashboard.server import RunningDashboard, start_dashboard_thread
from teacher_server.ledger import database
from teacher_server.settings import ServerSettings


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> SeededLedger:
    path = tmp_path_factory.mktemp("ledger") / "ledger.db"
    url = f"sqlite:///{path}"
    sessions = database.open_ledger(url)
    now = datetime.now(UTC)
    seed_usage(sessions, now=now)
    settings = ServerSettings(
        db=url,
        admin_token=ADMIN_TOKEN,
        viewer_token=VIEWER_TOKEN,
        price_per_gflop=DEFAULT_PRICE,
        currency="USD",
        metrics_port=None,
    )
    return SeededLedger(url=url, path=path, sessions=sessions, settings=settings, now=now)


@pytest.fixture(scope="module")
def dashboard(seeded: SeededLedger) -> Iterator[RunningDashboard]:
    """The dashboard on a free port of 127.0.0.1, with its own engine on the seeded file (as when run alone)."""
    running = start_dashboard_thread(create_app(seeded.settings))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(seeded: SeededLedger) -> TestClient:
    """The API in this process, reading with the viewer token (test_access.py covers reading without it)."""
    return TestClient(create_app(seeded.settings), raise_server_exceptions=False, headers=VIEWER)
