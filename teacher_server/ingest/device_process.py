"""The device process of `serve --ingest-workers N`: the one teacher, running the sealed micro-batches of every
ingest worker in the order one fair queue would run them: the best priority class first, then the smallest start tag
on the workers' shared clock (on a GPU, those that queued up during a forward together).

It loads and checks the teacher as a lone server does (teacher_loader.py), tells the supervisor what it serves (with
a weightless copy of the teacher on the meta device, for the workers' checks and meters), then answers each worker's
`BatchCall`s on that worker's socket. Rows are read where the worker staged them (shared memory, no copy on a CPU
teacher; one copy to the device on CUDA). It holds no money: a batch whose forward fails is answered with the reason
and the worker bills nothing of it. It ends when every worker has closed its socket.
"""

from __future__ import annotations

import copy
import io
import itertools
import logging
import mmap
import os
import queue
import signal
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle

import torch

from maskedkd.masked_teacher import MaskedTeacher
from maskedkd.text import first_line
from maskedkd.torch_threads import helper_thread
from teacher_server.engine.batching.scheduler import ComputeEstimate
from teacher_server.engine.rows.rows_runner import RowsRunner
from teacher_server.engine.rows.shared_host import pin_for_cuda, unpin_for_cuda, view_region
from teacher_server.engine.rows.staging import StagedRows, join_rows
from teacher_server.ingest.children import die_with_supervisor
from teacher_server.ingest.class_backlog import ClassBacklog, DeviceBacklog
from teacher_server.ingest.messages import BatchCall, BatchReply, DeviceFailed, DeviceReady, NewRegion, TensorRef
from teacher_server.ingest.pending_call import PendingCall
from teacher_server.metrics import ServerMetrics
from teacher_server.settings import ServerSettings

log = logging.getLogger(__name__)

# A call held back for a better class another worker holds waits at most this long (that worker's next call comes
# within a few ms of its last reply; longer means it is stuck behind its own ledger, and the teacher should not idle)
HOLD_FOR_BETTER_CLASS_S = 0.02
HOLD_POLL_S = 0.001  # while holding, the backlog is read again this often


def meta_copy(teacher: MaskedTeacher) -> bytes:
    """The teacher without its weights (on the meta device), saved: what a worker needs to check and meter requests."""
    memo: dict[int, object] = {}
    for t in [*teacher.parameters(), *teacher.buffers()]:
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = (
            torch.nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else empty
        )
    out = io.BytesIO()
    torch.save(copy.deepcopy(teacher, memo), out)
    return out.getvalue()


class DeviceLoop:
    """Runs the workers' calls: a thread per worker socket reads its calls' rows (on CUDA: copies them to the card on
    a stream of its own, while the forward in progress runs); one forward thread runs them by `PendingCall.order`:
    best priority class, smallest start tag, arrival. With `backlog` (what each worker holds: class_backlog.py), a
    call is held back, for at most `hold_s`, while a worker with no call here holds requests of a better class, or has
    formed a batch or queued a request that goes first: its call is on its way (a worker has one call here at a time,
    and forms the next while it runs). A worker a hold ran out for is not waited for again until a call of its own
    arrives: it holds work it cannot send (behind its own slow ledger, say), and every later choice would idle the
    teacher as long. With `merge`, the logits-only calls that queued up while a forward ran go into the next forward
    together (up to `max_images` images and `token_budget` tokens): N workers' small batches become one, as a lone
    server's micro-batcher would have made them. Off on a CPU teacher, whose forward costs the same per image in small
    batches and where joining copies the rows (on CUDA the join is a copy on the card)."""

    def __init__(
        self,
        runner: RowsRunner,
        device: torch.device,
        metrics: ServerMetrics,
        *,
        prefix: int = 1,
        merge: bool | None = None,
        max_images: int = 256,
        token_budget: int = 65536,
        backlog: ClassBacklog | None = None,
        hold_s: float = HOLD_FOR_BETTER_CLASS_S,
    ) -> None:
        self._runner = runner
        self._prefix = prefix  # prefix tokens per row (the batch's token count)
        self._device = device
        self._metrics = metrics
        self._merge = device.type != "cpu" if merge is None else merge
        self._max_images = max_images
        self._token_budget = token_budget
        self._backlog: DeviceBacklog | None = backlog.reader() if backlog is not None else None
        self._hold_s = hold_s
        self._calls: queue.Queue[PendingCall | None] = queue.Queue()  # None: every worker is gone
        self._waiting: list[PendingCall] = []  # taken from `_calls` by the forward thread, not run yet
        self._connected: set[int] = set()  # the workers whose socket is open
        self._arrivals = itertools.count()
        self._hold_started: float | None = None  # monotonic: when the teacher began to wait in a hold
        self._held_for: set[int] = set()  # the workers the hold in progress waits for
        self._not_waited_for: set[int] = set()  # workers a hold ran out for, until a call of theirs arrives
        self.compute = ComputeEstimate()  # of this teacher's forward alone (a worker's includes the wait here)

    def queued(self) -> int:
        """Calls waiting for the forward thread (the one running excluded)."""
        return self._calls.qsize() + len(self._waiting)

    def connected(self) -> set[int]:
        """The workers whose socket is open."""
        return set(self._connected)

    def serve(self, conns: list[Connection]) -> None:
        """The workers' calls, until every worker's connection closed. The forward runs on this thread, the one that
        loaded the teacher, so that its OpenMP team is the process's only one (maskedkd/torch_threads.py)."""
        self._connected.update(range(len(conns)))
        threads = [
            threading.Thread(target=self._serve_worker, args=(i, conn), name=f"device-worker-{i}", daemon=True)
            for i, conn in enumerate(conns)
        ]
        for t in threads:
            t.start()

        def end_when_workers_gone() -> None:
            for t in threads:
                t.join()
            self._calls.put(None)

        threading.Thread(target=end_when_workers_gone, name="device-workers-gone", daemon=True).start()
        self._forward_loop()

    def _serve_worker(self, index: int, conn: Connection) -> None:
        helper_thread()
        try:
            self._serve_calls(index, conn)
        finally:
            self._connected.discard(index)

    def _serve_calls(self, index: int, conn: Connection) -> None:
        regions: dict[int, mmap.mmap] = {}
        # CUDA: this worker's rows are copied on a stream of its own, overlapping the forward in progress (a copy on
        # the default stream would wait for it)
        copies = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        while True:
            try:
                message = conn.recv()
                if isinstance(message, NewRegion):
                    fd = recv_handle(conn)
                    try:
                        regions[message.id] = mmap.mmap(fd, message.nbytes)
                    finally:
                        os.close(fd)
                    if self._device.type == "cuda":
                        pin_for_cuda(regions[message.id])
                    continue
                conn.send(self._answer(index, message, regions, copies))
            except (EOFError, OSError):  # the worker closed its socket (stopped, or died): nothing more to run
                log.info("ingest worker %d disconnected", index)
                if self._device.type == "cuda":
                    for mapping in regions.values():  # before the mappings go: CUDA must not hold freed pages
                        unpin_for_cuda(mapping)
                return

    def _answer(
        self, worker: int, call: BatchCall, regions: dict[int, mmap.mmap], copies: torch.cuda.Stream | None
    ) -> BatchReply:
        """Worker thread: the call's rows read (on CUDA: copied on `copies`), then its reply from the forward thread."""
        try:
            counts = torch.tensor(call.counts, dtype=torch.int64)
            host = (self._host_tensor(call.pixels, regions), self._host_tensor(call.indices, regions))
            if copies is None:
                rows = StagedRows(*host, counts, call.uniform, slot=0)
            else:
                with torch.cuda.stream(copies):  # pinned regions: asynchronous; the forward waits for `ready`
                    moved = [t.to(self._device, non_blocking=True) for t in host]
                    ready = torch.cuda.Event()
                    ready.record(copies)
                rows = StagedRows(moved[0], moved[1], counts, call.uniform, slot=0, ready=ready)
        except Exception as exc:  # noqa: BLE001 - answered to the worker, which bills nothing of the batch
            log.exception("could not read a batch's rows")
            self._received(worker, call)
            return _failed(first_line(exc))
        tokens = sum(call.counts) + self._prefix * len(call.counts)
        pending = PendingCall(call, rows, tokens, worker=worker, seq=next(self._arrivals))
        self._calls.put(pending)
        self._received(worker, call)  # after the put: the forward thread finds the call queued, or still held
        pending.done.wait()
        return pending.reply or _failed("the device's forward thread stopped")

    def _received(self, worker: int, call: BatchCall) -> None:
        if self._backlog is not None:
            self._backlog.received(worker, [job.rank for job in call.jobs])

    def _forward_loop(self) -> None:
        waiting = self._waiting
        ending = False  # every worker is gone: run what waits, then stop
        while True:
            if not waiting:
                if ending:
                    return
                ending = self._receive(None)
                continue
            received = self._backlog.snapshot() if self._backlog is not None else []  # before the calls are read
            ending = self._receive(0.0) or ending
            first = min(waiting, key=lambda p: p.order)
            hold = 0.0 if ending else self._hold_for_better_call(first, received)
            if hold > 0:
                if self._hold_started is None:
                    self._hold_started = time.monotonic()
                ending = self._receive(min(hold, HOLD_POLL_S))  # a new call ends the wait; the backlog is read again
                continue
            self._hold_ended(first)
            waiting.remove(first)
            for pending in waiting:  # a hold bounds one wait of the teacher: the next one starts anew
                pending.held_until = None
            group = [first]
            if self._merge and first.logits_only:
                group += self._joining(first)
            try:
                self._run(group)
            except Exception as exc:  # noqa: BLE001 - the workers hand it to every caller of the batch, unbilled
                log.exception("forward failed")
                for pending in group:
                    pending.reply = _failed(f"the teacher's forward failed: {first_line(exc)}")
            finally:
                for pending in group:
                    pending.done.set()

    def _hold_ended(self, first: PendingCall) -> None:
        """Count the hold that ends as `first` runs: it ran out when `first` is the call held and its limit passed."""
        if self._hold_started is None:
            return
        now = time.monotonic()
        ran_out = first.held_until is not None and now >= first.held_until
        if ran_out:
            self._not_waited_for |= self._held_for
        self._metrics.device_holds.labels(outcome="ran_out" if ran_out else "ended").inc()
        self._metrics.device_hold_seconds.inc(now - self._hold_started)
        self._hold_started = None
        self._held_for = set()

    def _receive(self, timeout: float | None) -> bool:
        """Forward thread: the calls queued now (waiting up to `timeout` for the first; None: until one comes) into
        `_waiting`; True when every worker is gone."""
        try:
            item = self._calls.get(timeout=timeout)
        except queue.Empty:
            return False
        ended = False
        while True:
            if item is None:
                ended = True
            else:
                self._waiting.append(item)
                self._not_waited_for.discard(item.worker)  # it sends again: worth a wait from here on
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return ended

    def _hold_for_better_call(self, first: PendingCall, received: list[tuple[int, ...]]) -> float:
        """How much longer to hold `first` (the best call waiting) back: while a connected worker with no call here
        holds requests of a better class, or has formed a batch or queued a request that goes before `first` (same
        class, smaller start tag), up to `hold_s` from when that was first seen; 0: run it."""
        if self._backlog is None:
            return 0.0
        here = {p.worker for p in self._waiting} | self._not_waited_for
        self._held_for = {w for w in list(self._connected) if w not in here and self._goes_before(first, w, received)}
        if not self._held_for:
            return 0.0
        now = time.monotonic()
        if first.held_until is None:
            first.held_until = now + self._hold_s
        return max(0.0, first.held_until - now)

    def _goes_before(self, first: PendingCall, worker: int, received: list[tuple[int, ...]]) -> bool:
        """Whether `worker` holds what goes before `first`: requests of a better class, or a formed batch or a queued
        request of a smaller (class, start tag)."""
        assert self._backlog is not None
        best = self._backlog.best_rank(worker, received)
        if best is not None and best < first.rank:
            return True
        formed = self._backlog.next_call(worker, received)
        if formed is not None and formed < (first.rank, first.tag):
            return True
        queued = self._backlog.queued_head(worker)
        return queued is not None and queued < (first.rank, first.tag)

    def _joining(self, first: PendingCall) -> list[PendingCall]:
        """The calls waiting now that fit into `first`'s forward (best class first); the others keep waiting."""
        joined: list[PendingCall] = []
        images, tokens = first.rows.images, first.tokens
        for pending in sorted(self._waiting, key=lambda p: p.order):
            more = (
                pending.logits_only
                and pending.rows.pixels.dtype == first.rows.pixels.dtype
                and images + pending.rows.images <= self._max_images
                and tokens + pending.tokens <= self._token_budget
            )
            if more:
                joined.append(pending)
                images += pending.rows.images
                tokens += pending.tokens
        for pending in joined:
            self._waiting.remove(pending)
        return joined

    def _run(self, group: list[PendingCall]) -> None:
        """Forward thread: one forward for the group; each call's reply is its rows of the result."""
        for pending in group:
            if pending.rows.ready is not None:  # copied on its worker's stream: the forward's stream waits for it
                current = torch.cuda.current_stream(self._device)
                current.wait_event(pending.rows.ready)
                pending.rows.pixels.record_stream(current)  # freed memory is reused only once the forward is done
                pending.rows.indices.record_stream(current)
        # A worker checked its requests' deadlines when it sent the batch; it may have waited here since, behind
        # other workers' batches. A request whose caller gives up before this forward would end is not run (its
        # worker refuses it, unbilled), as a lone server's forward thread does (batch_job.still_wanted).
        forward_s = self.compute.seconds(sum(p.tokens for p in group))
        group = [p for p in group if p.cut_late(time.monotonic(), forward_s, self._prefix)]
        if not group:
            return
        rows = join_rows([p.rows for p in group])
        jobs = [job for p in group for job in p.jobs_run]
        tokens = sum(p.tokens for p in group)
        with torch.inference_mode(), self._metrics.stage("forward"):
            started = time.monotonic()
            logits, outputs = self._runner.run(rows, jobs)  # [sum G, classes] float32 CPU
            seconds = time.monotonic() - started
        self._metrics.compute_seconds.observe(seconds)
        self.compute.observe(tokens, seconds)
        self._metrics.batch_images.observe(rows.images)
        self._metrics.batch_tokens.observe(tokens)
        replies = []
        parts = torch.split(logits, [p.rows.images for p in group])
        start = 0
        for pending, part in zip(group, parts, strict=True):
            run = len(pending.jobs_run)
            mine = outputs[start : start + run]
            start += run
            replies.append(
                BatchReply(
                    bytearray(part.contiguous().numpy().tobytes()),
                    int(logits.shape[1]),
                    tuple(None if extra is None else extra.SerializeToString() for extra in mine),
                    late=pending.late,
                    forward_s=pending.forward_s,
                )
            )
        for pending, reply in zip(group, replies, strict=True):  # all or none: a failure above answers each with it
            pending.reply = reply

    @staticmethod
    def _host_tensor(ref: TensorRef, regions: dict[int, mmap.mmap]) -> torch.Tensor:
        mapping = regions.get(ref.region)
        if mapping is None:
            raise ValueError(f"region {ref.region} was never handed over")
        return view_region(mapping, ref.offset, ref.torch_dtype, ref.shape)


def _failed(reason: str) -> BatchReply:
    return BatchReply(bytearray(), 0, (), error=reason)


def device_main(settings: ServerSettings, conns: list[Connection], ready: Connection, backlog: ClassBacklog) -> None:
    """Entry of the device process (forked by the fork server)."""
    die_with_supervisor()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C: the supervisor stops the workers, then us
    logging.basicConfig(level=logging.INFO, format="%(asctime)s device %(name)s %(levelname)s %(message)s")
    from teacher_server.engine.served_model import rows_runner_for
    from teacher_server.engine.teacher.teacher_loader import ModelLoadError, load_teacher

    metrics = ServerMetrics(process="device")  # it ingests nothing; its forward, batches and dtype check count
    try:
        name, teacher, fidelity = load_teacher(settings)
        runner = rows_runner_for(name, teacher, settings, metrics)
    except ModelLoadError as exc:
        ready.send(DeviceFailed(first_line(exc)))
        return
    weight = next(teacher.parameters())
    metrics.dtype_agreement.labels(model=name, dtype=fidelity.dtype).set(fidelity.agreement)
    metrics.dtype_kl.labels(model=name, dtype=fidelity.dtype).set(fidelity.kl)
    ready.send(DeviceReady(name, meta_copy(teacher), fidelity))
    ready.close()
    DeviceLoop(
        runner,
        weight.device,
        metrics,
        prefix=teacher.geometry.num_prefix_tokens,
        max_images=settings.max_batch_images,
        token_budget=settings.token_budget,
        backlog=backlog,
    ).serve(conns)
