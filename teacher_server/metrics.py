"""Prometheus metrics of one server instance (own registry, so several servers can live in one process).

Names are agreed with the Grafana dashboards (docs/ARCHITECTURE.md). Label `key` is the API key's name ("" when the
caller could not be identified) when `key_labels` is on (`--metrics-key-labels`); by default it is "-" for every
series, so an unauthenticated scrape does not list the customers. `code` the gRPC status name (OK, INVALID_ARGUMENT,
...). One inference request is one Infer call or one message of an InferStream.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    start_http_server,
)

_IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


HIDDEN_KEY = "-"  # the `key` label without --metrics-key-labels
# Where a request's CPU time goes on the server (maskedkd_stage_cpu_seconds_total{stage}); what the process spends
# beyond their sum (process_cpu_seconds_total) is gRPC's own threads, the event loop and Python's scheduling.
# "handoff": an ingest worker's CPU for a batch's round trip to the device process (its forward counts there).
STAGES = ("receive", "decode", "digest", "ledger_lookup", "queue", "stage", "handoff", "forward", "commit", "encode")
T = TypeVar("T")


class StageClock:
    """The `with` block of `ServerMetrics.stage` (a class: a generator context manager costs ~3 us more a use)."""

    __slots__ = ("_counter", "_started")

    def __init__(self, counter: Any) -> None:
        self._counter = counter
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.thread_time()

    def __exit__(self, *exc_info: object) -> None:
        self._counter.inc(time.thread_time() - self._started)


class ServerMetrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, *, key_labels: bool = False, process: str = "0"
    ) -> None:
        """`process`: this process's label on the ingested bytes (an ingest worker's number; "0" for a lone
        server). With ingest workers every process writes its samples to the supervisor's multiprocess directory
        (ingest/supervisor.py), which serves them summed: gauges say how they sum there."""
        self.key_labels = key_labels
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "maskedkd_requests_total", "Inference requests by final status code", ["model", "key", "code"], registry=r
        )
        self.images = Counter("maskedkd_images_total", "Images served (billed requests)", ["model", "key"], registry=r)
        self.gflops_used = Counter(
            "maskedkd_gflops_used_total", "GFLOPs of the masked forwards billed", ["model", "key"], registry=r
        )
        self.gflops_full = Counter(
            "maskedkd_gflops_full_total", "GFLOPs the full teacher would have used", ["model", "key"], registry=r
        )
        self.gflops_saved = Counter(
            "maskedkd_gflops_saved_total", "GFLOPs saved by masking (full - used)", ["model", "key"], registry=r
        )
        self.cost = Counter("maskedkd_cost_total", "Amount billed, in the server's currency", ["key"], registry=r)
        self.batch_images = Histogram(
            "maskedkd_batch_images", "Images per micro-batch", buckets=_IMAGE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "maskedkd_batch_tokens", "Teacher tokens per micro-batch", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "maskedkd_queue_seconds", "Time a request waited for its micro-batch", buckets=_SECONDS_BUCKETS, registry=r
        )
        self.compute_seconds = Histogram(
            "maskedkd_compute_seconds", "Teacher forward time per micro-batch", buckets=_SECONDS_BUCKETS, registry=r
        )
        self.request_latency = Histogram(
            "maskedkd_request_latency_seconds",
            "Server-side latency of a request",
            ["model"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "maskedkd_queue_depth", "Requests waiting for a micro-batch", registry=r, multiprocess_mode="livesum"
        )
        self.dtype_agreement = Gauge(
            "maskedkd_dtype_top1_agreement",
            "Start-up check: top-1 agreement of the served dtype with float32 on a fixed batch",
            ["model", "dtype"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.dtype_kl = Gauge(
            "maskedkd_dtype_kl_nats",
            "Start-up check: mean KL(float32 || served dtype) on a fixed batch",
            ["model", "dtype"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.key_queue_seconds = Histogram(
            "maskedkd_key_queue_seconds",
            "Time a request waited for its micro-batch, per key",
            ["key"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.key_queue_depth = Gauge(
            "maskedkd_key_queue_depth", "Requests queued, per key", ["key"], registry=r, multiprocess_mode="livesum"
        )
        self.shed = Counter(
            "maskedkd_shed_total",
            "Requests refused or dropped unrun to protect the queue: reason overload (queue full), deadline (refused: "
            "it could not finish in time), deadline_queue (dropped: its deadline came while it was queued)",
            ["key", "reason"],
            registry=r,
        )
        self.unbilled_images = Counter(
            "maskedkd_unbilled_images_total",
            "Images whose forward ran but were not billed: their caller left before the commit and sent no "
            "request_id, so no retry could be given the answer",
            ["key"],
            registry=r,
        )
        self.stage_cpu = Counter(
            "maskedkd_stage_cpu_seconds_total", "CPU seconds the serving path spent, by stage", ["stage"], registry=r
        )
        self.shared_memory_bytes = Counter(
            "maskedkd_shared_memory_bytes_total",
            "Pixel bytes read from callers' shared memory regions (--shared-memory) instead of the messages",
            registry=r,
        )
        self.shape_rows = Counter(
            "maskedkd_shape_rows_total",
            "Rows run in each prepared --compile-shapes shape B:K: requests' rows (served) and padding rows (padding)",
            ["model", "shape", "rows"],
            registry=r,
        )
        self.unprepared_rows = Counter(
            "maskedkd_unprepared_rows_total",
            "Rows no prepared --compile-shapes shape fits (a keep width not listed, ragged rows, float pixels)",
            ["model"],
            registry=r,
        )
        self.split_requests = Counter(
            "maskedkd_split_requests_total",
            "Requests larger than a batch (--max-batch-ms, --token-budget), run as chunks in consecutive batches",
            ["model"],
            registry=r,
        )
        self.split_chunks = Counter(
            "maskedkd_split_chunks_total", "The chunks those requests were queued as", ["model"], registry=r
        )
        self.preempting_batches = Counter(
            "maskedkd_preempting_batches_total",
            "Batches of other keys run between two blocks of a running CPU forward (engine/batching/preemption.py)",
            ["model"],
            registry=r,
        )
        self.ingested_bytes = Counter(
            "maskedkd_ingested_bytes_total",
            "Pixel bytes received (in the messages or from shared memory), per ingest process",
            ["process"],
            registry=r,
        )
        self.device_holds = Counter(
            "maskedkd_device_holds_total",
            "Times the device process held the teacher back for an ingest worker's call that goes first, by how the "
            "wait ended: the call came (ended) or the wait reached its limit (ran_out)",
            ["outcome"],
            registry=r,
        )
        self.device_hold_seconds = Counter(
            "maskedkd_device_hold_seconds_total", "Seconds the teacher waited in those holds", registry=r
        )
        self._process = process
        self._ingested: Any = None  # its series, made on the first bytes (a device process exports none)
        # every stage exported from the start, at 0; its child looked up once (labels() costs ~3 us a call)
        self._stage_counters = {stage: self.stage_cpu.labels(stage=stage) for stage in STAGES}
        ProcessCollector(registry=r)  # process_cpu_seconds_total: the stages' sum plus what no stage counts
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def key_label(self, key: str) -> str:
        return key if self.key_labels else HIDDEN_KEY

    def count_request(self, *, model: str, key: str, code: str) -> None:
        key = self.key_label(key)
        self.requests.labels(model=model, key=key, code=code).inc()

    def count_billed(
        self, *, model: str, key: str, images: int, gflops: float, full_gflops: float, cost: float
    ) -> None:
        key = self.key_label(key)
        self.images.labels(model=model, key=key).inc(images)
        self.gflops_used.labels(model=model, key=key).inc(gflops)
        self.gflops_full.labels(model=model, key=key).inc(full_gflops)
        self.gflops_saved.labels(model=model, key=key).inc(max(0.0, full_gflops - gflops))
        self.cost.labels(key=key).inc(cost)

    def observe_queue_wait(self, seconds: float, *, key: str) -> None:
        self.queue_seconds.observe(seconds)
        self.key_queue_seconds.labels(key=self.key_label(key)).observe(seconds)

    def count_ingested(self, nbytes: int) -> None:
        """Pixel bytes this process received for one request."""
        if self._ingested is None:
            self._ingested = self.ingested_bytes.labels(process=self._process)
        self._ingested.inc(nbytes)

    def count_unbilled(self, *, key: str, images: int) -> None:
        self.unbilled_images.labels(key=self.key_label(key)).inc(images)

    def count_shed(self, *, reason: str, key: str = "") -> None:
        self.shed.labels(key=self.key_label(key), reason=reason).inc()

    def stage(self, stage: str) -> StageClock:
        """Count the calling thread's CPU time inside the `with` block to `stage` (one of STAGES)."""
        counter = self._stage_counters.get(stage)
        return StageClock(self.stage_cpu.labels(stage=stage) if counter is None else counter)

    def shape_use(self, model: str) -> ShapeUseCounters:
        """Where `model`'s forward ran each batch's rows (`ShapeUse` of engine/teacher/shape_buckets.py)."""
        return ShapeUseCounters(self, model)

    def timed(self, stage: str, fn: Callable[..., T]) -> Callable[..., T]:
        """`fn` with its CPU time counted to `stage`."""

        def run(*args: object, **kwargs: object) -> T:
            with self.stage(stage):
                return fn(*args, **kwargs)

        return run

    def render(self) -> bytes:
        """The text exposition format, as /metrics serves it."""
        return generate_latest(self.registry)

    def start_http(self, *, host: str, port: int) -> int:
        """Serve /metrics in a daemon thread; returns the bound port (useful with port 0)."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_address[1])

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class ShapeUseCounters:
    """`ShapeUse` on the metrics: served and padding rows per prepared shape, rows of the fallback forward."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self._metrics = metrics
        self._model = model
        self._pieces: dict[tuple[int, int], tuple[Any, Any]] = {}  # (B, K) -> its served and padding counters
        self._fallback = metrics.unprepared_rows.labels(model=model)
        self.counting = True  # off while the server warms the shapes up: those rows are no request's

    def piece(self, shape: tuple[int, int], rows: int) -> None:
        if not self.counting:
            return
        counters = self._pieces.get(shape)
        if counters is None:
            labels = {"model": self._model, "shape": f"{shape[0]}:{shape[1]}"}
            rows_of = self._metrics.shape_rows
            counters = self._pieces[shape] = (
                rows_of.labels(rows="served", **labels),
                rows_of.labels(rows="padding", **labels),
            )
        counters[0].inc(rows)
        counters[1].inc(shape[0] - rows)

    def fallback(self, rows: int) -> None:
        if self.counting:
            self._fallback.inc(rows)
