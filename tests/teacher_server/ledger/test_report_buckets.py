"""Usage reports put a request in the time bucket of its whole seconds, floored, on SQLite as on Postgres: a request
billed at 23:59:59.9996 UTC belongs to that day (and minute, and hour), not the next. SQLite's strftime rounds the
fraction to the millisecond first, which once moved such a row a minute later on the dashboard."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from postgres_testkit import postgres_server, postgres_url  # noqa: F401 (fixtures)
from sqlalchemy.orm import Session, sessionmaker

from teacher_server.ledger import database, keys, models, report_series

pytestmark = pytest.mark.dtype("none")  # ledger arithmetic only, no tensors

STAMPS = (  # each just before or at a boundary of second, minute, hour and UTC day
    datetime(2026, 12, 5, 23, 59, 59, 999600, tzinfo=UTC),  # rounds up to the next day in SQLite's strftime
    datetime(2026, 12, 5, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2026, 12, 5, 23, 59, 59, 999400, tzinfo=UTC),
    datetime(2026, 12, 6, 0, 0, 0, 0, tzinfo=UTC),
    datetime(2026, 12, 6, 0, 0, 0, 500, tzinfo=UTC),
    datetime(2026, 12, 6, 10, 14, 59, 999700, tzinfo=UTC),
    datetime(2026, 12, 6, 10, 59, 59, 999500, tzinfo=UTC),
)


def _seed(sessions: sessionmaker[Session]) -> None:
    _, key = keys.create_api_key(sessions, name="k")
    with sessions() as session:
        for i, stamp in enumerate(STAMPS):
            gflops = float(2**i)  # each row's own bit: a sum names exactly the rows in it
            session.add(
                models.UsageRecord(
                    api_key_id=key.id,
                    request_id=f"r{i}",
                    model="m",
                    images=1,
                    tokens=1,
                    gflops=gflops,
                    full_gflops=gflops,
                    cost=0.0,
                    price_per_gflop=0.0,
                    currency="USD",
                    latency_ms=1.0,
                    queue_ms=0.0,
                    batch_images=1,
                    created_at=stamp,
                )
            )
        session.commit()


def _expected(width: int) -> dict[int, float]:
    cells: dict[int, float] = defaultdict(float)
    for i, stamp in enumerate(STAMPS):
        cells[int(stamp.timestamp()) // width * width] += float(2**i)
    return dict(cells)


@pytest.fixture(params=["sqlite", "postgres"])
def ledger(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('buckets') / 'ledger.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    sessions = database.open_ledger(url)
    _seed(sessions)
    yield sessions
    sessions.kw["bind"].dispose()


@pytest.mark.parametrize("width", [1, 60, 3600, 86400])
def test_buckets_floor_the_whole_seconds(ledger: sessionmaker[Session], width: int) -> None:
    with ledger() as session:
        cells = report_series.usage_by_bucket(session, width_s=width)
    assert {c.start_epoch: c.gflops for c in cells} == _expected(width)


def test_days_floor_the_whole_seconds(ledger: sessionmaker[Session]) -> None:
    with ledger() as session:
        days = report_series.usage_by_day(session)
    by_day = {d.day: d.gflops for d in days}
    assert by_day == {datetime.fromtimestamp(t, UTC).date(): g for t, g in _expected(86400).items()}
    assert by_day[datetime(2026, 12, 5, tzinfo=UTC).date()] == 1 + 2 + 4  # the three rows before midnight
