"""The device process of `serve --ingest-workers N`: the one teacher, running the sealed micro-batches of every
ingest worker, one at a time, in the order they come.

It loads and checks the teacher as a lone server does (teacher_loader.py), tells the supervisor what it serves (with
a weightless copy of the teacher on the meta device, for the workers' checks and meters), then answers each worker's
`BatchCall`s on that worker's socket. Rows are read where the worker staged them (shared memory, no copy on a CPU
teacher; one copy to the device on CUDA). It holds no money: a batch whose forward fails is answered with the reason
and the worker bills nothing of it. It ends when every worker has closed its socket.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import mmap
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle

import torch

from maskedkd.masked_teacher import MaskedTeacher
from maskedkd.text import first_line
from teacher_server.engine.rows_runner import RowsRunner
from teacher_server.engine.shared_host import view_region
from teacher_server.engine.staging import StagedRows
from teacher_server.ingest.children import die_with_parent
from teacher_server.ingest.messages import BatchCall, BatchReply, DeviceFailed, DeviceReady, NewRegion, TensorRef
from teacher_server.metrics import ServerMetrics
from teacher_server.settings import ServerSettings

log = logging.getLogger(__name__)


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


def pin_for_cuda(mapping: mmap.mmap) -> bool:
    """Register a mapped region as pinned host memory, so its copies to the GPU run at full speed (as the lone
    server's pinned staging buffers do). False (and pageable copies, still correct) when CUDA refuses."""
    view = torch.frombuffer(mapping, dtype=torch.uint8)
    try:
        error = torch.cuda.cudart().cudaHostRegister(view.data_ptr(), view.numel(), 0)
    except (RuntimeError, AttributeError):
        return False
    if int(getattr(error, "value", error)) != 0:
        log.warning("could not pin a shared staging region (%s); its copies to the GPU will be slower", error)
        return False
    return True


def unpin_for_cuda(mapping: mmap.mmap) -> None:
    with contextlib.suppress(RuntimeError, AttributeError):
        torch.cuda.cudart().cudaHostUnregister(torch.frombuffer(mapping, dtype=torch.uint8).data_ptr())


class DeviceLoop:
    """Runs each worker's calls (a thread per worker socket); one forward at a time."""

    def __init__(self, runner: RowsRunner, device: torch.device, metrics: ServerMetrics, *, prefix: int = 1) -> None:
        self._runner = runner
        self._prefix = prefix  # prefix tokens per row (the batch's token count)
        self._device = device
        self._metrics = metrics
        self._forward_lock = threading.Lock()

    def serve(self, conns: list[Connection]) -> None:
        threads = [
            threading.Thread(target=self._serve_worker, args=(i, conn), name=f"device-worker-{i}", daemon=True)
            for i, conn in enumerate(conns)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _serve_worker(self, index: int, conn: Connection) -> None:
        regions: dict[int, mmap.mmap] = {}
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
                reply = self._run(message, regions)
                conn.send(reply)
            except (EOFError, OSError):  # the worker closed its socket (stopped, or died): nothing more to run
                log.info("ingest worker %d disconnected", index)
                if self._device.type == "cuda":
                    for mapping in regions.values():  # before the mappings go: CUDA must not hold freed pages
                        unpin_for_cuda(mapping)
                return

    def _run(self, call: BatchCall, regions: dict[int, mmap.mmap]) -> BatchReply:
        try:
            rows = StagedRows(
                self._tensor(call.pixels, regions),
                self._tensor(call.indices, regions),
                torch.tensor(call.counts, dtype=torch.int64),
                call.uniform,
                slot=0,
            )
            with self._forward_lock, torch.inference_mode(), self._metrics.stage("forward"):
                started = time.monotonic()
                logits, outputs = self._runner.run(rows, call.jobs)  # [G, classes] float32 CPU
                self._metrics.compute_seconds.observe(time.monotonic() - started)
            self._metrics.batch_images.observe(len(call.counts))
            self._metrics.batch_tokens.observe(sum(call.counts) + self._prefix * len(call.counts))
        except Exception as exc:  # noqa: BLE001 - the worker hands it to every caller of the batch, unbilled
            log.exception("forward failed")
            return BatchReply(bytearray(), 0, (), error=f"the teacher's forward failed: {first_line(exc)}")
        return BatchReply(
            bytearray(logits.contiguous().numpy().tobytes()),
            int(logits.shape[1]),
            tuple(None if extra is None else extra.SerializeToString() for extra in outputs),
        )

    def _tensor(self, ref: TensorRef, regions: dict[int, mmap.mmap]) -> torch.Tensor:
        mapping = regions.get(ref.region)
        if mapping is None:
            raise ValueError(f"region {ref.region} was never handed over")
        host = view_region(mapping, ref.offset, ref.torch_dtype, ref.shape)
        return host if self._device.type == "cpu" else host.to(self._device)


def device_main(settings: ServerSettings, conns: list[Connection], ready: Connection) -> None:
    """Entry of the device process (multiprocessing, spawn)."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C: the supervisor stops the workers, then us
    logging.basicConfig(level=logging.INFO, format="%(asctime)s device %(name)s %(levelname)s %(message)s")
    from teacher_server.engine.served_model import rows_runner_for
    from teacher_server.engine.teacher_loader import ModelLoadError, load_teacher

    try:
        name, teacher, fidelity = load_teacher(settings)
        runner = rows_runner_for(name, teacher, settings)
    except ModelLoadError as exc:
        ready.send(DeviceFailed(first_line(exc)))
        return
    weight = next(teacher.parameters())
    metrics = ServerMetrics(process="device")  # it ingests nothing; its forward, batches and dtype check count
    metrics.dtype_agreement.labels(model=name, dtype=fidelity.dtype).set(fidelity.agreement)
    metrics.dtype_kl.labels(model=name, dtype=fidelity.dtype).set(fidelity.kl)
    ready.send(DeviceReady(name, meta_copy(teacher), fidelity))
    ready.close()
    DeviceLoop(runner, weight.device, metrics, prefix=teacher.geometry.num_prefix_tokens).serve(conns)
