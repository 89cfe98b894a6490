"""How much memory anonymous near-limit requests make a teacher server hold: start `teacher-server serve` (tiny
model, its own SQLite ledger), send N concurrent Infer calls of M MiB each WITHOUT an API key, and report the
server's peak resident memory (VmHWM) before and after, and what the calls got back.

    PYTHONPATH=$PWD python scripts/auth_payload_rss.py --messages 4 --mib 192

Run it with PYTHONPATH pointing at another checkout to compare versions of the server.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from teacher_server.launcher import LaunchError, Ready, ServerProcess

INFER = "/maskedkd.v1.TeacherService/Infer"


def _status_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert match, f"no {field} in /proc/{pid}/status"
    return int(match.group(1))


def _request_bytes(mib: int) -> bytes:
    """A serialized InferRequest with `mib` MiB of uint8 pixels (images [B, 3, 512, 512])."""
    from maskedkd.v1 import teacher_pb2 as pb

    batch = max(1, mib * 1024 * 1024 // (3 * 512 * 512))
    tensor = pb.Tensor(dtype="uint8", shape=[batch, 3, 512, 512], data=bytes(batch * 3 * 512 * 512))
    return pb.InferRequest(request_id="anon", images=tensor).SerializeToString()


def _start_server(workdir: str) -> tuple[ServerProcess, Ready]:
    argv = [
        sys.executable,
        "-m",
        "teacher_server.cli",
        "serve",
        "--model",
        "vit_tiny_patch16_224",
        "--model-kwargs",
        '{"img_size": 32, "patch_size": 4, "num_classes": 10}',
        "--port",
        "0",
        "--no-metrics",
        "--db",
        f"sqlite:///{workdir}/ledger.db",
    ]
    server = ServerProcess(argv, log=Path(workdir) / "teacher-server.log")
    try:
        return server, server.start(timeout_s=120)
    except LaunchError as err:
        raise SystemExit(f"teacher-server did not start: {err}") from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=4, help="concurrent anonymous calls")
    parser.add_argument("--mib", type=int, default=192, help="size of each message in MiB")
    args = parser.parse_args()
    payload = _request_bytes(args.mib)
    with tempfile.TemporaryDirectory() as workdir:
        server, ready = _start_server(workdir)
        pid, address = ready.pid, ready.address
        try:
            time.sleep(1.0)
            before_hwm, before_rss = _status_kib(pid, "VmHWM"), _status_kib(pid, "VmRSS")
            limit = 300 * 1024 * 1024
            with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", limit)]) as channel:
                call = channel.unary_unary(INFER)  # bytes in, bytes out: the payload is serialized once

                def anonymous(_: int) -> tuple[str, float]:
                    start = time.perf_counter()
                    try:
                        call(payload, timeout=120)
                        return "OK", time.perf_counter() - start
                    except grpc.RpcError as err:
                        return err.code().name, time.perf_counter() - start

                with ThreadPoolExecutor(args.messages) as pool:
                    results = list(pool.map(anonymous, range(args.messages)))
            time.sleep(0.5)
            after_hwm = _status_kib(pid, "VmHWM")
        finally:
            server.stop()
    codes = sorted({code for code, _ in results})
    slowest = max(seconds for _, seconds in results)
    print(
        f"server {os.environ.get('PYTHONPATH', '').split(':')[0] or '.'}: {args.messages} x {args.mib} MiB "
        f"without a key -> {', '.join(codes)} (slowest answer {slowest:.2f} s); server RSS {before_rss / 1024:.0f} "
        f"MiB, peak RSS {before_hwm / 1024:.0f} -> {after_hwm / 1024:.0f} MiB "
        f"(+{(after_hwm - before_hwm) / 1024:.0f} MiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
