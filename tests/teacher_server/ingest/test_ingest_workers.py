"""`teacher-server serve --ingest-workers 2` as a user runs it: two processes share the port, one device process runs
the teacher. Answers equal the in-process reference, every request is billed once by whichever worker took it (read
back with SQL), a retry on another connection replays, both workers ingest (their byte counters add up to the bytes
sent; also from one client's connections, by unary calls and by streams), SIGTERM drains; a dead device process
fails calls UNAVAILABLE, unbilled, and stops the server; a killed supervisor leaves none of its processes behind."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import service_testkit as kit
import torch
from dtype_marks import child_env

from maskedkd.checkpoints import save_model_checkpoint
from maskedkd.v1 import teacher_pb2 as pb
from maskedkd.v1 import teacher_pb2_grpc as pb_grpc
from student_client.transport.client import TeacherClient
from student_client.transport.stream import TeacherStreams
from teacher_server.launcher import ServerProcess, serve_argv, teacher_server_command

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(240)]
CHANNELS = 16  # separate connections: the kernel spreads them over the workers by their addresses (1 in 2**15: all
# on one worker)


def create_key(db: str, name: str) -> str:
    argv = [*teacher_server_command(), "keys", "create", "--name", name, "--db", db]
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout.strip()


def start(tmp_path: Path, db: str, *flags: str) -> ServerProcess:
    model = kit.tiny_vit(seed=11)
    ckpt = save_model_checkpoint(tmp_path / "teacher.safetensors", model, model_name=kit.MODEL, model_kwargs=kit.TINY)
    argv = serve_argv(
        "--checkpoint", str(ckpt), "--dtype", "float32", "--port", "0", "--metrics-port", "0", "--db", db,
        "--max-delay-ms", "2", "--ingest-workers", "2", *flags,
    )  # fmt: skip
    return ServerProcess(argv, log=tmp_path / "serve.log", env=child_env())


def pids_of(log: Path) -> tuple[list[int], int]:
    found = re.search(r"ingest workers in pids ([\d, ]+), the teacher in pid (\d+)", log.read_text())
    assert found is not None, log.read_text()
    return [int(p) for p in found.group(1).split(", ")], int(found.group(2))


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie waits for a reaper this container may lack)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def ingested(metrics_url: str) -> dict[str, float]:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return {m[0]: float(m[1]) for m in re.findall(r'maskedkd_ingested_bytes_total\{process="(\d+)"\} (\S+)', text)}


def test_two_ingest_workers_answer_bill_and_replay_as_one_server(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    keys = {name: create_key(db, name) for name in ("ada", "bo")}
    ref = kit.Reference(kit.tiny_vit(seed=11))
    sent = {}  # request id -> (key name, images, keep)
    for c in range(CHANNELS):
        for i in range(3):
            batch, k = 1 + (c + i) % 3, 8 + (5 * c + 7 * i) % 50
            sent[f"c{c}-{i}"] = (
                "ada" if c % 2 else "bo",
                kit.random_images(batch, 100 * c + i),
                kit.random_keep(batch, k, c + i),
            )

    def client(c: int, prefix: str = "") -> list[pb.InferResponse]:
        # a connection of its own (grpc shares one between channels to the same target unless told not to)
        channel = grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
        teacher = pb_grpc.TeacherServiceStub(channel)
        with channel:
            return [
                teacher.Infer(kit.image_request(images, keep, request_id=rid), metadata=kit.auth(keys[name]))
                for rid, (name, images, keep) in sent.items()
                if rid.startswith(f"c{c}-")
            ]

    with start(tmp_path, db) as server:
        assert server.ready is not None and server.ready.metrics_url is not None
        workers, device = pids_of(tmp_path / "serve.log")
        assert len(workers) == 2 and device not in workers and server.pid not in (device, *workers)
        # a second server on the same port is refused, not let into the first one's SO_REUSEPORT group
        again = kit.serve_cli("--ingest-workers", "2", "--port", str(server.ready.port), "--db", db, "--no-metrics")
        assert again.returncode == 2 and again.stderr.count("\n") == 1 and "cannot listen" in again.stderr
        with ThreadPoolExecutor(CHANNELS) as pool:
            first = [r for rs in pool.map(client, range(CHANNELS)) for r in rs]
        for resp in first:
            _, images, keep = sent[resp.request_id]
            assert not resp.usage.replayed
            torch.testing.assert_close(kit.logits_of(resp), ref.logits(images, keep), **kit.CLOSE)
            assert resp.usage.gflops == ref.gflops([keep.shape[1]] * images.shape[0])
        by_process = ingested(server.ready.metrics_url)
        assert set(by_process) == {"0", "1"} and min(by_process.values()) > 0  # both workers took connections
        assert sum(by_process.values()) == sum(images.numel() for _, images, _ in sent.values())  # uint8: 1 B each

        with ThreadPoolExecutor(CHANNELS) as pool:  # the same ids on new connections: maybe the other worker
            retries = [r for rs in pool.map(client, reversed(range(CHANNELS))) for r in rs]
        answered = {r.request_id: r for r in first}
        for resp in retries:
            assert resp.usage.replayed and resp.logits.data == answered[resp.request_id].logits.data

        # the student's client: calls take turns over its connections, which the kernel spreads over the workers
        seen = ingested(server.ready.metrics_url)
        with TeacherClient(server.address, keys["ada"], connections=CHANNELS) as student:
            for i in range(CHANNELS):
                images, keep = kit.random_images(1, 900 + i), kit.random_keep(1, 20, i)
                logits, usage = student.infer(images=images, keep_indices=keep, request_id=f"student-{i}")
                torch.testing.assert_close(logits, ref.logits(images, keep), **kit.CLOSE)
                sent[f"student-{i}"] = ("ada", images, keep)
                answered[f"student-{i}"] = pb.InferResponse(usage=pb.Usage(gflops=usage.gflops))
        grew = {p: ingested(server.ready.metrics_url)[p] - seen[p] for p in seen}
        assert min(grew.values()) > 0 and sum(grew.values()) == CHANNELS * 20 * 3 * 4 * 4  # the kept patches

        # the default stream transport: a stream on each connection, so a trainer's batches reach every worker too
        seen = ingested(server.ready.metrics_url)
        with (
            TeacherClient(server.address, keys["ada"], connections=CHANNELS) as student,
            TeacherStreams(student) as streams,
        ):
            futures = {}
            for i in range(CHANNELS):
                images, keep = kit.random_images(1, 950 + i), kit.random_keep(1, 20, 50 + i)
                futures[f"stream-{i}"] = streams.submit(images=images, keep_indices=keep, request_id=f"stream-{i}")
                sent[f"stream-{i}"] = ("ada", images, keep)
            for rid, future in futures.items():
                logits, usage = future.result(timeout=60)
                torch.testing.assert_close(logits, ref.logits(*sent[rid][1:]), **kit.CLOSE)
                answered[rid] = pb.InferResponse(usage=pb.Usage(gflops=usage.gflops))
        grew = {p: ingested(server.ready.metrics_url)[p] - seen[p] for p in seen}
        assert min(grew.values()) > 0 and sum(grew.values()) == CHANNELS * 20 * 3 * 4 * 4
        assert server.stop() == 0  # SIGTERM: workers drain, then the device process ends
    log = (tmp_path / "serve.log").read_text()
    assert "teacher-server: stopped" in log and "Traceback" not in log
    assert not [pid for pid in (*workers, device) if running(pid)]

    with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:
        rows = conn.execute(
            "SELECT u.request_id, k.name, u.images, u.gflops FROM usage u JOIN api_keys k ON k.id = u.api_key_id"
        ).fetchall()
    assert sorted(r[0] for r in rows) == sorted(sent)  # each request billed once, retries not at all
    for rid, name, images, gflops in rows:
        assert (name, images, gflops) == (sent[rid][0], sent[rid][1].shape[0], answered[rid].usage.gflops)


def test_a_dead_device_process_fails_calls_unbilled_and_stops_the_server(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    key = create_key(db, "cy")
    with start(tmp_path, db) as server:
        _, device = pids_of(tmp_path / "serve.log")
        channel, teacher = kit.stub(server.address)
        images, keep = kit.random_images(2, 1), kit.random_keep(2, 16, 1)
        assert not teacher.Infer(
            kit.image_request(images, keep, request_id="before"), metadata=kit.auth(key)
        ).usage.replayed
        os.kill(device, signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as failed:
            teacher.Infer(kit.image_request(images, keep, request_id="after"), metadata=kit.auth(key), timeout=30)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()
        assert server.wait(60) == 1  # the supervisor stops the workers and says it failed
    log = (tmp_path / "serve.log").read_text()
    assert "teacher-device exited unexpectedly" in log
    with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:
        assert [r[0] for r in conn.execute("SELECT request_id FROM usage")] == ["before"]


def parent_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^PPid:\s+(\d+)$", status, re.M)
    assert found is not None, status
    return int(found.group(1))


def test_a_killed_supervisor_takes_its_workers_and_the_device_process_with_it(tmp_path: Path) -> None:
    """SIGKILL leaves the supervisor no time to stop anything: its children (and the fork server that forked them)
    must still end on their own, not serve on without it."""
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    with start(tmp_path, db) as server:
        workers, device = pids_of(tmp_path / "serve.log")
        children = [*workers, device]
        forked_by = {parent_of(pid) for pid in children} - {server.pid}  # the fork server, when one forked them
        assert server.pid is not None and all(running(pid) for pid in children)
        os.kill(server.pid, signal.SIGKILL)
        assert server.wait(30) == -signal.SIGKILL
        gone = [*children, *forked_by]
        deadline = time.monotonic() + 60
        while any(running(pid) for pid in gone) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in gone if running(pid)], (gone, (tmp_path / "serve.log").read_text()[-2000:])


def test_ingest_workers_need_a_shared_ledger(tmp_path: Path) -> None:
    done = kit.serve_cli("--ingest-workers", "2", "--db", "sqlite://", "--port", "0", "--no-metrics")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--ingest-workers needs a ledger the processes share" in done.stderr


def test_a_request_larger_than_a_batch_runs_in_chunks_through_the_device_process(tmp_path: Path) -> None:
    """With `--max-batch-ms 1`, a 48-image request (25 tokens an image: 1,200) on a worker whose compute estimate has
    seen its batches queues as three chunks that run at the device process one after another: answered equal to the
    in-process reference, billed once for all 48 images (its row's batch is its last chunk's), counted by the split
    metrics summed over the processes."""
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    key = create_key(db, "dee")
    ref = kit.Reference(kit.tiny_vit(seed=11))
    with start(tmp_path, db, "--max-batch-ms", "1") as server:
        assert server.ready is not None and server.ready.metrics_url is not None
        channel, teacher = kit.stub(server.address)  # one connection: one worker takes every call
        for i in range(3):  # teach that worker's compute estimate (its first batch is not counted)
            teacher.Infer(kit.image_request(kit.random_images(2, i), kit.random_keep(2, 24, i)), metadata=kit.auth(key))
        images, keep = kit.random_images(48, 40), kit.random_keep(48, 24, 41)
        response = teacher.Infer(kit.image_request(images, keep, request_id="big"), metadata=kit.auth(key))
        channel.close()
        text = urllib.request.urlopen(server.ready.metrics_url, timeout=10).read().decode()
        assert server.stop() == 0
    torch.testing.assert_close(kit.logits_of(response), ref.logits(images, keep), **kit.CLOSE)
    assert response.usage.gflops == ref.gflops([24] * 48)
    with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:
        rows = conn.execute("SELECT images, batch_images FROM usage WHERE request_id = 'big'").fetchall()
    assert rows == [(48, 16)]
    split = dict(re.findall(r"(maskedkd_split_(?:requests|chunks)_total)\{[^}]*\} (\S+)", text))
    assert split == {"maskedkd_split_requests_total": "1.0", "maskedkd_split_chunks_total": "3.0"}
