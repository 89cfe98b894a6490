"""The dashboard page in real headless Chromium (Debian's /usr/bin/chromium driven by Playwright): the numbers it shows
and the data its charts draw equal the ledger, computed independently with SQL; it loads nothing from outside; and a
screenshot is saved (docs/dashboard.png outside CI, the test's tmp dir in CI or with MASKEDKD_SCREENSHOT=PATH)."""

from __future__ import annotations

import os
import re
import sqlite3
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from seed_ledger import VIEWER_TOKEN, SeededLedger

from teacher_server.dashboard.server import RunningDashboard

pytestmark = pytest.mark.dtype("none")  # no model numerics

CHROMIUM = Path("/usr/bin/chromium")
IN_CI = os.environ.get("CI", "").lower() == "true"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parents[3]

if not CHROMIUM.exists():
    if IN_CI:
        pytest.fail(
            f"{CHROMIUM} is missing in CI: `make test` installs Debian's chromium (apt-get install -y "
            "chromium) when it runs as root",
            pytrace=False,
        )
    pytest.skip(
        f"{CHROMIUM} not installed (apt-get install -y chromium); CI installs it and runs this test",
        allow_module_level=True,
    )

import itertools  # noqa: E402 - after the skip

from playwright.sync_api import Browser, Page, sync_playwright  # noqa: E402 - after the skip


def rows(db: Path, query: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as con:
        return con.execute(query).fetchall()


def shown(text: str) -> tuple[float, float]:
    """A number as the page prints it ("USD 1,234.567891", "51.7 %", "12,345") -> (value, half its last digit)."""
    match = re.search(r"-?[\d,]+(?:\.(\d+))?", text)
    assert match, f"no number in {text!r}"
    decimals = len(match.group(1) or "")
    return float(match.group(0).replace(",", "")), 0.5 * 10.0**-decimals + 1e-12


def assert_shows(text: str, expected: float) -> None:
    value, tolerance = shown(text)
    assert abs(value - expected) <= tolerance, f"page shows {text!r}, ledger says {expected}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser: Browser, dashboard: RunningDashboard) -> Iterator[Page]:
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
    page.requested = []  # type: ignore[attr-defined]
    page.errors = []  # type: ignore[attr-defined]
    page.on("request", lambda r: page.requested.append(r.url))  # type: ignore[attr-defined]
    page.on("console", lambda m: m.type == "error" and page.errors.append(m.text))  # type: ignore[attr-defined]
    page.on("pageerror", lambda e: page.errors.append(str(e)))  # type: ignore[attr-defined]
    page.goto(dashboard.url + "/?token=" + VIEWER_TOKEN, wait_until="load")  # signs in: an HttpOnly cookie
    page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    assert page.url == dashboard.url + "/" and page.evaluate("document.cookie") == ""  # token gone, cookie hidden
    yield page
    page.close()


def test_page_totals_and_key_table_equal_the_ledger(
    page: Page, seeded: SeededLedger, dashboard: RunningDashboard
) -> None:
    per_key = {
        r[0]: r[1:]
        for r in rows(
            seeded.path,
            """
        SELECT k.name, COUNT(u.id), COALESCE(SUM(u.images), 0), COALESCE(SUM(u.gflops), 0),
               COALESCE(SUM(u.full_gflops), 0), COALESCE(SUM(u.cost), 0), k.disabled
        FROM api_keys k LEFT JOIN usage u ON u.api_key_id = k.id GROUP BY k.name""",
        )
    }
    requests, images, gflops, full, cost = (sum(v[i] for v in per_key.values()) for i in range(5))
    total = {
        f: page.inner_text(f"[data-total={f}]")
        for f in ("requests", "images", "gflops", "full_gflops", "saving_pct", "cost", "refused")
    }
    assert_shows(total["requests"], requests)
    assert_shows(total["images"], images)
    assert_shows(total["gflops"], gflops)
    assert_shows(total["full_gflops"], full)
    assert_shows(total["saving_pct"], 100 * (full - gflops) / full)
    assert_shows(total["cost"], cost)
    assert total["cost"].startswith("USD ")
    probes = {
        r[0]: r[1:]
        for r in rows(
            seeded.path,
            """
        SELECT k.name, COALESCE(SUM(u.gflops), 0), COALESCE(SUM(u.cost), 0) FROM api_keys k
        LEFT JOIN usage u ON u.api_key_id = k.id AND u.purpose = 'probe' GROUP BY k.name""",
        )
    }
    probe_gflops, probe_cost = (sum(v[i] for v in probes.values()) for i in range(2))
    assert probe_gflops > 0
    assert_shows(page.inner_text("[data-total=probe_gflops]"), probe_gflops)
    share, paid = page.inner_text("[data-total=probe_cost]").split("·")  # "7.4 % of GFLOPs · USD 0.064631"
    assert_shows(share, 100 * probe_gflops / gflops)
    assert paid.strip().startswith("USD ")
    assert_shows(paid, probe_cost)

    assert page.eval_on_selector_all("#keys tbody tr", "rs => rs.map(r => r.dataset.key)") == sorted(per_key)
    for name, (n, imgs, used, full_k, cost_k, disabled) in per_key.items():

        def cell(field: str) -> str:
            return page.inner_text(f'#keys tr[data-key="{name}"] td[data-field="{field}"]')

        assert_shows(cell("requests"), n)
        assert_shows(cell("images"), imgs)
        assert_shows(cell("gflops"), used)
        assert_shows(cell("full_gflops"), full_k)
        assert_shows(cell("saving_pct"), 100 * (full_k - used) / full_k if full_k else 0.0)
        assert_shows(cell("cost"), cost_k)
        probe_cell = page.inner_text(f'#keys tr[data-key="{name}"] [data-field="probe_gflops"]')  # "6,755.68 (4.0 %)"
        assert_shows(probe_cell, probes[name][0])
        assert_shows(probe_cell.split("(")[1], 100 * probes[name][0] / used if used else 0.0)
        assert_shows(page.inner_text(f'#keys tr[data-key="{name}"] [data-field="probe_cost"]'), probes[name][1])
        assert cell("status") == ("disabled" if disabled else "active")

    latency = sorted(r[0] for r in rows(seeded.path, "SELECT latency_ms FROM usage ORDER BY id DESC LIMIT 1000"))
    overall = '#latency tr[data-latency-key="*"]'
    assert_shows(page.inner_text(f'{overall} td[data-field="requests"]'), len(latency))
    assert_shows(page.inner_text(f'{overall} td[data-field="latency_ms_p50"]'), float(np.percentile(latency, 50)))
    assert_shows(page.inner_text(f'{overall} td[data-field="latency_ms_p95"]'), float(np.percentile(latency, 95)))

    refused = dict(
        ((r[0] or ""), r[1])
        for r in rows(
            seeded.path,
            """
        SELECT k.name, SUM(r.count) FROM refusals r LEFT JOIN api_keys k ON k.id = r.api_key_id GROUP BY k.name""",
        )
    )
    assert_shows(total["refused"], sum(refused.values()))
    for name in per_key:
        assert_shows(page.inner_text(f'#keys tr[data-key="{name}"] td[data-field="refused"]'), refused.get(name, 0))

    # the per-day table: one row per (day, key, price) billed, refusals on a (day, key)'s first row
    daily = defaultdict(lambda: [0, 0.0, 0.0, 0, 0.0, 0.0])
    for day, name, n, used, cost, probe_used, probe_paid in rows(
        seeded.path,
        """
            SELECT date(u.created_at), k.name, COUNT(*), SUM(u.gflops), SUM(u.cost),
                   SUM(CASE WHEN u.purpose = 'probe' THEN u.gflops ELSE 0 END),
                   SUM(CASE WHEN u.purpose = 'probe' THEN u.cost ELSE 0 END) FROM usage u
            JOIN api_keys k ON k.id = u.api_key_id GROUP BY 1, 2""",
    ):
        daily[(day, name)][:3] = [n, used, cost]
        daily[(day, name)][4:] = [probe_used, probe_paid]
    for day_start, name, count in rows(
        seeded.path,
        """
            SELECT r.day_start, k.name, SUM(r.count) FROM refusals r LEFT JOIN api_keys k ON k.id = r.api_key_id
            GROUP BY 1, 2""",
    ):
        daily[(datetime.fromtimestamp(day_start, UTC).date().isoformat(), name or "")][3] += count
    shown_days = page.eval_on_selector_all(
        "#daily tbody tr",
        "rs => rs.map(r => [r.dataset.day, r.dataset.key, "
        "...['requests', 'gflops', 'cost', 'refused', 'probe_gflops', "
        "'probe_cost'].map(f => "
        "r.querySelector(`td[data-field=${f}]`).textContent)])",
    )
    assert sorted((d, k) for d, k, *_ in shown_days) == sorted(daily)
    for day, name, n, used, cost, refused_text, probe_used, probe_paid in shown_days:
        want = daily[(day, name)]
        assert_shows(n, want[0])
        assert_shows(used, want[1])
        if want[0]:
            assert cost.startswith("USD ")
            assert_shows(cost, want[2])
            assert_shows(probe_used, want[4])
            assert_shows(probe_paid, want[5])
        assert_shows(refused_text, want[3])

    origin = dashboard.url
    assert page.requested and all(u.startswith(origin) for u in page.requested), page.requested  # no CDN
    assert page.errors == []


def _chart(page: Page, chart_id: str) -> tuple[list[str], list[list[float | None]]]:
    """Series labels and data arrays of a uPlot chart as drawn (data[0] = x timestamps)."""
    labels = page.evaluate(f"window.maskedkdDashboard.charts['{chart_id}'].series.slice(1).map(s => s.label)")
    data = page.evaluate(f"window.maskedkdDashboard.charts['{chart_id}'].data")
    return labels, data


def _sql_buckets(seeded: SeededLedger, width: int) -> dict[tuple[str, int], tuple[float, float, float]]:
    cells: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    query = (
        "SELECT k.name, u.created_at, u.gflops, u.full_gflops, u.cost FROM usage u "
        "JOIN api_keys k ON k.id = u.api_key_id"
    )
    for name, created, used, full, cost in rows(seeded.path, query):
        epoch = int(datetime.fromisoformat(created).replace(tzinfo=UTC).timestamp())
        cell = cells[(name, epoch // width * width)]
        cell[0] += used
        cell[1] += full
        cell[2] += cost
    return {k: (v[0], v[1], v[2]) for k, v in cells.items()}


def _assert_charts_equal_ledger(page: Page, seeded: SeededLedger, width: int) -> None:
    expected = _sql_buckets(seeded, width)
    keys_with_usage = sorted({k for k, _ in expected})
    labels, data = _chart(page, "chart-gflops")
    assert labels == [*keys_with_usage, "full teacher"]
    stamps = data[0]
    assert stamps[0] == min(t for _, t in expected) and all(b - a == width for a, b in itertools.pairwise(stamps))
    assert {t for _, t in expected} <= set(stamps)
    for j, key in enumerate(keys_with_usage, start=1):
        drawn = data[j]
        assert drawn == pytest.approx([expected.get((key, t), (0.0, 0.0, 0.0))[0] for t in stamps], rel=1e-9)
    full_line = data[-1]
    assert full_line == pytest.approx(
        [sum(v[1] for (k, t2), v in expected.items() if t2 == t) for t in stamps], rel=1e-9
    )
    cost_labels, cost_data = _chart(page, "chart-cost")
    assert cost_labels == keys_with_usage
    for j, key in enumerate(keys_with_usage, start=1):
        assert cost_data[j] == pytest.approx([expected.get((key, t), (0.0, 0.0, 0.0))[2] for t in stamps], rel=1e-9)
    canvases = page.eval_on_selector_all(".uplot canvas", "cs => cs.map(c => [c.width, c.height])")
    assert len(canvases) == 2 and all(w > 300 and h > 100 for w, h in canvases)


def test_charts_draw_the_ledger_per_minute_and_per_hour(page: Page, seeded: SeededLedger, tmp_path: Path) -> None:
    _assert_charts_equal_ledger(page, seeded, 60)
    assert "per minute" in page.inner_text("#gflops-title")

    target = Path(
        os.environ.get("MASKEDKD_SCREENSHOT")
        or (tmp_path / "dashboard.png" if IN_CI else REPO / "docs" / "dashboard.png")
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 20_000  # a real rendering, not a blank page

    page.select_option("#bucket", "hour")
    page.wait_for_function("window.maskedkdDashboard.lastSeries.bucket === 'hour'", timeout=15_000)
    _assert_charts_equal_ledger(page, seeded, 3600)
    assert "per hour" in page.inner_text("#gflops-title")
    assert page.errors == []  # type: ignore[attr-defined]


def test_api_docs_render_offline_from_vendored_assets(browser: Browser, dashboard: RunningDashboard) -> None:
    """/docs with every request to anywhere but 127.0.0.1 refused: Swagger UI still lists every operation of
    /openapi.json (FastAPI's default page loads its scripts from a CDN and stays blank offline)."""
    import json
    import urllib.request
    from urllib.parse import urlparse

    with urllib.request.urlopen(dashboard.url + "/openapi.json", timeout=10) as response:
        spec = json.load(response)
    expected = sorted((method.upper(), path) for path, ops in spec["paths"].items() for method in ops)
    page = browser.new_page()
    refused: list[str] = []

    def only_loopback(route: Any) -> None:
        url = route.request.url
        if url.startswith("data:") or urlparse(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            refused.append(url)
            route.abort()

    page.route("**/*", only_loopback)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(dashboard.url + "/docs", wait_until="load")
    page.wait_for_selector(".opblock-summary-path", timeout=30_000)
    shown_ops = page.eval_on_selector_all(
        ".opblock-summary",
        "els => els.map(e => [e.querySelector('.opblock-summary-method').textContent, "
        "e.querySelector('.opblock-summary-path').dataset.path])",
    )
    page.close()
    assert sorted((m.upper(), p) for m, p in shown_ops) == expected
    assert len(expected) >= 8 and refused == [] and errors == []
