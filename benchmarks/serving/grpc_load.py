"""Clients against a teacher server, each a thread with a channel (and connection) of its own, sending its requests one
call at a time: the load of the serving benchmarks (`benchmarks/serving/overhead.py`, `benchmarks/gpu/script.py`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import grpc

from maskedkd.v1 import teacher_pb2 as pb
from student_client.transport.outgoing import TeacherStub
from student_client.transport.shared_pixels import SharedPixels

OPTIONS = [
    ("grpc.max_send_message_length", 1 << 30),
    ("grpc.max_receive_message_length", 1 << 30),
    # a connection of its own (grpc otherwise shares one between channels to the same target): N clients are N
    # connections, as N trainers are, and a server's ingest workers each get some
    ("grpc.use_local_subchannel_pool", 1),
]


def client_load(
    address: str,
    api_key: str,
    per_client: Sequence[Sequence[pb.InferRequest]],
    *,
    timeout_s: float = 600.0,
    shared_memory: bool = False,
) -> tuple[float, list[pb.InferResponse], list[str]]:
    """Every client sends its requests, clients at once: (wall seconds, the answers, "CODE: details" of failures).
    `shared_memory`: each client passes the pixels through a region of its own
    (student_client/transport/shared_pixels.py)."""
    metadata = (("authorization", f"Bearer {api_key}"),)
    answers: list[pb.InferResponse] = []
    errors: list[str] = []

    def client(mine: Sequence[pb.InferRequest]) -> None:
        regions = SharedPixels() if shared_memory else None
        with grpc.insecure_channel(address, options=OPTIONS) as channel:
            stub = TeacherStub(channel)  # the client library's: a request placed in shared memory is an OutgoingRequest
            for request in mine:
                sent, release = regions.place(request) if regions is not None else (request, None)
                try:
                    answers.append(stub.Infer(sent, metadata=metadata, timeout=timeout_s))
                except grpc.RpcError as err:
                    errors.append(f"{err.code().name}: {err.details()}")
                finally:
                    if release is not None:
                        release()
        if regions is not None:
            regions.close()

    threads = [threading.Thread(target=client, args=(mine,)) for mine in per_client]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, answers, errors
