"""TeacherClient: the blocking gRPC client a student uses to get masked-teacher logits and what they cost.

>>> client = TeacherClient("teacher.example:50051", api_key)
>>> info = client.info()                                  # resolution, patch grid, price (cached)
>>> logits, usage = client.infer(images=x, keep_indices=keep)   # x: [B, C, H, W] in 0..1, keep: [B, K]

By default only the kept patches travel (uint8 when the pixels are exactly k/255, else float16). Every call carries a
request_id; a retry after UNAVAILABLE / DEADLINE_EXCEEDED reuses it, so the server answers a retried request from its
ledger and never bills it twice. Such failures are retried for up to `patience_s` (`retry.py`), long enough
to ride out a teacher restart.

When the server refuses an id it cannot replay -- ALREADY_EXISTS (it billed that id before for different content, e.g. a
resumed run whose patch selection flipped a near-tie) or FAILED_PRECONDITION (the stored answer has expired) -- the
client follows `resend.py`: with `reuse_billed_answers` (the training loop's setting) an ALREADY_EXISTS is
answered with what the teacher billed under that id, unbilled; otherwise the request is sent again under `<id>.r1`
(then `.r2`, ...), billed as new work. Both are warned about once and counted (`mismatched_requests`,
`rebilled_requests`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypedDict, TypeVar, Unpack

import grpc
import torch

from maskedkd.torch_threads import helper_pool
from maskedkd.v1 import teacher_pb2 as pb
from student_client.errors import TeacherError
from student_client.transport.channel import is_unix_socket, on_this_host, open_channel
from student_client.transport.off_thread import DeviceMark, after, mark_after_caller
from student_client.transport.outgoing import OutgoingRequest, TeacherStub
from student_client.transport.resend import CountsRefusedReplays, RefusedReplays, ResendPlan
from student_client.transport.retry import DEFAULT_PATIENCE_S, RetryPolicy
from student_client.transport.shared_pixels import SharedPixels, nothing_to_release
from student_client.transport.tls import channel_credentials
from student_client.transport.wire import (
    Batch,
    InferResult,
    ModelInfo,
    Usage,
    arguments_of,
    decode_response,
    join_results,
)

T = TypeVar("T")


class ClientSettings(TypedDict, total=False):
    """The keyword settings of `ClientCore` (what they mean and their defaults: its `__init__`), as a client that
    adds its own passes them on."""

    timeout_s: float
    max_retries: int
    backoff: float
    max_message_mb: float
    model: str | None
    tls: bool
    root_certificates: bytes | None
    patience_s: float
    ca_file: str | None
    client_cert: str | None
    client_key: str | None
    reuse_billed_answers: bool
    connections: int


class ClientCore(CountsRefusedReplays):
    """What the blocking and the asyncio client share: settings, retry policy, API key, channel and stub."""

    aio = False  # an asyncio channel (grpc.aio) instead of a blocking one

    def __init__(
        self,
        target: str,
        api_key: str,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff: float = 0.25,
        max_message_mb: float = 64.0,
        model: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        patience_s: float = DEFAULT_PATIENCE_S,
        ca_file: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        reuse_billed_answers: bool = False,
        connections: int = 1,
    ) -> None:
        if not isinstance(connections, int) or connections < 1:
            raise ValueError(f"connections must be a whole number >= 1, got {connections!r}")
        self.target = target
        self.timeout_s = timeout_s  # deadline of one attempt
        self.max_retries = max_retries  # retries after UNAVAILABLE / DEADLINE_EXCEEDED, at least (see patience_s)
        self.backoff = backoff  # first retry waits ~backoff seconds, then doubles
        self.patience_s = patience_s  # keep retrying a transient failure (teacher restarting) this long
        self.retry = RetryPolicy(
            target, timeout_s=timeout_s, patience_s=patience_s, min_retries=max_retries, backoff_s=backoff
        )
        self.refused_replays = RefusedReplays()  # re-sent ids the teacher could not replay (resend.py)
        self.reuse_billed_answers = reuse_billed_answers  # see student_client/transport/resend.py
        self.max_message_mb = max_message_mb
        self.model = model  # None: the server's default model
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        # one channel over one or many replicas (round-robin, health-checked): see student_client/transport/channel.py
        # TLS when asked for or when any TLS file is given (ca_file None: the system's root certificates)
        creds = channel_credentials(
            tls=tls,
            ca_file=ca_file,
            client_cert=client_cert,
            client_key=client_key,
            root_certificates=root_certificates,
        )
        # `connections` > 1: that many connections, calls taking turns over them (one connection carries every call
        # of a channel, and a teacher with --ingest-workers gives each connection to one of its processes)
        self._raw_channels = [
            open_channel(
                target, max_message_mb=max_message_mb, credentials=creds, aio=self.aio, own_connection=connections > 1
            )
            for _ in range(connections)
        ]
        self._raw_channel = self._raw_channels[0]
        self.channels = [self._intercepted(c) for c in self._raw_channels]
        self.channel = self.channels[0]
        self._stubs = [TeacherStub(c) for c in self.channels]
        self._turn = itertools.count()
        self._info: ModelInfo | None = None

    @property
    def stub(self) -> TeacherStub:
        """The stub of the connection whose turn it is (round-robin over `connections`)."""
        return self._stubs[next(self._turn) % len(self._stubs)]

    @property
    def connections(self) -> int:
        return len(self._stubs)

    def stub_at(self, connection: int) -> TeacherStub:
        """The stub of one connection (0 .. connections - 1), e.g. for a stream kept on it."""
        return self._stubs[connection]

    def raw_channel_at(self, connection: int) -> Any:
        """One connection's channel without interceptors (for connectivity checks)."""
        return self._raw_channels[connection]

    def _intercepted(self, channel: Any) -> Any:
        """The channel the stub calls through (a client with interceptors wraps `channel` in them)."""
        return channel


class TeacherClient(ClientCore):
    """Blocking client for `maskedkd.v1.TeacherService`; thread-safe (one channel, shared by threads).

    Besides `ClientCore`'s settings: `interceptors` wrap every call; `request_log` (debug) appends the sha256 of
    every request sent to that file (`log_request`)."""

    def __init__(
        self,
        target: str,
        api_key: str,
        *,
        interceptors: Sequence[grpc.UnaryUnaryClientInterceptor] = (),
        request_log: str | Path | None = None,
        shared_memory: bool = False,
        **settings: Unpack[ClientSettings],
    ) -> None:
        self._interceptors = tuple(interceptors)
        # pixels through shared memory (shared_pixels.py) when the teacher is on this host and reads
        # them (ModelInfo.shared_memory); else, with a warning, in the message as usual
        self.shared_memory = shared_memory
        self._shared: SharedPixels | None = None
        self._shared_checked = False
        self.request_log = Path(request_log) if request_log else None  # debug: sha256 of every request sent
        super().__init__(target, api_key, **settings)
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _intercepted(self, channel: grpc.Channel) -> grpc.Channel:
        return grpc.intercept_channel(channel, *self._interceptors) if self._interceptors else channel

    # ---- calls ----------------------------------------------------------------------------------------------
    def info(self, *, refresh: bool = False) -> ModelInfo:
        """The served model's description (cached after the first call)."""
        with self._lock:
            if self._info is None or refresh:
                msg = self._call(self.stub.GetModelInfo, pb.ModelInfoRequest(model=self.model or ""))
                self._info = ModelInfo.from_proto(msg)
            return self._info

    @arguments_of(Batch)
    def infer(self, batch: Batch) -> InferResult:
        """Teacher logits [B, num_classes] float32 and the Usage billed.

        images: [B, C, H, W] un-normalized (uint8 or float 0..1), resized bilinearly to the teacher's resolution
        when it differs. patches: [B, K, C, P, P] already cut (then keep_indices is required). keep_indices: [B, K]
        row-major on the teacher's grid (None: all patches). keep_counts: [B] for ragged rows. A batch larger than
        the server's max_batch_images is split into requests `<request_id>.<i>`. purpose: what the requests are
        for, as the teacher's usage reports total them apart: '' (training targets) or 1-32 characters of [a-z0-9_-]
        such as "probe"; billed the same either way. outputs: extra outputs of the kept patches besides logits
        (`ModelInfo.outputs` lists what the teacher offers), returned in `result.outputs`; billed the same FLOPs.
        """
        parts = batch.requests(self.info(), self.model)
        return join_results([decode_response(self.infer_request(req)) for req in parts])

    def infer_request(self, request: OutgoingRequest | pb.InferRequest) -> pb.InferResponse:
        """Send one built request (retried per the policy); a refused replay goes on as `resend.py` says."""
        req = OutgoingRequest.of(request)
        plan = ResendPlan(req, self.reuse_billed_answers)
        sent, release = self.shared_request(req)
        try:
            while True:
                self.log_request(req)
                if sent is not req:  # the plan's changes, onto the copy placed in shared memory
                    sent.message.request_id = req.message.request_id
                    sent.message.accept_billed_answer = req.message.accept_billed_answer
                try:
                    return self._call(self.stub.Infer, sent)
                except TeacherError as err:
                    if (step := plan.after(err)) is None:
                        raise
                    self.refused_replays.note(plan, step, str(err))
        finally:
            release()

    def shared_request(self, req: OutgoingRequest) -> tuple[OutgoingRequest, Callable[[], None]]:
        """`req` as it is sent, and what to call once its answer is in: with `shared_memory` (and a teacher on this
        host that reads it) its pixels in a region of this client's until then; else `req` itself."""
        if not self._use_shared_memory():
            return req, nothing_to_release
        assert self._shared is not None
        return self._shared.place(req)

    def _use_shared_memory(self) -> bool:
        if not self.shared_memory:
            return False
        with self._lock:
            checked = self._shared_checked
        if not checked:
            why = None
            if not on_this_host(self.target):
                why = f"{self.target} is not on this host (a loopback address or localhost)"
            elif is_unix_socket(self.target):
                why = "over a unix: socket the teacher cannot tell which user calls (it reads only its owner's regions)"
            elif not self.info().shared_memory:
                why = "the teacher does not read shared memory (start it with --shared-memory)"
            if why is not None:
                print(f"student-client: warning: pixels go in the messages: {why}", file=sys.stderr)
            with self._lock:
                if not self._shared_checked:
                    self._shared = SharedPixels() if why is None else None
                    self._shared_checked = True
        return self._shared is not None

    def log_request(self, req: OutgoingRequest) -> None:
        """With `request_log`: append {request_id, content_sha256, pid} as one JSON line, where content_sha256 is the
        sha256 of the serialized request without its request_id (what must match when a resumed run re-sends it)."""
        if self.request_log is None:
            return
        content = pb.InferRequest()
        content.CopyFrom(req.message)
        content.request_id = ""
        digest = hashlib.sha256(OutgoingRequest(content, req.pixels).serialize()).hexdigest()
        line = json.dumps({"request_id": req.request_id, "content_sha256": digest, "pid": os.getpid()})
        with self._log_lock, self.request_log.open("a") as f:
            f.write(line + "\n")

    def check_key(self) -> None:
        """Raise TeacherAuthError unless the server accepts the API key. Free: opens an InferStream with no
        requests (the server checks the key before reading any), so nothing runs and nothing is billed."""

        def drain_empty_stream(_request: None, **call: Any) -> None:
            for _ in self.stub.InferStream(iter(()), **call):
                pass

        self._call(drain_empty_stream, None)

    def submit(self, images: torch.Tensor | None = None, **kwargs: Any) -> Future[InferResult]:
        """`infer` on a background thread (on CUDA, its device work right after the caller's work queued so far:
        off_thread.py); the Future resolves to (logits, usage) or raises a TeacherError."""
        with self._lock:
            if self._pool is None:
                self._pool = helper_pool(4, "teacher-client")  # never an OpenMP team beside training's
            pool = self._pool
        mark = mark_after_caller(images, kwargs.get("patches"), kwargs.get("keep_indices"))
        return pool.submit(self._infer_after, mark, images, **kwargs)

    def _infer_after(self, mark: DeviceMark | None, images: torch.Tensor | None, **kwargs: Any) -> InferResult:
        with after(mark):
            return self.infer(images, **kwargs)

    # ---- plumbing -------------------------------------------------------------------------------------------
    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    @property
    def raw_channel(self) -> grpc.Channel:
        """The channel without interceptors (for connectivity checks)."""
        return self._raw_channel

    def _call(self, method: Callable[..., T], request: Any) -> T:
        """One unary call under the retry policy: retries wait for the channel (wait_for_ready) within the patience."""
        attempts = self.retry.start()
        while True:
            try:
                result = method(
                    request, timeout=attempts.timeout(), metadata=self._metadata, wait_for_ready=attempts.waiting
                )
            except grpc.RpcError as err:
                attempts.sleep(attempts.failed(err))
                continue
            attempts.succeeded()
            return result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._shared is not None:
            self._shared.close()
        for channel in self._raw_channels:
            channel.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["InferResult", "ModelInfo", "TeacherClient", "TeacherError", "Usage"]
