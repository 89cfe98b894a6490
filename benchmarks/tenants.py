"""Two tenants on one teacher: a light key's latency alone and under a greedy key's flood, and what the flood gets.

The scenario a platform team meets (the tiny 32 px teacher, a server child with default queueing settings):
- light: one client of its own key sends 8 images every 0.2 s with a 5 s deadline (far below capacity); its
  latencies are taken alone, then while the flood runs.
- greedy: 16 clients (a connection each) of another key send 256 images back to back with a 1 s deadline, no
  retries; a refused call's RetryInfo is waited out before the next one, as the product's client library does. They
  run in a child process (`--greedy`), so their threads do not share this process's interpreter lock with the light
  client's clock (they do share the machine's cores: on a small machine the flood's own CPU shows in the light
  tenant's latency).
After the load, the ledger is read back with SQL: which request ids each key was billed for. A greedy request billed
but never received (its answer came after the client gave up) is "billed-undelivered"; a refused one (shed) must
not be billed at all.

    python -m benchmarks.tenants                  # 10 s alone, 10 s flood; a table on stdout
    python -m benchmarks.tenants --seconds 4 --json out.json
    python -m benchmarks.tenants --ingest-workers 2  # the same against `serve --ingest-workers 2`
    python -m benchmarks.tenants --light-priority interactive  # the light key in a better class than the flood's
    python -m benchmarks.tenants --max-batch-ms 50  # batches bounded to 50 ms (the greedy calls run in more chunks)
    python -m benchmarks.tenants --lone-key 0,100,50 --seconds 10  # a key alone at each bound (img/s; not cut)
    python -m benchmarks.tenants --dtype auto  # the teacher in bf16 where the machine computes it natively
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from statistics import median
from typing import Any

import grpc
import torch

from benchmarks.server_proc import BenchServer
from benchmarks.timing import REPO
from maskedkd.codec import tensor_to_proto
from maskedkd.v1 import teacher_pb2 as pb
from maskedkd.v1 import teacher_pb2_grpc as pb_grpc
from student_client.retry import retry_after_s
from teacher_server.priorities import DEFAULT_PRIORITY, PRIORITIES

ARCH = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 4, "num_classes": 10}
LIGHT = {"images": 8, "every_s": 0.2, "deadline_s": 5.0}
GREEDY = {"clients": 16, "images": 256, "deadline_s": 1.0}
OPTIONS = [
    ("grpc.max_send_message_length", 1 << 28),
    ("grpc.max_receive_message_length", 1 << 28),
    ("grpc.use_local_subchannel_pool", 1),  # each client a connection of its own, as separate trainers have
]


def _request(images: int, request_id: str, seed: int) -> pb.InferRequest:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=g)  # [B,C,H,W] uint8
    keep = torch.stack([torch.randperm(64, generator=g)[:32].sort().values for _ in range(images)])  # keep 50%
    return pb.InferRequest(
        request_id=request_id, images=tensor_to_proto(pixels), keep_indices=tensor_to_proto(keep.to(torch.int16))
    )


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def light_load(address: str, api_key: str, seconds: float, tag: str) -> dict[str, Any]:
    """The light tenant for `seconds`: latencies (ms) of its answers, and its errors by status code."""
    metadata = (("authorization", f"Bearer {api_key}"),)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    with grpc.insecure_channel(address, options=OPTIONS) as channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        end = time.monotonic() + seconds
        i = 0
        next_at = time.monotonic()
        while next_at < end:
            time.sleep(max(0.0, next_at - time.monotonic()))
            request = _request(LIGHT["images"], f"light-{tag}-{i}", seed=i)
            started = time.perf_counter()
            try:
                stub.Infer(request, metadata=metadata, timeout=LIGHT["deadline_s"])
                latencies.append((time.perf_counter() - started) * 1e3)
            except grpc.RpcError as err:
                errors[err.code().name] += 1
            i += 1
            next_at += LIGHT["every_s"]
    return {
        "sent": i,
        "answered": len(latencies),
        "p50_ms": median(latencies) if latencies else float("nan"),
        "p99_ms": _p(latencies, 0.99),
        "errors": dict(errors),
    }


def greedy_load(
    address: str,
    api_key: str,
    seconds: float,
    images: int,
    *,
    clients: int = GREEDY["clients"],
    deadline_s: float = GREEDY["deadline_s"],
    tag: str = "greedy",
) -> dict[str, Any]:
    """The greedy tenant (the child process's body): every client sends back to back until `seconds` pass. Request
    ids start with `tag` (unique per load on one server: a repeated id would be answered from the ledger)."""
    metadata = (("authorization", f"Bearer {api_key}"),)
    lock = threading.Lock()
    received: list[str] = []
    codes: Counter[str] = Counter()
    sent = [0]
    base = _request(images, "", seed=7)
    end = time.monotonic() + seconds

    def client(c: int) -> None:
        with grpc.insecure_channel(address, options=OPTIONS) as channel:
            stub = pb_grpc.TeacherServiceStub(channel)
            i = 0
            while time.monotonic() < end:
                request = pb.InferRequest()
                request.CopyFrom(base)
                request.request_id = f"{tag}-{c}-{i}"
                i += 1
                wait = 0.0
                try:
                    stub.Infer(request, metadata=metadata, timeout=deadline_s)
                    code = "OK"
                except grpc.RpcError as err:
                    code = err.code().name
                    wait = retry_after_s(err) or 0.0
                with lock:
                    sent[0] += 1
                    codes[code] += 1
                    if code == "OK":
                        received.append(request.request_id)
                time.sleep(min(wait, max(0.0, end - time.monotonic())))  # a refusal's RetryInfo, as the library does

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"sent": sent[0], "codes": dict(codes), "received": received}


def _served(dtype: str, **more: Any) -> dict[str, Any]:
    """How the tiny teacher is served here: in `dtype`, otherwise at the server's defaults but for `more`."""
    return {"model": ARCH, "model_kwargs": TINY, "dtype": dtype, **more}


def billed_ids(db_url: str, key: str) -> set[str]:
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
        rows = conn.execute(
            "SELECT u.request_id FROM usage u JOIN api_keys k ON k.id = u.api_key_id WHERE k.name = ?", (key,)
        ).fetchall()
    return {r[0] for r in rows}


def run_tenants(
    seconds: float = 10.0,
    *,
    greedy_images: int = GREEDY["images"],
    workdir: Path | None = None,
    threads: int = 0,
    ingest_workers: int = 0,
    light_priority: str = DEFAULT_PRIORITY,
    max_batch_ms: float | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The scenario against a fresh server child; the figures of `make bench`'s tenants section. `ingest_workers`:
    the server runs that many ingest processes; `light_priority`: the light key's class (the greedy key's is
    standard); `max_batch_ms`: the server's `--max-batch-ms` (None: its default); `dtype`: the teacher's."""
    from teacher_server.ledger.database import open_ledger
    from teacher_server.ledger.keys import create_api_key

    bound = {} if max_batch_ms is None else {"max_batch_ms": max_batch_ms}
    with tempfile.TemporaryDirectory(prefix="bench-tenants-") as tmp:
        work = workdir or Path(tmp)
        server = BenchServer("tenants", _served(dtype, ingest_workers=ingest_workers, **bound), work, threads=threads)
        sessions = open_ledger(server.settings["db"])
        light_key, _ = create_api_key(sessions, name="light", priority=light_priority)
        sessions.kw["bind"].dispose()
        server.start().wait_ready()
        try:
            light_load(server.address, light_key, 1.0, "warm")
            alone = light_load(server.address, light_key, seconds, "alone")
            out = work / "greedy.json"
            child = ["--greedy", server.address, server.api_key, "--seconds", str(seconds + 2.0), "--json", str(out)]
            child += ["--greedy-images", str(greedy_images)]
            greedy_proc = subprocess.Popen([sys.executable, "-m", "benchmarks.tenants", *child], cwd=REPO)
            time.sleep(1.0)  # the flood is on before the light tenant measures
            flood = light_load(server.address, light_key, seconds, "flood")
            greedy_proc.wait(timeout=seconds + 120)
            greedy = json.loads(out.read_text())
        finally:
            server.stop()
        billed = billed_ids(server.settings["db"], "bench-tenants")
    received = set(greedy.pop("received"))
    undelivered = billed - received
    return {
        "status": "ok",
        "seconds": seconds,
        "ingest_workers": ingest_workers,
        "light_priority": light_priority,
        "max_batch_ms": max_batch_ms,
        "dtype": dtype,
        "light": {"alone": alone, "flood": flood, "p99_ratio": flood["p99_ms"] / alone["p99_ms"], **LIGHT},
        "greedy": {
            **greedy,
            **GREEDY,
            "images": greedy_images,
            "answered": len(received),
            "billed": len(billed),
            "billed_undelivered": len(undelivered),
        },
    }


def lone_key_rates(
    bounds: list[float], *, seconds: float, rounds: int, clients: int = 2, threads: int = 0, dtype: str = "float32"
) -> dict[float, list[float]]:
    """A key alone at each `--max-batch-ms` of `bounds`: img/s of `clients` sending the greedy key's calls back to
    back (no deadline), `rounds` interleaved rounds of `seconds` each. A key alone is not cut into chunks (0: never
    cut), so every bound should read the same. Returns img/s per round, by bound."""
    rates: dict[float, list[float]] = {b: [] for b in bounds}
    with tempfile.TemporaryDirectory(prefix="bench-lone-key-") as tmp:
        servers = {
            b: BenchServer(
                f"bound-{b:g}", _served(dtype, max_batch_ms=b), Path(tmp) / f"bound-{b:g}", threads=threads
            ).start()
            for b in bounds
        }
        try:
            for b in bounds:
                servers[b].wait_ready()
                _lone_rate(servers[b], clients, 2.0, "warm")  # warm-up: the compute estimate learns the forward
            for r in range(rounds):
                for b in bounds:
                    rates[b].append(_lone_rate(servers[b], clients, seconds, f"round{r}"))
        finally:
            for server in servers.values():
                server.stop()
    return rates


def _lone_rate(server: BenchServer, clients: int, seconds: float, tag: str) -> float:
    """img/s answered to `clients` sending greedy-sized calls back to back, without a deadline, for `seconds`."""
    started = time.monotonic()
    load = greedy_load(
        server.address, server.api_key, seconds, GREEDY["images"], clients=clients, deadline_s=120.0, tag=tag
    )
    if set(load["codes"]) != {"OK"}:
        raise RuntimeError(f"a lone key's calls were refused: {load['codes']}")
    return len(load["received"]) * GREEDY["images"] / (time.monotonic() - started)


def table(result: dict[str, Any]) -> str:
    light, greedy = result["light"], result["greedy"]
    codes = ", ".join(f"{k} {v}" for k, v in sorted(greedy["codes"].items()))
    return "\n".join(
        [
            "| | p50 ms | p99 ms | errors |",
            "|---|---|---|---|",
            f"| light alone | {light['alone']['p50_ms']:.0f} | {light['alone']['p99_ms']:.0f} | "
            f"{sum(light['alone']['errors'].values())} |",
            f"| light under flood | {light['flood']['p50_ms']:.0f} | {light['flood']['p99_ms']:.0f} | "
            f"{sum(light['flood']['errors'].values())} |",
            "",
            f"light p99 under flood / alone: {light['p99_ratio']:.2f}x",
            f"greedy: {greedy['sent']} sent ({codes}); {greedy['billed']} billed, "
            f"{greedy['billed_undelivered']} billed but not received",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tenants", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="of each phase (alone, flood)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--greedy-images", type=int, default=GREEDY["images"], help="images per greedy call")
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
    parser.add_argument(
        "--lone-key",
        metavar="MS,MS,...",
        default=None,
        help="instead: img/s of a key alone sending greedy calls, at each --max-batch-ms listed (0: never split)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="with --lone-key: interleaved rounds of --seconds each")
    parser.add_argument("--greedy", nargs=2, metavar=("ADDRESS", "KEY"), help=argparse.SUPPRESS)  # the child
    args = parser.parse_args(argv)
    if args.greedy:
        result = greedy_load(*args.greedy, args.seconds, args.greedy_images)
        assert args.json is not None
        args.json.write_text(json.dumps(result))
        return 0
    if args.lone_key:
        try:
            bounds = [float(x) for x in args.lone_key.split(",")]
        except ValueError:
            parser.error(f"--lone-key wants milliseconds like 0,100,50, got {args.lone_key!r}")
        rates = lone_key_rates(bounds, seconds=args.seconds, rounds=args.rounds, dtype=args.dtype)
        print("| --max-batch-ms | img/s, each round | median |\n|---|---|---|")
        for bound, per_round in rates.items():
            print(f"| {bound:g} | {' / '.join(f'{r:.0f}' for r in per_round)} | {median(per_round):.0f} |")
        return 0
    result = run_tenants(
        args.seconds,
        greedy_images=args.greedy_images,
        ingest_workers=args.ingest_workers,
        light_priority=args.light_priority,
        max_batch_ms=args.max_batch_ms,
        dtype=args.dtype,
    )
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
