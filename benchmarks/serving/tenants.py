"""Two tenants on one teacher: a light key's latency alone and under a greedy key's flood, and what the flood gets.

The scenario a platform team meets (the tiny 32 px teacher, a server child with default queueing settings):
- light: one client of its own key sends 8 images every 0.2 s with a 5 s deadline (far below capacity); its
  latencies are taken alone, then while the flood runs: from half a second after the flood's first answer, so the
  greedy child's own start-up (an interpreter, torch, 16 connections) is not what the light tenant waits on.
- greedy: 16 clients (a connection each) of another key send calls back to back with a 1 s deadline, no retries; a
  refused call's RetryInfo is waited out before the next one, as the product's client library does. A call holds as
  many images as this machine's teacher runs in a quarter of the deadline, at most 256 (`--greedy-images` sets it):
  where a call could never end in time (256 images take longer than 1 s on a 2-core CPU), every call is refused, the
  flood never loads the teacher, and the light key's latency says nothing. They run in a child process (`--greedy`),
  so their threads do not share this process's interpreter lock with the light client's clock (they do share the
  machine's cores: on a small machine the flood's own CPU shows in the light tenant's latency).
After the load, the ledger is read back with SQL: which request ids each key was billed for, and the light requests'
latency in the server (receipt to answer, without the light client's own process). A greedy request billed
but never received (its answer came after the client gave up) is "billed-undelivered"; a refused one (shed) must
not be billed at all.

    python -m benchmarks.serving.tenants  # 10 s alone, 10 s flood; a table on stdout (make bench: 30 s each)
    python -m benchmarks.serving.tenants --seconds 4 --json out.json
    python -m benchmarks.serving.tenants --ingest-workers 2  # the same against `serve --ingest-workers 2`
    python -m benchmarks.serving.tenants --light-priority interactive  # the light key in a better class
    python -m benchmarks.serving.tenants --max-batch-ms 50  # batches bounded to 50 ms (the flood in more chunks)
    python -m benchmarks.serving.tenants --lone-key 0,100,50 --seconds 10  # a key alone at each bound (img/s)
    python -m benchmarks.serving.tenants --lone-key 0,100 --teacher deit_s --waking-keys 3  # and keys starting to send
    python -m benchmarks.serving.tenants --dtype auto  # the teacher in bf16 where the machine computes it natively
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from math import nan
from pathlib import Path
from statistics import median
from typing import Any

from benchmarks.serving.server_proc import BenchServer
from benchmarks.serving.tenant_loads import (
    FLOOD_START_S,
    GREEDY,
    LIGHT,
    SIZING_IDS,
    TEACHERS,
    greedy_load,
    light_load,
    percentile,
    served_settings,
    sized_greedy_images,
)
from benchmarks.timing import REPO
from teacher_server.priorities import DEFAULT_PRIORITY, PRIORITIES


def billed_ids(db_url: str, key: str) -> set[str]:
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
        rows = conn.execute(
            "SELECT u.request_id FROM usage u JOIN api_keys k ON k.id = u.api_key_id WHERE k.name = ?", (key,)
        ).fetchall()
    return {r[0] for r in rows}


def server_latencies(db_url: str, key: str, prefix: str) -> dict[str, float]:
    """p50 / p99 (ms) of the server's own latency of `key`'s requests whose ids start with `prefix`, as the ledger
    holds it (receipt to answer): what the scheduling costs, without the client's own process (which shares this
    machine's cores with the flood's 16 clients)."""
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
        rows = conn.execute(
            "SELECT u.latency_ms FROM usage u JOIN api_keys k ON k.id = u.api_key_id"
            " WHERE k.name = ? AND u.request_id LIKE ?",
            (key, prefix + "%"),
        ).fetchall()
    latencies = [float(r[0]) for r in rows]
    return {"server_p50_ms": median(latencies) if latencies else nan, "server_p99_ms": percentile(latencies, 0.99)}


def run_tenants(
    seconds: float = 10.0,
    *,
    greedy_images: int | None = None,
    workdir: Path | None = None,
    threads: int = 0,
    ingest_workers: int = 0,
    light_priority: str = DEFAULT_PRIORITY,
    max_batch_ms: float | None = None,
    dtype: str = "float32",
    teacher: str = "tiny",
) -> dict[str, Any]:
    """The scenario against a fresh server child; the figures of `make bench`'s tenants section. `ingest_workers`:
    the server runs that many ingest processes; `light_priority`: the light key's class (the greedy key's is
    standard); `max_batch_ms`: the server's `--max-batch-ms` (None: its default); `dtype`: the teacher's; `teacher`:
    which of TEACHERS; `greedy_images`: per greedy call (None: `sized_greedy_images`)."""
    from teacher_server.ledger.database import open_ledger
    from teacher_server.ledger.keys import create_api_key

    bound = {} if max_batch_ms is None else {"max_batch_ms": max_batch_ms}
    with tempfile.TemporaryDirectory(prefix="bench-tenants-") as tmp:
        work = workdir or Path(tmp)
        served = served_settings(dtype, TEACHERS[teacher], ingest_workers=ingest_workers, **bound)
        server = BenchServer("tenants", served, work, threads=threads)
        sessions = open_ledger(server.settings["db"])
        light_key, _ = create_api_key(sessions, name="light", priority=light_priority)
        sessions.kw["bind"].dispose()
        server.start().wait_ready()
        try:
            light_load(server.address, light_key, 1.0, "warm", TEACHERS[teacher])
            alone = light_load(server.address, light_key, seconds, "alone", TEACHERS[teacher])
            sized = greedy_images is None
            if greedy_images is None:
                greedy_images = sized_greedy_images(server, TEACHERS[teacher])
            out, running = work / "greedy.json", work / "greedy.running"
            child = ["--greedy", server.address, server.api_key, "--seconds", str(seconds + 1.0), "--json", str(out)]
            child += ["--greedy-images", str(greedy_images), "--teacher", teacher, "--running", str(running)]
            greedy_proc = subprocess.Popen([sys.executable, "-m", "benchmarks.serving.tenants", *child], cwd=REPO)
            _wait_for_flood(running, greedy_proc)
            flood = light_load(server.address, light_key, seconds, "flood", TEACHERS[teacher])
            greedy_proc.wait(timeout=seconds + 120)
            greedy = json.loads(out.read_text())
        finally:
            server.stop()
        billed = billed_ids(server.settings["db"], "bench-tenants") - set(SIZING_IDS)
        alone.update(server_latencies(server.settings["db"], "light", "light-alone-"))
        flood.update(server_latencies(server.settings["db"], "light", "light-flood-"))
    received = set(greedy.pop("received"))
    undelivered = billed - received
    return {
        "status": "ok",
        "seconds": seconds,
        "ingest_workers": ingest_workers,
        "light_priority": light_priority,
        "max_batch_ms": max_batch_ms,
        "dtype": dtype,
        "teacher": teacher,
        "light": {"alone": alone, "flood": flood, "p99_ratio": flood["p99_ms"] / alone["p99_ms"], **LIGHT},
        "greedy": {
            **greedy,
            **GREEDY,
            "images": greedy_images,
            "images_sized": sized,
            "answered": len(received),
            "billed": len(billed),
            "billed_undelivered": len(undelivered),
        },
    }


def _wait_for_flood(running: Path, child: subprocess.Popen[bytes]) -> None:
    """Until the greedy child's first call was answered: the teacher runs the flood's work, and the child's own
    start-up (its interpreter, torch, its requests) no longer competes with the light tenant for this machine."""
    give_up = time.monotonic() + FLOOD_START_S
    while not running.exists():
        if child.poll() is not None or time.monotonic() > give_up:
            raise RuntimeError(f"the greedy flood never got an answer within {FLOOD_START_S:.0f} s")
        time.sleep(0.05)
    time.sleep(0.5)  # every greedy client has a call queued by now (each sends as soon as its last one returned)


def table(result: dict[str, Any]) -> str:
    light, greedy = result["light"], result["greedy"]
    codes = ", ".join(f"{k} {v}" for k, v in sorted(greedy["codes"].items()))
    sized = " (sized to this machine)" if greedy.get("images_sized") else ""
    return "\n".join(
        [
            "| | requests answered | p50 ms | p99 ms | errors | in the server (ledger): p50 ms | p99 ms |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| light {name} | {phase['answered']} | {phase['p50_ms']:.0f} | {phase['p99_ms']:.0f} | "
                f"{sum(phase['errors'].values())} | {phase.get('server_p50_ms', nan):.0f} | "
                f"{phase.get('server_p99_ms', nan):.0f} |"
                for name, phase in (("alone", light["alone"]), ("under flood", light["flood"]))
            ),
            "",
            f"light p99 under flood / alone: {light['p99_ratio']:.2f}x",
            f"greedy: {greedy['images']}-image calls{sized}, {greedy['sent']} sent ({codes}); "
            f"{greedy['billed']} billed, {greedy['billed_undelivered']} billed but not received",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving.tenants", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="of each phase (alone, flood)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--greedy-images",
        type=int,
        default=None,
        help="images per greedy call (default: what the teacher runs in a quarter of the deadline here, at most 256)",
    )
    parser.add_argument("--ingest-workers", type=int, default=0, help="serve with that many ingest processes")
    parser.add_argument(
        "--light-priority", choices=PRIORITIES, default=DEFAULT_PRIORITY, help="the light key's priority class"
    )
    parser.add_argument(
        "--max-batch-ms", type=float, default=None, help="the server's --max-batch-ms (default: the server's default)"
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "auto"), default="float32", help="the teacher's (default float32)"
    )
    parser.add_argument("--teacher", choices=sorted(TEACHERS), default="tiny", help="the teacher served (default tiny)")
    parser.add_argument(
        "--lone-key",
        metavar="MS,MS,...",
        default=None,
        help="instead: img/s of a key alone sending --greedy-images calls at each --max-batch-ms (0: never cut)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="with --lone-key: interleaved rounds of --seconds each")
    parser.add_argument(
        "--waking-keys",
        type=int,
        default=0,
        help="with --lone-key: that many keys then send one call each, 15 s apart, while the key alone keeps sending",
    )
    parser.add_argument("--greedy", nargs=2, metavar=("ADDRESS", "KEY"), help=argparse.SUPPRESS)  # the child
    parser.add_argument("--running", type=Path, default=None, help=argparse.SUPPRESS)  # the child: its first answer
    args = parser.parse_args(argv)
    if args.greedy:
        assert args.greedy_images is not None  # the parent passes what it sized
        result = greedy_load(
            *args.greedy, args.seconds, args.greedy_images, teacher=TEACHERS[args.teacher], running=args.running
        )
        assert args.json is not None
        args.json.write_text(json.dumps(result))
        return 0
    if args.lone_key:
        from benchmarks.serving.lone_key import lone_key_rates, rates_table  # it builds on this module's scenario parts

        try:
            bounds = [float(x) for x in args.lone_key.split(",")]
        except ValueError:
            parser.error(f"--lone-key wants milliseconds like 0,100,50, got {args.lone_key!r}")
        rates = lone_key_rates(
            bounds,
            seconds=args.seconds,
            rounds=args.rounds,
            images=args.greedy_images or GREEDY["images"],
            probes=args.waking_keys,
            dtype=args.dtype,
            teacher=args.teacher,
        )
        print(rates_table(rates))
        return 0
    result = run_tenants(
        args.seconds,
        greedy_images=args.greedy_images,
        ingest_workers=args.ingest_workers,
        light_priority=args.light_priority,
        max_batch_ms=args.max_batch_ms,
        dtype=args.dtype,
        teacher=args.teacher,
    )
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
