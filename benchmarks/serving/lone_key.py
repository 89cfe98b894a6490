"""A key alone on the teacher, and keys that start to send beside it: what `--max-batch-ms` costs a key alone.

A key alone is cut only into chunks of about 1 s of forward (split_requests.py), so its img/s should not depend on
`--max-batch-ms`; a key that starts sending while it floods waits about one such chunk (performance notes, sections
27-28). Run through `python -m benchmarks.serving.tenants --lone-key MS,MS,... [--waking-keys N]`, against one server
child per bound, with the tenants scenario's requests and greedy clients (tenants.py).
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from statistics import median

import grpc

from benchmarks.serving.server_proc import BenchServer
from benchmarks.serving.tenant_loads import (
    GREEDY,
    LIGHT,
    OPTIONS,
    TEACHERS,
    Teacher,
    greedy_load,
    infer_request,
    served_settings,
    timed_call,
)
from maskedkd.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.engine.batching.split_requests import SHARED_S


def lone_key_rates(
    bounds: list[float],
    *,
    seconds: float,
    rounds: int,
    images: int = GREEDY["images"],
    probes: int = 0,
    clients: int = 2,
    threads: int = 0,
    dtype: str = "float32",
    teacher: str = "tiny",
) -> dict[float, dict[str, list[float]]]:
    """A key alone at each `--max-batch-ms` of `bounds`: img/s of `clients` sending `images`-image calls back to back
    (no deadline), `rounds` interleaved rounds of `seconds` each ("img_s"). A key alone is cut only into chunks of
    about `LONE_BATCH_S` (1 s) of forward (0: never cut), so every bound should read about the same. Then, with
    `probes`, the first call of each of `probes` keys that never sent before, while the key alone keeps sending
    ("waking_ms"): how long a key starting to send waits."""
    from teacher_server.ledger.database import open_ledger
    from teacher_server.ledger.keys import create_api_key

    out: dict[float, dict[str, list[float]]] = {b: {"img_s": [], "waking_ms": []} for b in bounds}
    waking: dict[float, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-lone-key-") as tmp:
        servers = {}
        for b in bounds:
            served = served_settings(dtype, TEACHERS[teacher], max_batch_ms=b)
            server = BenchServer(f"bound-{b:g}", served, Path(tmp) / f"bound-{b:g}", threads=threads)
            sessions = open_ledger(server.settings["db"])
            waking[b] = [create_api_key(sessions, name=f"waking-{i}")[0] for i in range(probes)]
            sessions.kw["bind"].dispose()
            servers[b] = server.start()
        try:
            for b in bounds:
                servers[b].wait_ready()
                _lone_rate(
                    servers[b], clients, 2.0, "warm", images, TEACHERS[teacher]
                )  # warm-up: the compute estimate learns the forward
            for r in range(rounds):
                for b in bounds:
                    out[b]["img_s"].append(
                        _lone_rate(servers[b], clients, seconds, f"round{r}", images, TEACHERS[teacher])
                    )
            for b in bounds:
                out[b]["waking_ms"] = _waking_waits(servers[b], waking[b], clients, images, TEACHERS[teacher])
        finally:
            for server in servers.values():
                server.stop()
    return out


def _lone_rate(server: BenchServer, clients: int, seconds: float, tag: str, images: int, teacher: Teacher) -> float:
    """img/s answered to `clients` sending `images`-image calls back to back, without a deadline, for `seconds`."""
    started = time.monotonic()
    load = greedy_load(
        server.address, server.api_key, seconds, images, clients=clients, deadline_s=120.0, tag=tag, teacher=teacher
    )
    if set(load["codes"]) != {"OK"}:
        raise RuntimeError(f"a lone key's calls were refused: {load['codes']}")
    return len(load["received"]) * images / (time.monotonic() - started)


def _waking_waits(server: BenchServer, keys: list[str], clients: int, images: int, teacher: Teacher) -> list[float]:
    """ms to the answer of one light call (LIGHT's images) of each of `keys`, none of which sent before, while
    `clients` of the server's key send `images`-image calls back to back: each call comes SHARED_S + 5 s after the
    one before, so the key alone is alone again (split_requests.RecentSenders) and its requests queued since the last
    call were sent alone, not cut for the other key's sake."""
    spacing_s = SHARED_S + 5.0
    flood = threading.Thread(
        target=greedy_load,
        args=(server.address, server.api_key, 3.0 + spacing_s * len(keys), images),
        kwargs={"clients": clients, "deadline_s": 120.0, "tag": "waking-flood", "teacher": teacher},
    )
    flood.start()
    waits: list[float] = []
    try:
        for i, key in enumerate(keys):
            time.sleep(3.0 if i == 0 else max(0.0, spacing_s - waits[-1] / 1e3))
            with grpc.insecure_channel(server.address, options=OPTIONS) as channel:  # a connection of its own
                request = infer_request(LIGHT["images"], f"waking-{i}", seed=i, teacher=teacher)
                waits.append(timed_call(pb_grpc.TeacherServiceStub(channel), key, request) * 1e3)
    finally:
        flood.join()
    return waits


def rates_table(rates: dict[float, dict[str, list[float]]]) -> str:
    """`lone_key_rates` as a markdown table: img/s each round and their median, a waking key's first call."""
    lines = ["| --max-batch-ms | img/s, each round | median | a waking key's first call, ms |", "|---|---|---|---|"]
    for bound, figures in rates.items():
        per_round, waits = figures["img_s"], figures["waking_ms"]
        waking = " / ".join(f"{w:.0f}" for w in waits) or "-"
        lines.append(
            f"| {bound:g} | {' / '.join(f'{r:.0f}' for r in per_round)} | {median(per_round):.0f} | {waking} |"
        )
    return "\n".join(lines)
