"""Everything one worker's training run needs before its first step, built by `build_training_run`: this node's
data, the student, optimizer and schedule, the restored checkpoint (Ray's after a worker failure, or --resume's), the
teacher connection and the KD step (built by kd_step, as MaskedKD builds it).

What every worker must agree on is checked here, each check a collective: --data on every node, the same restored
checkpoint on every worker, a --resume that keeps the images under each request id, the teacher's classes. A refusal
raises RunRefusedError on every worker alike, before anything trains.
"""

from __future__ import annotations

import math
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from maskedkd.precision import resolve_precision
from student_client.collective import agree_on_error
from student_client.config import TrainConfig
from student_client.data import Normalizer, build_datasets, build_mixup, class_names_of, loader_workers_for
from student_client.data_archive import is_archive, local_data_root
from student_client.determinism import SeededSamples, run_id_for
from student_client.distill.kd_step import KDStepParts, build_kd_step
from student_client.distill.keep_auto import KeepAutoSettings
from student_client.distill.keep_probe import apply_decision
from student_client.distill.losses import DistillationLoss
from student_client.distill.pipeline import InferFuture
from student_client.errors import FATAL_ERRORS, TeacherInputError
from student_client.student import (
    MaskedStudent,
    StudentSpec,
    create_student,
    describe_student,
    freeze_all_but_head,
    student_kwargs_for,
)
from student_client.training.checkpointing import TrainState, prune_checkpoints, save_training_checkpoint
from student_client.training.context import Context
from student_client.training.evaluate import shard
from student_client.training.resume import restore, resume_refusal
from student_client.training.student_init import init_student
from student_client.transport.client import TeacherClient
from student_client.transport.stream import TeacherStreams
from student_client.transport.wire import ModelInfo


class RunRefusedError(Exception):
    """Every worker agreed not to train: `message` says why (one line), `state` is what was restored so far."""

    def __init__(self, message: str, state: TrainState) -> None:
        super().__init__(message)
        self.message = message
        self.state = state


@dataclass
class TrainData:
    """This worker's share of the training data and of the evaluation data."""

    train_set: SeededSamples  # augmentation drawn from (seed, epoch, index), not process history
    sampler: DistributedSampler[Any]
    loader: DataLoader
    eval_loader: DataLoader | None  # None: no val/ or test/, or --no-eval
    class_names: list[str]


@dataclass
class TeacherConnection:
    """The training client of this worker (it re-sends ids of a resumed run and takes the answers billed under them)
    and, with --transport stream, its InferStreams (one per connection)."""

    client: TeacherClient
    stream: TeacherStreams | None
    info: ModelInfo

    def submit(self, **request: Any) -> InferFuture:
        """Send one request (pipeline.Submit): on the stream, else as a unary call."""
        return self.stream.submit(**request) if self.stream is not None else self.client.submit(**request)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close(timeout_s=5.0)
        self.client.close()


@dataclass
class TrainingRun:
    """One worker's run, ready for its first (or first resumed) step."""

    cfg: TrainConfig
    ctx: Context
    data: TrainData
    raw_model: nn.Module  # the timm student: checkpoints, SIPS
    model: nn.Module  # what the training forward goes through (Ray's DDP, MaskedStudent)
    model_kwargs: dict[str, Any]  # timm.create_model kwargs, stored in every checkpoint
    normalize: Normalizer
    mixup: Mixup | None  # --augment heavy
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    state: TrainState  # restored, or fresh
    resumed: bool
    run_id: str  # request ids <run_id>-e<epoch>-w<rank>-s<step>-m<micro>
    teacher: TeacherConnection | None  # None in mode none
    kd: KDStepParts

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data.loader)

    @property
    def planned_steps(self) -> int:
        total = self.cfg.epochs * self.steps_per_epoch
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def request_prefix(self, epoch: int) -> str:
        return f"{self.run_id}-e{epoch}-w{self.ctx.rank}"

    def refused_requests(self) -> tuple[int, int]:
        """The client's counts so far of re-sent requests it could not replay as sent, and of those billed again."""
        if self.teacher is None:
            return 0, 0
        return self.teacher.client.mismatched_requests, self.teacher.client.rebilled_requests

    def save_checkpoint(self, row: dict[str, Any]) -> Path:
        """The checkpoint after an epoch (or a --max-steps stop) with its metrics `row`; prunes old ones (rank 0)."""
        cfg = self.cfg
        checkpoint = save_training_checkpoint(
            cfg.out,
            model=self.raw_model,
            model_name=cfg.student,
            model_kwargs=self.model_kwargs,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state=self.state,
            extra={
                "class_names": self.data.class_names,
                "val_top1": row["val_top1"],
                "val_top5": row["val_top5"],
                "mode": cfg.mode,
                "strategy": cfg.strategy,
                "keep": cfg.keep,
            },
        )
        prune_checkpoints(cfg.out, cfg.keep_checkpoints)
        return checkpoint

    def close(self) -> None:
        self.kd.close()
        if self.teacher is not None:
            self.teacher.close()


def build_training_run(cfg: TrainConfig, ctx: Context) -> TrainingRun:
    """This worker's run per `cfg` (collectives: every worker calls it); RunRefusedError on every worker alike."""
    data_root, data_error = _local_data(cfg, ctx)
    if (refusal := agree_on_error(ctx, data_error)) is not None:  # every node must see --data
        raise RunRefusedError(refusal, TrainState())
    raw, spec, model_kwargs = _student(cfg, len(class_names_of(data_root)))
    data = _train_data(cfg, ctx, data_root, spec)
    steps_per_epoch = len(data.loader)
    if steps_per_epoch == 0:
        raise ValueError(f"no training batches: {len(data.train_set)} images for batch size {cfg.batch_size}")

    raw.to(ctx.device)
    # torch's fused AdamW: one kernel over all parameters (vit_tiny on a 2-core Xeon: 4.5 ms a step, 13.3 for the
    # per-parameter loop that is the CPU's default); a resumed run keeps the kind its checkpoint was made with
    fused = ctx.device.type in ("cpu", "cuda")
    optimizer = create_optimizer_v2(raw, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch))
    )
    state = restore(cfg, ctx, raw, optimizer, scheduler)
    if (refusal := agree_on_error(ctx, resume_refusal(cfg, ctx, state))) is not None:
        raise RunRefusedError(refusal, state)
    model = ctx.prepare_model(MaskedStudent(raw) if cfg.mode == "mask-student" else raw)
    normalize = Normalizer(spec.mean, spec.std, ctx.device)
    mixup = build_mixup(len(data.class_names), cfg.augment)

    if cfg.mode != "none" and cfg.strategy in ("sips", "bottom") and cfg.keep != "auto" and spec.grid_size is None:
        raise ValueError(f"--strategy {cfg.strategy} needs a ViT student; {cfg.student} has no patch grid")
    teacher = (
        None
        if cfg.mode == "none"
        else _connect_teacher(cfg, ctx, model_kwargs["num_classes"], len(data.class_names), state)
    )
    try:
        # The run id is the driver's (Ray) or out/run_id's: a resume or a restarted worker re-sends under the same ids
        run_id = cfg.run_id or run_id_for(cfg.out, resume=cfg.resume)
        state.precision = _run_precision(cfg, ctx, state)
        auto = (
            KeepAutoSettings(
                every=cfg.keep_every,
                probes=cfg.keep_probes,
                max_kl=cfg.keep_max_kl,
                min_agreement=cfg.keep_min_agreement,
            )
            if cfg.keep == "auto"
            else None
        )
        kd = build_kd_step(
            cfg,
            model=model,
            raw_model=raw,
            spec=spec,
            normalize=normalize,
            criterion=DistillationLoss(cfg.lambda_kd, cfg.tau, cfg.hard),
            submit=None if teacher is None else teacher.submit,
            teacher_grid=None if teacher is None else teacher.info.grid_size,
            request_id_prefix=run_id,
            precision=state.precision,
            keep_auto=auto,
        )
    except BaseException:
        if teacher is not None:
            teacher.close()
        raise
    if kd.selector is not None and kd.prober is not None and state.keep_decisions:
        apply_decision(kd.selector, state.keep_decisions[-1])  # resumed: continue with the keep chosen last
    return TrainingRun(
        cfg=cfg,
        ctx=ctx,
        data=data,
        raw_model=raw,
        model=model,
        model_kwargs=model_kwargs,
        normalize=normalize,
        mixup=mixup,
        optimizer=optimizer,
        scheduler=scheduler,
        state=state,
        resumed=state.global_step > 0,
        run_id=run_id,
        teacher=teacher,
        kd=kd,
    )


def _student(cfg: TrainConfig, class_folders: int) -> tuple[nn.Module, StudentSpec, dict[str, Any]]:
    """The timm student (fresh, or --init's weights), what it takes, and its create_model kwargs."""
    model_kwargs = student_kwargs_for(cfg.student_kwargs, class_folders)
    raw = create_student(cfg.student, model_kwargs)
    if cfg.student_init:
        init_student(raw, cfg.student_init)  # checked by the preflight; a --resume checkpoint overrides it
    spec = describe_student(raw)
    if cfg.train_head_only:
        freeze_all_but_head(raw)
    if spec.distilled:
        raw.set_distilled_training(cfg.mode != "none")  # type: ignore[operator]  # (cls, dist): KD on the dist head
    return raw, spec, model_kwargs


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float = 0.01) -> Callable[[int], float]:
    """The learning-rate factor of a step: linear warm-up, then cosine down to `floor`."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _local_data(cfg: TrainConfig, ctx: Context) -> tuple[str, str | None]:
    """This node's ImageFolder root for --data (an archive extracted once per node), or a one-line error naming the
    node when it does not have --data (Ray workers read it where they run)."""
    try:
        root = local_data_root(cfg.data)
    except (tarfile.TarError, OSError) as err:
        return cfg.data, f"--data {cfg.data} could not be extracted on {ctx.node} (rank {ctx.rank}): {err}"
    if Path(root).is_dir():
        return root, None
    what = "an archive file" if is_archive(cfg.data) else "a directory"
    return root, (
        f"--data {cfg.data} is not {what} on {ctx.node} (rank {ctx.rank}): on a Ray cluster it must "
        "exist on every node (a shared or copied path)"
    )


def _train_data(cfg: TrainConfig, ctx: Context, data_root: str, spec: StudentSpec) -> TrainData:
    # uint8 until the device: a quarter of the bytes to collate, pin and copy (the step makes them float there)
    train_set, eval_set, class_names = build_datasets(data_root, spec.image_size, cfg.augment, uint8=True)
    seeded = SeededSamples(train_set, cfg.seed)
    sampler: DistributedSampler[Any] = DistributedSampler(
        seeded, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed
    )
    pinned = ctx.device.type == "cuda"  # batches in pinned memory: their copies to the card are non-blocking
    loader = ctx.prepare_loader(
        DataLoader(
            seeded,
            batch_size=cfg.per_worker_batch,
            sampler=sampler,
            num_workers=loader_workers_for(cfg.loader_workers, ctx.device),
            drop_last=cfg.augment == "heavy",
            pin_memory=pinned,
        )
    )
    eval_loader = (
        None
        if eval_set is None or not cfg.eval
        else DataLoader(
            shard(eval_set, ctx.rank, ctx.world_size),
            batch_size=max(cfg.per_worker_batch, 32),
            shuffle=False,
            pin_memory=pinned,
        )
    )
    return TrainData(seeded, sampler, loader, eval_loader, class_names)


def _connect_teacher(
    cfg: TrainConfig, ctx: Context, num_classes: int, class_folders: int, state: TrainState
) -> TeacherConnection:
    """The teacher, its classes checked against the student's; a fatal teacher error on any worker (a bad key, other
    classes) refuses the run on every worker."""
    client = TeacherClient(
        cfg.teacher or "",
        cfg.api_key or "",
        timeout_s=cfg.teacher_timeout_s,
        max_retries=cfg.teacher_retries,
        patience_s=cfg.teacher_patience_s,
        model=cfg.teacher_model,
        request_log=cfg.request_log,
        shared_memory=cfg.teacher_shared_memory,
        reuse_billed_answers=True,
        connections=cfg.teacher_connections,
        **cfg.teacher_tls,
    )
    info, error = None, None
    try:
        info = client.info()
        if info.num_classes != num_classes:
            raise TeacherInputError(
                f"teacher {info.model} predicts {info.num_classes} classes, the student "
                f"{num_classes} ({class_folders} class folders in data)"
            )
    except FATAL_ERRORS as err:
        error = str(err)
    except BaseException:
        client.close()
        raise
    if (refusal := agree_on_error(ctx, error)) is not None:
        client.close()
        raise RunRefusedError(refusal, state)
    assert info is not None
    return TeacherConnection(client, TeacherStreams(client) if cfg.transport == "stream" else None, info)


def _run_precision(cfg: TrainConfig, ctx: Context, state: TrainState) -> str:
    """The student's precision for this run: `--precision auto` is resolved once, at the run's start, by rank 0 (on
    its device, for every rank), and a resumed run keeps it, so the bytes it re-sends come from the same numerics."""
    if cfg.precision == "auto" and state.precision:
        return state.precision
    return str(ctx.all_gather_object(resolve_precision(cfg.precision, ctx.device))[0])
