"""Ledger at scale: per-request billing time (quota admission + usage row + replay payload + running totals, and the
replay lookup every request with an id makes) on a ledger already holding N usage rows, SQLite and Postgres; the
old per-request quota query (a sum over the key's rows) beside it; and ledger bytes per billed image, billing rows
apart from replay payloads.

Target: billing time flat within 2x from the smallest to the largest ledger. Rows are bulk-loaded straight into the
tables (executemany / COPY), spread over KEYS keys, the measured key holding its share; Postgres is the throw-away
server of tests/teacher_server/postgres_testkit.py (skipped when its binaries are missing).
"""

from __future__ import annotations

import importlib.util
import io
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from sqlalchemy import func, select, text

from benchmarks.timing import REPO
from teacher_server.ledger import billing, database, keys, models, quota_holds

FULL_ROWS = (10_000, 1_000_000, 10_000_000)
QUICK_ROWS = (1_000, 10_000)
KEYS = 100  # half the loaded rows belong to the measured key, the rest to 99 others
REQUESTS = 200  # billed per ledger size (quick: 20)
CLASSES = 1000  # payload of a 1,000-class teacher: 4,000 bytes per image
IMAGES_PER_REQUEST = 8
CHUNK = 200_000


def _testkit() -> Any:
    path = REPO / "tests" / "teacher_server" / "postgres_testkit.py"
    spec = importlib.util.spec_from_file_location("postgres_testkit", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _row_values(start: int, count: int) -> list[tuple[Any, ...]]:
    return [
        (
            1 if i % 2 == 0 else 2 + i % (KEYS - 1),
            f"bulk-{i}",
            "bench",
            1,
            65,
            1.25,
            2.5,
            1.25e-6,
            1.0,
            0.1,
            8,
            "2026-01-01 00:00:00",
        )
        for i in range(start, start + count)
    ]


_COLUMNS = (
    "api_key_id, request_id, model, images, tokens, gflops, full_gflops, cost, latency_ms, queue_ms, "
    "batch_images, created_at"
)


def _load(sessions: Any, rows: int, already: int) -> None:
    """Add usage rows [already, rows) and keep key_counters equal to them (as billing would have)."""
    engine = sessions.kw["bind"]
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        for start in range(already, rows, CHUNK):
            values = _row_values(start, min(CHUNK, rows - start))
            if engine.dialect.name == "postgresql":
                buf = io.StringIO("".join("\t".join(str(v) for v in r) + "\n" for r in values))
                cur.copy_expert(f"COPY usage ({_COLUMNS}) FROM STDIN", buf)
            else:
                cur.executemany(f"INSERT INTO usage ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", values)
        cur.execute(
            "UPDATE key_counters SET requests = s.n, gflops = s.g, window_gflops = s.g FROM "
            "(SELECT api_key_id AS k, COUNT(*) AS n, SUM(gflops) AS g FROM usage GROUP BY api_key_id) s "
            "WHERE key_counters.api_key_id = s.k"
        )
        raw.commit()
    finally:
        raw.close()


def _bill_once(sessions: Any, key_id: int, limits: quota_holds.KeyLimits, rid: str) -> float:
    payload = billing.StoredLogits(os.urandom(4 * CLASSES * IMAGES_PER_REQUEST), f"{IMAGES_PER_REQUEST},{CLASSES}")
    row = models.NewUsage(
        api_key_id=key_id,
        request_id=rid,
        model="bench",
        images=IMAGES_PER_REQUEST,
        tokens=520,
        gflops=1.0,
        full_gflops=2.0,
        cost=1e-6,
        latency_ms=1.0,
        queue_ms=0.1,
        batch_images=IMAGES_PER_REQUEST,
        content_digest="0" * 64,
    )
    t0 = time.perf_counter()
    with sessions() as s:
        assert not billing.billed_before(s, api_key_id=key_id, request_id=rid)  # the serving path's lookup
        hold, _ = quota_holds.reserve(s, api_key_id=key_id, gflops=1.0, limits=limits)
        assert hold is not None
        billing.bill(s, items=[billing.Billable(row, "lifetime", payload, hold)], replay_ttl_s=3600)
    return time.perf_counter() - t0


def _old_quota_query(sessions: Any, key_id: int) -> float:
    t0 = time.perf_counter()
    with sessions() as s:
        s.scalar(
            select(func.coalesce(func.sum(models.UsageRecord.gflops), 0.0)).where(
                models.UsageRecord.api_key_id == key_id
            )
        )
    return time.perf_counter() - t0


def _bytes_per_image(sessions: Any) -> dict[str, float]:
    """Table bytes (with indexes) over the images of the rows they hold: billing rows, and replay payloads."""
    engine = sessions.kw["bind"]
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            sizes = {
                t: int(conn.scalar(text(f"SELECT pg_total_relation_size('{t}')"))) for t in ("usage", "replay_payloads")
            }
        else:
            named = dict(conn.execute(text("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name")).all())
            sizes = {
                "usage": sum(v for k, v in named.items() if "usage" in k and "replay" not in k),
                "replay_payloads": sum(v for k, v in named.items() if "replay" in k),
            }
        images = conn.scalar(text("SELECT SUM(images) FROM usage"))
        replay_images = conn.scalar(
            text("SELECT SUM(u.images) FROM usage u JOIN replay_payloads p ON p.usage_id = u.id")
        )
    return {
        "usage_bytes_per_image": sizes["usage"] / max(1, images or 0),
        "replay_bytes_per_image": sizes["replay_payloads"] / max(1, replay_images or 0),
    }


def _measure_backend(url: str, sizes: tuple[int, ...], requests: int) -> dict[str, Any]:
    sessions = database.open_ledger(url)
    with sessions() as s:
        key_ids = [
            keys.add_api_key(s, name=f"k{i}", key_prefix="mkd_bench", key_hash=f"{i:064d}").id for i in range(KEYS)
        ]
    limits = quota_holds.KeyLimits(quota_gflops=1e18, quota_window="lifetime", rate_limit_gflops_per_min=None)
    rows_out, loaded = [], 0
    for n in sizes:
        _load(sessions, n, loaded)
        loaded = n
        times = [_bill_once(sessions, key_ids[0], limits, f"r{n}-{i}") for i in range(requests)]
        loaded += requests
        rows_out.append(
            {
                "usage_rows": n,
                "bill_ms_median": 1000 * statistics.median(times),
                "bill_ms_mean": 1000 * statistics.fmean(times),
                "old_quota_sum_ms": 1000 * statistics.median(_old_quota_query(sessions, key_ids[0]) for _ in range(5)),
                **_bytes_per_image(sessions),
            }
        )
    sessions.kw["bind"].dispose()
    # Growth, largest ledger over smallest: the ledger only grows, so sizes cannot be interleaved; a ratio below 1
    # means the machine was busier during the small ledger's round.
    return {"rows": rows_out, "flat_ratio": rows_out[-1]["bill_ms_median"] / rows_out[0]["bill_ms_median"]}


def run_ledger_section(cfg: Any) -> dict[str, Any]:
    quick = getattr(cfg, "mode", "full") == "quick"
    sizes, requests = (QUICK_ROWS, 20) if quick else (FULL_ROWS, REQUESTS)
    out: dict[str, Any] = {"classes": CLASSES, "images_per_request": IMAGES_PER_REQUEST, "backends": {}}
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        out["backends"]["sqlite"] = _measure_backend(f"sqlite:///{tmp}/ledger.db", sizes, requests)
    kit = _testkit()
    bin_dir = kit.find_bin_dir()
    if bin_dir is None:
        out["backends"]["postgres"] = {"skipped": "PostgreSQL binaries not found"}
        return out
    import pwd

    run_as = kit.SUPERUSER if os.geteuid() == 0 else None
    if run_as:
        pwd.getpwnam(run_as)
    server = kit.start_postgres(bin_dir, run_as=run_as)
    try:
        out["backends"]["postgres"] = _measure_backend(server.create_database("bench"), sizes, requests)
    finally:
        server.stop()
        import shutil

        shutil.rmtree(server.root, ignore_errors=True)
    return out


def render_ledger(s: dict[str, Any]) -> str:
    lines = [
        f"Per-request billing (replay lookup + quota admission + usage row + {s['images_per_request']}-image "
        f"replay payload of a {s['classes']}-class teacher + running totals), median, on a ledger holding N "
        "rows (half of them the measured key's); `old quota sum` is the per-request query main made before (a sum over "
        "the key's rows).",
        "",
        "| backend | usage rows | bill ms | old quota sum ms | billing bytes/image | replay bytes/image |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, b in s["backends"].items():
        if "rows" not in b:
            lines.append(f"| {name} | {b.get('skipped', '-')} | | | | |")
            continue
        for r in b["rows"]:
            lines.append(
                f"| {name} | {r['usage_rows']:,} | {r['bill_ms_median']:.2f} | {r['old_quota_sum_ms']:.2f} "
                f"| {r['usage_bytes_per_image']:.0f} | {r['replay_bytes_per_image']:.0f} |"
            )
    flat = ", ".join(f"{n} {b['flat_ratio']:.2f}x" for n, b in s["backends"].items() if "flat_ratio" in b)
    lines += [
        "",
        f"Billing time on the largest ledger over the smallest: {flat} (target: at most 2x). Bytes per "
        "image count the table with its indexes over the images of its rows (the bulk-loaded rows hold one "
        "image each). Billing rows are kept forever; "
        "replay payloads only for --replay-ttl.",
    ]
    return "\n".join(lines)
