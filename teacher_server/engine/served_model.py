"""The served model: the loaded teacher with its forward, meter and micro-batcher, under the name clients use."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from maskedkd.keep import num_keep
from maskedkd.masked_teacher import MaskedTeacher
from maskedkd.precision import dtype_name
from maskedkd.teacher_outputs import ForwardOutputs, OutputChoice, available_outputs, forward_with_outputs
from maskedkd.text import clip
from maskedkd.tome import ToMeTeacher
from teacher_server.engine.batching.batcher import TokenBudgetBatcher
from teacher_server.engine.batching.fair_clock import Clock
from teacher_server.engine.batching.preemption import YieldPoints
from teacher_server.engine.batching.scheduler import QueueLimits
from teacher_server.engine.rows.rows_runner import AnswersFn, ForwardFn, MixedK, OutputsForwardFn, RowsRunner
from teacher_server.engine.rows.shared_host import shared_host_tensor
from teacher_server.engine.rows.staging import Stager
from teacher_server.engine.teacher.compiled import forward_pixels_fn, warm_up_shapes
from teacher_server.engine.teacher.fidelity import DtypeFidelity
from teacher_server.engine.teacher.metering import Meter
from teacher_server.engine.teacher.packing import run_packed, supports_packing
from teacher_server.engine.teacher.shape_buckets import ShapeUse
from teacher_server.engine.teacher.teacher_loader import ModelLoadError
from teacher_server.errors import ModelNotFoundError
from teacher_server.metrics import ServerMetrics
from teacher_server.settings import ServerSettings

log = logging.getLogger(__name__)

CPU_CHUNK_TOKENS = 2048  # tokens per forward call on a CPU teacher (20 rows of 99 tokens)


def make_forward(
    teacher: MaskedTeacher,
    device: torch.device,
    dtype: torch.dtype,
    compile_mode: str = "off",
    *,
    pack: bool = False,
    shapes: Sequence[tuple[int, int]] = (),
    shape_use: ShapeUse | None = None,
) -> ForwardFn:
    """The batcher's forward: staged rows (raw pixels, on the teacher's device: staging.py) in, CPU float32 logits
    out; the teacher casts the pixels to its dtype and normalizes them in its patch projection. `shapes`: the
    (B, K) shapes `--compile` prepares (compiled.py); `shape_use`: told where each batch's rows ran in them."""
    forward_pixels = forward_pixels_fn(teacher, compile_mode, shapes, shape_use)
    chunked = device.type == "cpu" and compile_mode == "off"  # a compiled forward keeps the shapes it was built for

    def forward(pixels: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        if pack and counts is not None:  # ragged rows (`--mixed-k pack`): all tokens in one sequence, no padding
            return run_packed(teacher, pixels, indices, counts).float().cpu()  # [G,classes]
        if chunked:
            return in_cache_chunks(forward_pixels, pixels, indices, counts, teacher.geometry.num_prefix_tokens)
        return forward_pixels(pixels, indices, counts).float().cpu()  # [G,classes]

    return forward


def in_cache_chunks(
    forward_pixels: ForwardFn,
    pixels: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor | None,
    prefix_tokens: int,
    *,
    chunk_tokens: int = CPU_CHUNK_TOKENS,
) -> torch.Tensor:
    """A CPU forward over the rows in chunks of about `chunk_tokens` tokens, so each chunk's activations stay in the
    core's cache (measured on one thread: 256 DeiT-S-geometry rows at keep 50% ran 426 us an image in one call,
    327-355 us in chunks of 16-64 rows; the tiny 12-block ViT gained ~2%)."""
    g = pixels.shape[0]
    rows = max(1, chunk_tokens // (pixels.shape[1] + prefix_tokens))
    if g <= rows:
        return forward_pixels(pixels, indices, counts).float()  # [G,classes]
    parts = [
        forward_pixels(pixels[i : i + rows], indices[i : i + rows], None if counts is None else counts[i : i + rows])
        for i in range(0, g, rows)
    ]
    return torch.cat(parts).float()  # [G,classes]


def make_outputs_forward(teacher: MaskedTeacher) -> OutputsForwardFn | None:
    """The batcher's forward for batches asking for extra outputs (eager, padded); None when the teacher gives none."""
    if not available_outputs(teacher):
        return None

    def forward(
        pixels: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor | None, choice: OutputChoice
    ) -> ForwardOutputs:
        return forward_with_outputs(teacher, pixels, indices, counts, choice, raw=True)

    return forward


@dataclass
class ServedModel:
    name: str
    teacher: MaskedTeacher  # its `geometry` is what requests are checked against
    meter: Meter
    batcher: TokenBudgetBatcher
    device: torch.device
    dtype_name: str  # the resolved dtype ("auto" never reaches here)
    fidelity: DtypeFidelity | None = None  # the start-up check against float32

    def named(self, name: str) -> ServedModel:
        """This model when a request names it (or names none); `ModelNotFoundError` for any other name."""
        if name and name != self.name:
            raise ModelNotFoundError(f"unknown model {clip(name)}; this server serves: {self.name}")
        return self


def queue_limits(settings: ServerSettings) -> QueueLimits:
    """What may wait in the queue at once, per key and in all, from the server's settings."""
    return QueueLimits(
        key_images=settings.max_queued_images_per_key,
        key_bytes=int(settings.max_queued_mb_per_key * 2**20),
        total_images=settings.max_queued_images,
        total_bytes=int(settings.max_queued_mb * 2**20),
    )


def auto_mixed_k(device: torch.device) -> MixedK:
    """`--mixed-k auto`: on a GPU one padded forward, since a forward per keep count is launch-bound and copies each
    count's logits to the host before the next (a batch of per-image K can hold dozens of counts); on a CPU a forward
    per count, which computes no padding."""
    return "pad" if device.type == "cuda" else "bucket"


def mixed_k_of(name: str, teacher: MaskedTeacher, settings: ServerSettings) -> MixedK:
    """How ragged rows run on this teacher: `--mixed-k` (auto: by its device), unless the teacher cannot do it (then
    `bucket`)."""
    asked = auto_mixed_k(next(teacher.parameters()).device) if settings.mixed_k == "auto" else settings.mixed_k
    pack = asked == "pack" and supports_packing(teacher)
    if asked == "pack" and not pack:
        log.info("--mixed-k pack: %s is not a plain class-token ViT; ragged rows are bucketed instead", name)
    mixed_k: MixedK = asked if pack or asked != "pack" else "bucket"
    if isinstance(teacher, ToMeTeacher) and mixed_k != "bucket":  # merging needs every row of a forward equally long
        log.info("--tome-r: ragged rows are bucketed (--mixed-k %s does not apply)", settings.mixed_k)
        mixed_k = "bucket"
    return mixed_k


def rows_runner_for(
    name: str, teacher: MaskedTeacher, settings: ServerSettings, metrics: ServerMetrics | None = None
) -> RowsRunner:
    """The teacher's forward for staged batches (compiled shapes warmed up): what runs on the device. `metrics`:
    where the rows of the prepared `--compile-shapes` are counted."""
    weight = next(teacher.parameters())
    mixed_k = mixed_k_of(name, teacher, settings)
    shapes = settings.compile_shapes
    if settings.compile == "static" and not shapes:
        log.warning(
            "%s: --compile static without --compile-shapes: the first request of each new micro-batch shape waits for "
            "its compile (~20 s on 2 CPU cores; 8 shapes at most, then eager); list the shapes your requests make, "
            "e.g. --compile-shapes 64:%d",
            name,
            num_keep(0.5, teacher.geometry.num_patches),
        )
    use = metrics.shape_use(name) if metrics is not None and shapes else None
    try:
        forward = make_forward(
            teacher, weight.device, weight.dtype, settings.compile, pack=mixed_k == "pack", shapes=shapes, shape_use=use
        )
        if shapes and settings.compile == "static":  # graphs are captured as they are made
            if use is not None:
                use.counting = False
            warm_up_shapes(forward, teacher, shapes)
            if use is not None:
                use.counting = True
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    return RowsRunner(
        forward, mixed_k=mixed_k, forward_outputs=make_outputs_forward(teacher), served_dtype=weight.dtype
    )


def yield_points_for(teacher: MaskedTeacher, settings: ServerSettings) -> YieldPoints | None:
    """Where a batch of other keys may run inside this teacher's forward (preemption.py): between the blocks of an
    eager CPU teacher served in this process; None elsewhere."""
    if next(teacher.parameters()).device.type != "cpu" or settings.compile != "off":
        return None
    return YieldPoints(list(teacher.model.blocks))


def build_served_model(
    name: str,
    teacher: MaskedTeacher,
    settings: ServerSettings,
    *,
    fidelity: DtypeFidelity | None = None,
    runner: AnswersFn | None = None,
    clock: Clock | None = None,
    metrics: ServerMetrics | None = None,
    **batcher_kwargs: object,
) -> ServedModel:
    """Meter and batcher around a loaded teacher; `batcher_kwargs` go to TokenBudgetBatcher (finalize).
    `runner`: where staged batches run (default: this teacher, here; an ingest worker passes the device process's,
    and its `teacher` is then a weightless copy on the meta device, for the geometry, meter and outputs); `clock`:
    the fair-share clock (default: this process's own; ingest workers share one)."""
    weight = next(teacher.parameters())
    remote = runner is not None
    stage_on = torch.device("cpu") if remote else weight.device  # a worker stages into shared host memory
    batcher = TokenBudgetBatcher(
        runner or rows_runner_for(name, teacher, settings, metrics),
        num_prefix_tokens=teacher.geometry.num_prefix_tokens,
        token_budget=settings.token_budget,
        max_batch_images=settings.max_batch_images,
        max_delay_s=settings.max_delay_ms / 1000.0,
        name=name,
        stager=Stager(
            teacher.geometry,
            max_images=settings.max_batch_images,
            device=stage_on,
            allocate=shared_host_tensor if remote else None,
            in_place=not remote and stage_on.type == "cpu" and settings.compile == "off",
        ),
        limits=queue_limits(settings),
        clock=clock,
        max_batch_s=settings.max_batch_ms / 1000.0,
        chunk_sizes=sorted({b for b, _ in settings.compile_shapes}) if settings.compile != "off" else (),
        yield_points=None if remote else yield_points_for(teacher, settings),
        metrics=metrics,
        **batcher_kwargs,  # type: ignore[arg-type]  # the batcher's keyword arguments, passed through
    )
    return ServedModel(
        name=name,
        teacher=teacher,
        meter=Meter.of(teacher),
        batcher=batcher,
        device=weight.device,
        dtype_name=dtype_name(weight.dtype),
        fidelity=fidelity,
    )
