"""`student-client`: train a student against a metered MaskedKD teacher, and evaluate checkpoints.

    student-client train --teacher HOST:PORT --api-key KEY --student vit_tiny_patch16_224 \\
        --student-kwargs '{"img_size": 32, "patch_size": 4}' --data data/cifar10-subset --epochs 3 --out runs/s1
    student-client eval --checkpoint runs/s1 --data data/cifar10-subset

Errors are one line on stderr and a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from typing import Any

from student_client.config import MODES, PRECISIONS, STRATEGIES, TRANSPORTS, TrainConfig

EXIT_ERROR = 1
EXIT_USAGE = 2


def _json_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc.msg}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="student-client", description="MaskedKD student: train and evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a timm student (MaskedKD against a teacher, or plain with --mode none)")
    t.add_argument("--teacher", default=os.environ.get("MASKEDKD_TEACHER"),
                   help="HOST:PORT; replicas: HOST:PORT,HOST:PORT,... or dns:///NAME:PORT (env MASKEDKD_TEACHER)")
    t.add_argument("--api-key", default=os.environ.get("MASKEDKD_API_KEY"), help="API key (env MASKEDKD_API_KEY)")
    t.add_argument("--teacher-model", default=None, help="served model name (default: the server's default)")
    t.add_argument("--teacher-ca", default=os.environ.get("MASKEDKD_TEACHER_CA"),
                   help="PEM CA file of the teacher's TLS certificate: connect with TLS (env MASKEDKD_TEACHER_CA)")
    t.add_argument("--teacher-client-cert", default=os.environ.get("MASKEDKD_TEACHER_CLIENT_CERT"),
                   help="PEM client certificate for a teacher with mutual TLS (env MASKEDKD_TEACHER_CLIENT_CERT)")
    t.add_argument("--teacher-client-key", default=os.environ.get("MASKEDKD_TEACHER_CLIENT_KEY"),
                   help="private key of --teacher-client-cert (env MASKEDKD_TEACHER_CLIENT_KEY)")
    t.add_argument("--student", default="vit_tiny_patch16_224", help="timm architecture name")
    t.add_argument("--student-kwargs", type=_json_dict, default={}, help="JSON kwargs for timm.create_model")
    t.add_argument("--data", required=True, help="ImageFolder root with train/ and val/ or test/, or a .tar/.tar.gz "
                   "of one (each node extracts it once into $MASKEDKD_DATA_CACHE, default ~/.cache/maskedkd/data)")
    t.add_argument("--out", required=True, help="output directory: checkpoints, metrics CSVs, summary.json")
    t.add_argument("--storage", default=None,
                   help="Ray Train checkpoint storage: a path every node shares (NFS) or a URI (s3://, gs://); "
                   "default <out>/ray (one machine only)")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--batch-size", type=int, default=64, help="global batch, split over workers")
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--warmup-epochs", type=float, default=0.0)
    t.add_argument("--keep", type=float, default=0.5, help="fraction (or count) of teacher patches kept")
    t.add_argument("--strategy", choices=STRATEGIES, default="sips")
    t.add_argument("--mode", choices=MODES, default="kd")
    t.add_argument("--lambda", dest="lambda_kd", type=float, default=1.0, help="weight of the KD term")
    t.add_argument("--tau", type=float, default=1.0, help="KD temperature")
    t.add_argument("--hard", action="store_true", help="hard distillation: CE on the teacher's argmax")
    t.add_argument("--augment", choices=("simple", "heavy"), default="simple")
    t.add_argument("--train-head-only", action="store_true", help="freeze all but the classifier (App. C)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: a GPU per worker if any")
    t.add_argument("--micro-batches", type=int, default=2, help="pipelining: teacher on i while student on i+1")
    t.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="student forward precision (autocast; SIPS and the loss stay fp32). auto: bf16 where the "
                   "device computes it natively (CPU avx512_bf16/AMX, CUDA >= 8.0), else fp32")
    t.add_argument("--transport", choices=TRANSPORTS, default="stream", help="InferStream or unary Infer calls")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (quick runs)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept in --out")
    t.add_argument("--max-failures", type=int, default=2, help="Ray Train restarts after a worker failure")
    t.add_argument("--threads-per-worker", type=int, default=1)
    t.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes per worker")
    t.add_argument("--teacher-timeout", type=float, default=120.0, help="deadline of one teacher call, seconds")
    t.add_argument("--teacher-patience", type=float, default=120.0,
                   help="seconds to keep retrying an unreachable or restarting teacher (same request ids)")
    t.add_argument("--request-log", default=None,
                   help="debug: append the request id and sha256 of every teacher request to this file")
    t.add_argument("--no-eval", action="store_true", help="skip evaluation after each epoch")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--ray-address", default=None, help="join a Ray cluster (default: start a local Ray)")
    t.add_argument("--ray-logs", action="store_true", help="show Ray worker and controller logs")
    t.add_argument("--local", action="store_true", help="run in this process, one worker, without Ray")

    e = sub.add_parser("eval", help="top-1 / top-5 of a checkpoint on an ImageFolder split")
    e.add_argument("--checkpoint", required=True, help=".safetensors file, checkpoint dir, or a training --out dir")
    e.add_argument("--data", required=True)
    e.add_argument("--split", default=None, help="subfolder (default: val, test, or the folder itself)")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return parser


def _config(args: argparse.Namespace) -> TrainConfig:
    import torch

    use_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    return TrainConfig(
        data=args.data, out=args.out, storage=args.storage, student=args.student, student_kwargs=args.student_kwargs,
        teacher=args.teacher, api_key=args.api_key, teacher_model=args.teacher_model, teacher_ca=args.teacher_ca,
        teacher_client_cert=args.teacher_client_cert, teacher_client_key=args.teacher_client_key,
        teacher_timeout_s=args.teacher_timeout, teacher_patience_s=args.teacher_patience,
        request_log=args.request_log, transport=args.transport, mode=args.mode, strategy=args.strategy,
        keep=args.keep, lambda_kd=args.lambda_kd, tau=args.tau, hard=args.hard, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
        augment=args.augment, train_head_only=args.train_head_only, workers=1 if args.local else args.workers,
        use_gpu=use_gpu, micro_batches=args.micro_batches, precision=args.precision, max_steps=args.max_steps, seed=args.seed,
        resume=args.resume, keep_checkpoints=args.keep_checkpoints, max_failures=args.max_failures,
        threads_per_worker=args.threads_per_worker,
        loader_workers=args.loader_workers, eval=not args.no_eval, progress=not args.no_progress,
    )


def _preflight(cfg: TrainConfig) -> str:
    """Reach the teacher once before starting workers: a bad address or key fails here, in one line."""
    from student_client.client import TeacherClient
    from student_client.data import class_names_of
    from student_client.data_archive import local_data_root
    from student_client.tls import teacher_tls_kwargs

    try:
        classes = class_names_of(local_data_root(cfg.data))  # an archive: extracted here too, to read its classes
    except tarfile.TarError as err:
        raise ValueError(f"--data {cfg.data} is not a readable archive: {err}") from err
    if not classes:
        raise ValueError(f"no class folders under {cfg.data}")
    if cfg.mode == "none":
        return ""
    with TeacherClient(cfg.teacher or "", cfg.api_key or "", timeout_s=10.0, max_retries=1, patience_s=0,
                       model=cfg.teacher_model, **teacher_tls_kwargs(cfg)) as client:
        info = client.info()
        client.check_key()
    if info.num_classes != int(cfg.student_kwargs.get("num_classes", len(classes))):
        raise ValueError(f"teacher {info.model} predicts {info.num_classes} classes but {cfg.data} has "
                         f"{len(classes)} class folders")
    return info.currency


def _print_summary(s: dict[str, Any], currency: str) -> None:
    print(f"done: {s.get('epochs_done')} epochs, {s.get('global_step')} steps, {s.get('images_seen')} images "
          f"({float(s.get('wall_s', 0)):.0f}s training)")
    if s.get("val_top1") is not None:
        print(f"student: top-1 {s['val_top1']:.2f}%  top-5 {s['val_top5']:.2f}% on {s.get('val_images')} images"
              f"  -> {s.get('out')}/model.safetensors")
    if s.get("teacher_full_gflops"):
        print(f"teacher: {s['teacher_gflops']:.4g} GFLOPs used vs {s['teacher_full_gflops']:.4g} for the full teacher:"
              f" saved {s['teacher_saved_gflops']:.4g} GFLOPs ({100 * s['teacher_saving']:.1f}%),"
              f" cost {s['teacher_cost']:.6g} {currency}".rstrip())
    if s.get("teacher_mismatched_requests"):
        print(f"teacher: {s['teacher_mismatched_requests']} re-sent requests no longer matched what was billed under "
              "their ids and were billed again under derived ids")
    if s.get("overlap") is not None:
        print(f"pipeline: {100 * s['overlap']:.0f}% of teacher time hidden behind student compute")


def _train(args: argparse.Namespace) -> int:
    from student_client.checkpointing import latest_checkpoint

    cfg = _config(args)
    currency = _preflight(cfg)
    existing = latest_checkpoint(cfg.out)
    if existing is None and not args.local:
        from student_client.ray_runner import stored_run

        existing = stored_run(cfg)  # Ray Train's checkpoints of the run id in --out, on --storage
    if cfg.resume and existing is None:
        print(f"student-client: no checkpoint in {cfg.out} yet; starting from scratch", file=sys.stderr)
    elif cfg.resume and existing is not None:
        print(f"student-client: resuming from {existing}", file=sys.stderr)
    elif existing is not None:
        print(f"student-client: {cfg.out} holds checkpoints; starting over (pass --resume to continue)",
              file=sys.stderr)
    if args.local:
        from student_client.context import LocalContext
        from student_client.ray_runner import TrainingError
        from student_client.train_loop import run_training

        summary = run_training(cfg, LocalContext())
        if summary.get("fatal_error"):
            raise TrainingError(summary["fatal_error"])
    else:
        from student_client.ray_runner import run_with_ray

        summary = run_with_ray(cfg, ray_address=args.ray_address, worker_logs=args.ray_logs)
    _print_summary(summary, currency)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from student_client.evaluate import evaluate_checkpoint

    acc = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, batch_size=args.batch_size,
                              device=args.device)
    print(f"top-1 {acc.top1:.2f}%  top-5 {acc.top5:.2f}%  ({acc.images} images)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from maskedkd.checkpoints import CheckpointError

    from student_client.errors import TeacherError
    from student_client.ray_runner import TrainingError

    try:
        return _train(args) if args.command == "train" else _eval(args)
    except (TeacherError, TrainingError, CheckpointError, ValueError, FileNotFoundError, OSError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"student-client: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("student-client: interrupted (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
