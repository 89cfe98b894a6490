"""Micro-batching across clients: N concurrent clients, each sending small requests, against one large client.

Each client is a thread with its own `TeacherClient` sending requests back to back; all start at a barrier and the
throughput is all images over the wall time until the last finishes. The server's ledger says which micro-batch each
request ran in (`usage.batch_images`), so the report shows whether requests were really batched together.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
import uuid
from typing import Any

from sqlalchemy import func, select

from benchmarks.compute.teacher import TeacherBatch, build_teacher, make_batch
from benchmarks.config import BenchConfig
from maskedkd.keep import num_keep


def _run_clients(server: Any, clients: int, requests_each: int, tb: TeacherBatch, tag: str) -> float:
    """Wall seconds for `clients` threads to send `requests_each` requests each."""
    from student_client.transport.client import TeacherClient

    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []
    finished: list[float] = []

    def client_main(rank: int) -> None:
        try:
            with TeacherClient(server.address, server.api_key, timeout_s=600.0) as client:
                client.info()  # connect before the clock starts
                barrier.wait()
                for i in range(requests_each):
                    client.infer(patches=tb.pixels, keep_indices=tb.indices, request_id=f"{tag}-c{rank}-r{i}")
                finished.append(time.perf_counter())
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=client_main, args=(r,), daemon=True) for r in range(clients)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"a benchmark client failed: {errors[0]!r}") from errors[0]
    return max(finished) - started


def _batch_sizes(server: Any, tag: str) -> dict[str, float]:
    """Mean and max micro-batch (images) that the requests tagged `tag` ran in, from the server's ledger."""
    from teacher_server.ledger.database import open_ledger
    from teacher_server.ledger.models import UsageRecord

    sessions = open_ledger(server.settings["db"])
    try:
        with sessions() as session:
            mean, top = session.execute(
                select(func.avg(UsageRecord.batch_images), func.max(UsageRecord.batch_images)).where(
                    UsageRecord.request_id.like(f"{tag}-%")
                )
            ).one()
    finally:
        sessions.kw["bind"].dispose()
    return {"mean_batch_images": float(mean or 0.0), "max_batch_images": int(top or 0)}


def measure_config(
    server: Any, clients: int, batch: int, total_images: int, teacher: Any, keep: float, repeats: int
) -> dict[str, Any]:
    tb = make_batch(teacher, batch, num_keep(keep, teacher.geometry.num_patches))
    requests_each = max(1, total_images // (clients * batch))
    _run_clients(server, clients, 1, tb, f"warm-{uuid.uuid4().hex[:8]}")
    samples, batches = [], []
    for _ in range(max(1, repeats)):
        tag = f"mb-{uuid.uuid4().hex[:8]}"
        samples.append(_run_clients(server, clients, requests_each, tb, tag))
        batches.append(_batch_sizes(server, tag))
    images = clients * requests_each * batch
    wall = statistics.median(samples)
    return {
        "clients": clients,
        "batch_per_client": batch,
        "requests_per_client": requests_each,
        "images": images,
        "wall_s": wall,
        "images_per_s": images / wall,
        "mean_batch_images": statistics.median(b["mean_batch_images"] for b in batches),
        "max_batch_images": max(b["max_batch_images"] for b in batches),
    }


def run_microbatch_section(cfg: BenchConfig, pool: Any) -> dict[str, Any]:
    models = []
    cases = {c.key: c for c in cfg.models}
    for key in cfg.microbatch_model:
        case = cases[key]
        teacher = build_teacher(case)
        server = pool.get(key)
        total = cfg.microbatch_images.get(key, 256)
        reference = measure_config(
            server, 1, cfg.microbatch_reference_batch, total, teacher, cfg.microbatch_keep, cfg.microbatch_repeats
        )
        rows = [
            measure_config(
                server, n, cfg.microbatch_client_batch, total, teacher, cfg.microbatch_keep, cfg.microbatch_repeats
            )
            for n in cfg.microbatch_clients
        ]
        for row in rows:
            row["vs_reference"] = row["images_per_s"] / reference["images_per_s"]
        models.append(
            {"model": key, "label": case.label, "keep": cfg.microbatch_keep, "reference": reference, "rows": rows}
        )
    from teacher_server.settings import ServerSettings

    defaults = ServerSettings()
    return {
        "models": models,
        "server_settings": {
            "max_delay_ms": defaults.max_delay_ms,
            "token_budget": defaults.token_budget,
            "max_batch_images": defaults.max_batch_images,
            "mixed_k": defaults.mixed_k,
        },
    }
