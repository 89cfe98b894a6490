"""Realistic usage for the dashboard tests: several keys and three hours of requests in a real SQLite ledger.

A plain module (not conftest) so test files can import it by a name no other test area uses."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from maskedkd.flops import ViTShape, masked_forward_flops
from teacher_server.ledger import keys, models
from teacher_server.ledger.refusals import NO_KEY, add_refusals
from teacher_server.settings import ServerSettings

ADMIN_TOKEN = "test-admin-token-0123456789"
VIEWER_TOKEN = "test-viewer-token-9876543210"
DEFAULT_PRICE = 2e-6
# DeiT-S/16 at 224 px, the paper's teacher: 196 patches, width 384, 12 blocks, MLP 1536, 1000 classes
DEIT_S = ViTShape(
    num_patches=196,
    patch_dim=768,
    embed_dim=384,
    depth=12,
    attn_dim=384,
    mlp_hidden=1536,
    num_prefix_tokens=1,
    num_classes=1000,
)


@dataclass(frozen=True)
class KeyPlan:
    name: str
    price_per_gflop: float | None  # None: the server default
    quota_gflops: float | None
    keep: float  # share of the 196 patches its students send
    batch: int  # images per request
    start_min: int  # minutes before now of its first request
    end_min: int  # minutes before now of its last request
    every_min: float  # one request about every this many minutes
    disabled: bool = False
    probe_every: int = 0  # every this many-th request is a `--keep auto` probe (purpose 'probe'); 0: none


# refused calls per key (None: no key known) and reason, counted today (UTC)
REFUSALS = {
    ("robotics-lab", "quota"): 7,
    ("robotics-lab", "invalid"): 1,
    ("intern-sandbox", "auth"): 4,
    (None, "auth"): 12,
}

PLANS = (
    KeyPlan("vision-team", None, None, keep=0.5, batch=128, start_min=175, end_min=0, every_min=0.5, probe_every=9),
    KeyPlan("robotics-lab", 3e-6, 6e6, keep=0.25, batch=256, start_min=95, end_min=20, every_min=0.25, probe_every=25),
    KeyPlan("benchmarks", 1e-6, None, keep=1.0, batch=64, start_min=150, end_min=110, every_min=1.0),
    KeyPlan("intern-sandbox", None, 2e4, keep=0.5, batch=32, start_min=60, end_min=45, every_min=1.0, disabled=True),
    KeyPlan("new-customer", None, 1e5, keep=0.5, batch=16, start_min=0, end_min=0, every_min=1.0),  # no usage yet
)


@dataclass(frozen=True)
class SeededLedger:
    url: str
    path: Path
    sessions: sessionmaker[Session]
    settings: ServerSettings
    now: datetime


def seed_usage(sessions: sessionmaker[Session], *, now: datetime, seed: int = 0) -> None:
    """Keys from PLANS and their usage rows (real FLOP model numbers), timestamps spread over the last 3 hours."""
    rng = random.Random(seed)
    full_per_image = masked_forward_flops(DEIT_S, DEIT_S.num_patches).total / 1e9
    for plan in PLANS:
        _, key = keys.create_api_key(
            sessions, name=plan.name, quota_gflops=plan.quota_gflops, price_per_gflop=plan.price_per_gflop
        )
        price = DEFAULT_PRICE if plan.price_per_gflop is None else plan.price_per_gflop
        kept = round(plan.keep * DEIT_S.num_patches)
        per_image = masked_forward_flops(DEIT_S, kept).total / 1e9
        rows = []
        minute = float(plan.start_min)
        n = 0
        while minute > plan.end_min:
            images = plan.batch if rng.random() > 0.03 else rng.randint(1, plan.batch)  # last batch of an epoch
            batch_images = min(1024, images * rng.choice((1, 1, 2, 3)))
            queue_ms = rng.uniform(0.3, 4.0)
            created = now - timedelta(minutes=minute, seconds=rng.uniform(0, 5))
            rows.append(
                models.UsageRecord(
                    api_key_id=key.id,
                    request_id=f"{plan.name}-{n}",
                    model="deit_small_patch16_224",
                    images=images,
                    tokens=images * (kept + DEIT_S.num_prefix_tokens),
                    gflops=images * per_image,
                    full_gflops=images * full_per_image,
                    cost=images * per_image * price,
                    price_per_gflop=price,
                    currency="USD",
                    latency_ms=queue_ms + batch_images * per_image * rng.uniform(0.08, 0.12),
                    queue_ms=queue_ms,
                    batch_images=batch_images,
                    created_at=created,
                    purpose="probe" if plan.probe_every and n % plan.probe_every == 0 else "",
                )
            )
            minute -= plan.every_min * rng.uniform(0.97, 1.03)
            n += 1
        with sessions() as session:
            session.add_all(rows)
            session.commit()
        if plan.disabled:
            with sessions() as session:
                keys.set_api_key_disabled(session, name=plan.name, disabled=True)
    day = int(now.timestamp()) // 86400 * 86400
    with sessions() as session:
        ids = {k.name: k.id for k in keys.list_api_keys(session)}
        add_refusals(
            session, counts={(day, ids[name] if name else NO_KEY, reason): n for (name, reason), n in REFUSALS.items()}
        )
        session.commit()
