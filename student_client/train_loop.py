"""The per-worker training function: Ray Train's `train_loop_per_worker` (`train_worker`), or in-process
(`run_training(cfg, LocalContext())`). Model, data and the TeacherClient are built inside the worker.

Every step all workers all-reduce one small stats tensor (loss, images, teacher usage, a fatal-error flag), so the
progress bar and the cost figures cover all workers, and a fatal teacher error (bad key, quota, bad input) stops every
worker at the same step, cleanly, instead of being retried by Ray's FailureConfig like a crash would be.
"""
from __future__ import annotations

import json
import math
import tarfile
import time
from pathlib import Path
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader, DistributedSampler

from maskedkd.precision import resolve_precision
from student_client.checkpointing import (
    TrainState,
    latest_checkpoint,
    load_training_checkpoint,
    prune_checkpoints,
    save_training_checkpoint,
)
from student_client.client import TeacherClient
from student_client.config import TrainConfig
from student_client.context import LocalContext, RayContext
from student_client.data import Normalizer, build_datasets, build_mixup, class_names_of
from student_client.data_archive import is_archive, local_data_root
from student_client.determinism import (
    SeededSamples,
    run_id_for,
    seed_everything,
    step_seed,
)
from student_client.errors import FATAL_ERRORS, TeacherInputError
from student_client.evaluate import Accuracy, count_correct, shard
from student_client.keep_probe import (
    KeepProber,
    apply_decision,
    decision_line,
    probe_and_decide,
)
from student_client.losses import DistillationLoss
from student_client.metrics import MetricsWriter, Progress, epoch_line
from student_client.sips import SIPSCapture
from student_client.stream import TeacherStream
from student_client.student import (
    MaskedStudent,
    create_student,
    describe_student,
    freeze_all_but_head,
    student_kwargs_for,
    unwrap,
)
from student_client.student_init import init_student
from student_client.tls import teacher_tls_kwargs
from student_client.train_step import PatchSelector, StepRunner
from student_client.wire import Usage

Context = LocalContext | RayContext
# Layout of the per-step all-reduced stats tensor.
_STATS = ("loss", "ce", "kd", "images", "gflops", "full_gflops", "cost", "requests", "fatal", "wait_s", "teacher_s",
          "mismatched", "rebilled", "probe_gflops", "probe_cost", "kept")


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (one call per worker)."""
    run_training(TrainConfig.from_dict(config), RayContext())


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float = 0.01):  # type: ignore[no-untyped-def]
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _fatal(ctx: Context, message: str | None) -> str | None:
    """All workers agree whether any hit a fatal error; returns the first message (or None)."""
    flag = ctx.all_reduce(torch.tensor([1.0 if message else 0.0]))
    if float(flag[0]) == 0:
        return None
    return next((m for m in ctx.all_gather_object(message) if m), "fatal teacher error")


def run_training(cfg: TrainConfig, ctx: Context) -> dict[str, Any]:
    """Train per `cfg`; returns the final summary (also reported to Ray and written to out/summary.json)."""
    torch.set_num_threads(max(1, cfg.threads_per_worker))
    torch.manual_seed(cfg.seed + ctx.rank)
    out = Path(cfg.out)
    started = time.perf_counter()

    # ---- student and data ----
    data_root, data_error = _local_data(cfg, ctx)
    if (fatal := _fatal(ctx, data_error)) is not None:  # every node must see --data
        return _finish(cfg, ctx, TrainState(), fatal_error=fatal, started=started)
    model_kwargs = student_kwargs_for(cfg.student_kwargs, len(class_names_of(data_root)))
    raw = create_student(cfg.student, model_kwargs)
    if cfg.student_init:
        init_student(raw, cfg.student_init)  # checked by the preflight; a --resume checkpoint overrides it below
    spec = describe_student(raw)
    if cfg.train_head_only:
        freeze_all_but_head(raw)
    if spec.distilled:
        raw.set_distilled_training(cfg.mode != "none")  # (cls, dist) outputs: KD goes on the distillation head
    train_ds, eval_ds, class_names = build_datasets(data_root, spec.image_size, cfg.augment)
    train_ds = SeededSamples(train_ds, cfg.seed)  # augmentation drawn from (seed, epoch, index), not process history
    sampler = DistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed)
    loader = ctx.prepare_loader(DataLoader(train_ds, batch_size=cfg.per_worker_batch, sampler=sampler,
                                           num_workers=cfg.loader_workers, drop_last=cfg.augment == "heavy"))
    eval_loader = None if eval_ds is None or not cfg.eval else DataLoader(
        shard(eval_ds, ctx.rank, ctx.world_size), batch_size=max(cfg.per_worker_batch, 32), shuffle=False)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"no training batches: {len(train_ds)} images for batch size {cfg.batch_size}")
    total_steps = cfg.epochs * steps_per_epoch
    planned = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    # ---- optimizer, scheduler, restore ----
    raw.to(ctx.device)
    optimizer = create_optimizer_v2(raw, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, int(cfg.warmup_epochs * steps_per_epoch)))
    state = TrainState()
    with ctx.restored_checkpoint() as ray_ckpt:
        source = ray_ckpt or (latest_checkpoint(out) if cfg.resume else None)
        if source is not None:
            state = load_training_checkpoint(source, model=raw, optimizer=optimizer, scheduler=scheduler)
    resumed = state.global_step > 0
    problem = _resume_mismatch(ctx, state) or (_resume_changes_images(cfg, out) if resumed and ctx.rank == 0 else None)
    if (fatal := _fatal(ctx, problem)) is not None:
        return _finish(cfg, ctx, state, fatal_error=fatal, started=started)
    model = ctx.prepare_model(MaskedStudent(raw) if cfg.mode == "mask-student" else raw)
    normalize = Normalizer(spec.mean, spec.std, ctx.device)
    mixup = build_mixup(len(class_names), cfg.augment)

    # ---- teacher ----
    client: TeacherClient | None = None
    stream: TeacherStream | None = None
    selector: PatchSelector | None = None
    setup_error: str | None = None
    if cfg.mode != "none":
        try:
            client = TeacherClient(cfg.teacher or "", cfg.api_key or "", timeout_s=cfg.teacher_timeout_s,
                                   max_retries=cfg.teacher_retries, patience_s=cfg.teacher_patience_s,
                                   model=cfg.teacher_model, request_log=cfg.request_log,
                                   reuse_billed_answers=True, **teacher_tls_kwargs(cfg))
            info = client.info()
            if info.num_classes != model_kwargs["num_classes"]:
                raise TeacherInputError(f"teacher {info.model} predicts {info.num_classes} classes, the student "
                                        f"{model_kwargs['num_classes']} ({len(class_names)} class folders in data)")
            stream = TeacherStream(client) if cfg.transport == "stream" else None
            target_grid = info.grid_size if cfg.mode == "kd" else (spec.grid_size or info.grid_size)
            needs_scores = cfg.strategy in ("sips", "bottom") and cfg.keep != "auto"
            if needs_scores and spec.grid_size is None:
                raise ValueError(f"--strategy {cfg.strategy} needs a ViT student; {cfg.student} has no patch grid")
            # --keep auto probes sips (a ViT student) and random
            wants_scores = needs_scores or (cfg.keep == "auto" and spec.grid_size is not None)
            capture = SIPSCapture(raw) if wants_scores else None
            gen = torch.Generator()  # reseeded every step from (seed, epoch, step, rank)
            selector = PatchSelector(cfg, capture, spec.grid_size, target_grid, gen)
        except FATAL_ERRORS as err:
            setup_error = str(err)
    if (fatal := _fatal(ctx, setup_error)) is not None:
        return _finish(cfg, ctx, state, fatal_error=fatal, started=started)
    submit = None if client is None else (stream.submit if stream is not None else client.submit)
    criterion = DistillationLoss(cfg.lambda_kd, cfg.tau, cfg.hard)
    prober = None
    if cfg.keep == "auto" and selector is not None and submit is not None:
        prober = KeepProber(raw_model=raw, normalize=normalize, selector=selector, submit=submit,
                            probes=cfg.keep_probes, tau=cfg.tau, timeout_s=cfg.teacher_wait_s)
        if state.keep_decisions:  # resumed: continue with the keep chosen last
            apply_decision(selector, state.keep_decisions[-1])
    # The run id is the driver's (Ray) or out/run_id's: a resume or a restarted worker re-sends under the same ids.
    run_id = cfg.run_id or run_id_for(out, resume=cfg.resume)
    state.precision = _run_precision(cfg, ctx, state)
    runner = StepRunner(cfg, model, raw, normalize, criterion, selector, submit, request_id_prefix=run_id,
                        precision=state.precision)

    # ---- loop ----
    is_main = ctx.rank == 0
    writer = MetricsWriter(out, resume_step=state.global_step if resumed else None) if is_main else None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(cfg.to_json())
    if ctx.under_ray:  # the driver's progress bar starts from this report
        ctx.report({"kind": "start", "total": planned, "initial": min(state.global_step, planned)})
    progress = Progress(planned, min(state.global_step, planned),
                        enabled=is_main and cfg.progress and not ctx.under_ray)  # Ray: the driver draws it
    fatal: str | None = None
    last_acc: Accuracy | None = None
    try:
        while state.epochs_done < cfg.epochs and not _done(cfg, state) and fatal is None:
            epoch = state.epochs_done
            sampler.set_epoch(epoch)
            train_ds.set_epoch(epoch)
            runner.prefix = f"{run_id}-e{epoch}-w{ctx.rank}"  # ids <run>-e<epoch>-w<rank>-s<step>-m<micro>
            ep_start, ep = time.perf_counter(), torch.zeros(len(_STATS), dtype=torch.float64)
            skip = state.batches_into_epoch
            for i, (images, targets) in enumerate(loader):
                if i < skip:
                    continue
                if _done(cfg, state):
                    break
                _maybe_inject_failure(cfg, ctx, state)
                t0 = time.perf_counter()
                images, targets = images.to(ctx.device), targets.to(ctx.device)
                seed_everything(step_seed(cfg.seed, epoch, state.global_step, ctx.rank, "global"))  # mixup, dropout
                if selector is not None:
                    selector.generator.manual_seed(step_seed(cfg.seed, epoch, state.global_step, ctx.rank, "select"))
                refused_before = (client.mismatched_requests, client.rebilled_requests) if client else (0, 0)
                if mixup is not None:
                    images, targets = mixup(images, targets)
                known, probe_usage, decision = None, Usage(), None
                if prober is not None and (state.global_step % cfg.keep_every == 0 or not state.keep_decisions):
                    decided = probe_and_decide(prober, ctx, images, step=state.global_step, prefix=runner.prefix,
                                               max_kl=cfg.keep_max_kl, min_agreement=cfg.keep_min_agreement)
                    if decided.error is not None:
                        fatal = decided.error
                        break
                    known, probe_usage, decision = decided.known, decided.usage, decided.record
                    if is_main:
                        progress.write(decision_line(decision))
                error, result = None, None
                try:
                    result = runner(images, targets, state.global_step, known=known)
                except FATAL_ERRORS as err:
                    error = str(err)
                stats = torch.zeros(len(_STATS), dtype=torch.float64)
                if result is not None:
                    b, u, s = result.images, result.usage + probe_usage, result.stats
                    stats += torch.tensor([float(result.loss.total.detach()) * b, float(result.loss.ce) * b,
                                           float(result.loss.kd) * b, b, u.gflops, u.full_gflops, u.cost,
                                           u.requests, 0, s.wait_s, s.teacher_s, 0, 0, probe_usage.gflops,
                                           probe_usage.cost, result.kept], dtype=torch.float64)
                stats[_STATS.index("fatal")] = 1.0 if error else 0.0
                if client is not None:
                    stats[_STATS.index("mismatched")] = client.mismatched_requests - refused_before[0]
                    stats[_STATS.index("rebilled")] = client.rebilled_requests - refused_before[1]
                stats = ctx.all_reduce(stats)
                if stats[_STATS.index("fatal")] > 0:
                    fatal = next((m for m in ctx.all_gather_object(error) if m), "fatal teacher error")
                    break
                assert result is not None
                optimizer.zero_grad(set_to_none=True)
                result.loss.total.backward()
                optimizer.step()
                scheduler.step()
                ep += stats
                _account(state, stats, i + 1 if i + 1 < steps_per_epoch else 0)
                if decision is not None:
                    state.keep_decisions.append(decision)
                row = _step_row(state, stats, epoch, time.perf_counter() - t0, optimizer.param_groups[0]["lr"])
                if prober is not None and selector is not None:
                    row.update(keep_strategy=selector.strategy, keep=selector.keep)
                if is_main:
                    _log_step(writer, progress, cfg, state, row)
                if ctx.under_ray and state.global_step % cfg.progress_every == 0:  # every rank: a collective
                    ctx.report({"kind": "step", **{k: v for k, v in row.items() if v != ""}})
            if fatal is not None:
                break
            if state.batches_into_epoch == 0:  # else max_steps stopped it mid-epoch; a resume continues there
                state.epochs_done += 1
            last_acc = _evaluate(ctx, model, eval_loader, normalize)
            _end_epoch(cfg, ctx, writer, progress, state, ep, last_acc, epoch, time.perf_counter() - ep_start,
                       raw, model_kwargs, optimizer, scheduler, class_names)
    finally:
        progress.close()
        if writer is not None:
            writer.close()
        if stream is not None:
            stream.close(timeout_s=5.0)
        if client is not None:
            client.close()
    return _finish(cfg, ctx, state, fatal_error=fatal, started=started, accuracy=last_acc)


def _maybe_inject_failure(cfg: TrainConfig, ctx: Context, state: TrainState) -> None:
    """Recovery testing: crash rank 0 once at step `fail_at_step` (a marker file makes it happen only once)."""
    if cfg.fail_at_step is None or ctx.rank != 0 or state.global_step != cfg.fail_at_step:
        return
    marker = Path(cfg.out) / ".failure_injected"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(state.global_step))
        raise RuntimeError(f"injected failure at step {state.global_step}")


def _done(cfg: TrainConfig, state: TrainState) -> bool:
    return cfg.max_steps is not None and state.global_step >= cfg.max_steps


def _account(state: TrainState, stats: torch.Tensor, batches_into_epoch: int) -> None:
    s = dict(zip(_STATS, stats.tolist()))
    state.global_step += 1
    state.batches_into_epoch = batches_into_epoch
    state.images_seen += int(s["images"])
    state.teacher_gflops += s["gflops"]
    state.teacher_full_gflops += s["full_gflops"]
    state.teacher_cost += s["cost"]
    state.teacher_requests += int(s["requests"])
    state.teacher_mismatched_requests += int(s["mismatched"])
    state.teacher_rebilled_requests += int(s["rebilled"])
    state.probe_gflops += s["probe_gflops"]
    state.probe_cost += s["probe_cost"]
    state.kept += s["kept"]


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
    return root, (f"--data {cfg.data} is not {what} on {ctx.node} (rank {ctx.rank}): on a Ray cluster it must "
                  "exist on every node (a shared or copied path)")


def _run_precision(cfg: TrainConfig, ctx: Context, state: TrainState) -> str:
    """The student's precision for this run: `--precision auto` is resolved once, at the run's start, by rank 0 (on
    its device, for every rank), and a resumed run keeps it, so the bytes it re-sends come from the same numerics."""
    if cfg.precision == "auto" and state.precision:
        return state.precision
    return str(ctx.all_gather_object(resolve_precision(cfg.precision, ctx.device))[0])


# What decides which images a request id carries: a resume must keep them (its re-sent ids may take the answers
# billed under them, student_client/resend.py). `data` is compared by its last path component (a moved run may mount
# the same data elsewhere).
IMAGE_SETTINGS = ("data", "seed", "batch_size", "workers", "augment")


def _resume_changes_images(cfg: TrainConfig, out: Path) -> str | None:
    """A one-line refusal when --resume changes a setting that decides the images under each request id."""
    try:
        started_with = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None  # a run from before config.json was written: nothing to compare
    now = json.loads(cfg.to_json())
    for name in IMAGE_SETTINGS:
        before, after = started_with.get(name), now.get(name)
        if name == "data" and before is not None and after is not None:
            before, after = Path(str(before)).name, Path(str(after)).name
        if before is not None and before != after:
            flag = "--" + name.replace("_", "-")
            return (f"--resume: this run was started with {flag} {before}, not {after}; its re-sent requests would "
                    f"carry other images under the same ids: resume with {flag} {before}, or train into a new --out")
    return None


def _resume_mismatch(ctx: Context, state: TrainState) -> str | None:
    """Ranks that restored different checkpoints (a --resume from an --out that is not shared) must not train."""
    steps = ctx.all_gather_object(state.global_step)
    if len(set(steps)) <= 1:
        return None
    return (f"workers restored different checkpoints (global step by rank: {steps}): resume from --storage, or "
            "make --out a path shared by every node")


def _step_row(state: TrainState, stats: torch.Tensor, epoch: int, step_s: float, lr: float) -> dict[str, Any]:
    s = dict(zip(_STATS, stats.tolist()))
    n = max(1.0, s["images"])
    return {
        "step": state.global_step, "epoch": epoch, "loss": s["loss"] / n, "ce": s["ce"] / n, "kd": s["kd"] / n,
        "lr": lr, "images": int(s["images"]), "img_per_s": s["images"] / max(step_s, 1e-9), "step_s": step_s,
        "teacher_gflops": s["gflops"], "teacher_full_gflops": s["full_gflops"], "teacher_cost": s["cost"],
        "total_teacher_gflops": state.teacher_gflops,
        "total_saved_gflops": state.teacher_full_gflops - state.teacher_gflops,
        "overlap": 1 - s["wait_s"] / s["teacher_s"] if s["teacher_s"] > 0 else "", "teacher_wait_s": s["wait_s"],
        "probe_gflops": s["probe_gflops"], "probe_cost": s["probe_cost"], "kept_fraction": s["kept"] / n,
    }


def _log_step(writer: MetricsWriter | None, progress: Progress, cfg: TrainConfig, state: TrainState,
              row: dict[str, Any]) -> None:
    if writer is not None and state.global_step % max(1, cfg.log_every) == 0:
        writer.log_step(row)
    progress.update(1, {"loss": row["loss"], "img_per_s": row["img_per_s"], "gflops": state.teacher_gflops,
                        "saved": row["total_saved_gflops"]})


def _evaluate(
    ctx: Context, model: torch.nn.Module, loader: DataLoader | None, normalize: Normalizer,
) -> Accuracy | None:
    if loader is None:
        return None
    acc = count_correct(unwrap(model), loader, normalize, ctx.device)
    counts = ctx.all_reduce(torch.tensor([acc.top1_correct, acc.top5_correct, acc.images], dtype=torch.float64))
    return Accuracy(int(counts[0]), int(counts[1]), int(counts[2]))


def _end_epoch(cfg: TrainConfig, ctx: Context, writer: MetricsWriter | None, progress: Progress, state: TrainState,
               ep: torch.Tensor, acc: Accuracy | None, epoch: int, epoch_s: float, raw: torch.nn.Module,
               model_kwargs: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any,
               class_names: list[str]) -> None:
    """Epoch metrics, then (rank 0) a checkpoint; every worker reports it to Ray Train (a sync point)."""
    s = dict(zip(_STATS, ep.tolist()))
    n = max(1.0, s["images"])
    row = {
        "epoch": epoch, "step": state.global_step, "train_loss": s["loss"] / n, "train_ce": s["ce"] / n,
        "train_kd": s["kd"] / n, "val_top1": acc.top1 if acc else "", "val_top5": acc.top5 if acc else "",
        "images": int(s["images"]), "epoch_s": epoch_s, "teacher_gflops": s["gflops"],
        "teacher_full_gflops": s["full_gflops"], "teacher_cost": s["cost"],
        "teacher_saving": 1 - s["gflops"] / s["full_gflops"] if s["full_gflops"] else "",
        "overlap": 1 - s["wait_s"] / s["teacher_s"] if s["teacher_s"] > 0 else "",
    }
    state.history.append(row)
    if acc is not None:
        state.best_top1 = max(state.best_top1 or 0.0, acc.top1)
    ckpt_dir = None
    if ctx.rank == 0:
        assert writer is not None
        writer.log_epoch(row)
        if not ctx.under_ray:  # a Ray run's driver prints it from the report
            progress.write(epoch_line(row))
        ckpt_dir = save_training_checkpoint(
            cfg.out, model=raw, model_name=cfg.student, model_kwargs=model_kwargs, optimizer=optimizer,
            scheduler=scheduler, state=state,
            extra={"class_names": class_names, "val_top1": row["val_top1"], "val_top5": row["val_top5"],
                   "mode": cfg.mode, "strategy": cfg.strategy, "keep": cfg.keep},
        )
        prune_checkpoints(cfg.out, cfg.keep_checkpoints)
    ctx.report({k: v for k, v in row.items() if v != ""} | {"global_step": state.global_step, "kind": "epoch"},
               ckpt_dir)


def _finish(cfg: TrainConfig, ctx: Context, state: TrainState, *, fatal_error: str | None, started: float,
            accuracy: Accuracy | None = None) -> dict[str, Any]:
    full, used = state.teacher_full_gflops, state.teacher_gflops
    summary: dict[str, Any] = {
        "fatal_error": fatal_error or "", "epochs_done": state.epochs_done, "global_step": state.global_step,
        "steps_into_epoch": state.batches_into_epoch,  # > 0: --max-steps stopped it inside epoch epochs_done + 1
        "images_seen": state.images_seen, "val_top1": accuracy.top1 if accuracy else None,
        "val_top5": accuracy.top5 if accuracy else None, "val_images": accuracy.images if accuracy else 0,
        "teacher_gflops": used, "teacher_full_gflops": full, "teacher_saved_gflops": full - used,
        "teacher_saving": (full - used) / full if full else 0.0, "teacher_cost": state.teacher_cost,
        "teacher_requests": state.teacher_requests,
        "teacher_mismatched_requests": state.teacher_mismatched_requests,
        "teacher_rebilled_requests": state.teacher_rebilled_requests, "precision": state.precision,
        "wall_s": time.perf_counter() - started,
        "mode": cfg.mode, "strategy": cfg.strategy, "keep": cfg.keep, "out": str(Path(cfg.out).resolve()),
        "overlap": _mean_overlap(state), "probe_gflops": state.probe_gflops, "probe_cost": state.probe_cost,
        "keep_decisions": state.keep_decisions, "kept_fraction": state.kept / max(1, state.images_seen),
    }
    if ctx.rank == 0:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    ctx.report({k: v for k, v in summary.items() if v is not None} | {"final": True, "kind": "final"})
    return summary


def _mean_overlap(state: TrainState) -> float | None:
    values = [h["overlap"] for h in state.history if isinstance(h.get("overlap"), float)]
    return sum(values) / len(values) if values else None
