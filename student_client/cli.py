"""`student-client`: train a student against a metered MaskedKD teacher, and evaluate checkpoints.

    student-client train --teacher HOST:PORT --api-key KEY --student vit_tiny_patch16_224 \\
        --student-kwargs '{"img_size": 32, "patch_size": 4}' --data data/cifar10-subset --epochs 3 --out runs/s1
    student-client eval --checkpoint runs/s1 --data data/cifar10-subset

Errors are one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from maskedkd.settings_cli import EXIT_USAGE, FlagError, OneLineParser, add_settings_flags, settings_from_flags
from student_client.config import ENV_PREFIX, TrainConfig

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


class LaunchOptions(BaseSettings):
    """How `student-client train` runs the TrainConfig (not part of it: the workers never see these)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: a GPU per worker if there is one")
    ray_address: str | None = Field(None, description="join a Ray cluster at HEAD:PORT (default: start a local Ray)")
    ray_logs: bool = Field(False, description="show Ray worker and controller logs")
    local: bool = Field(False, description="run in this process, one worker, without Ray")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="student-client", description="MaskedKD student: train and evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    t = sub.add_parser(
        "train",
        help="train a timm student (MaskedKD against a teacher, or plain with --mode none)",
        description="Every flag also reads env MASKEDKD_STUDENT_<FLAG>; a flag given wins.",
    )
    add_settings_flags(t, TrainConfig)
    add_settings_flags(t, LaunchOptions)

    e = sub.add_parser("eval", help="top-1 / top-5 of a checkpoint on an ImageFolder split")
    e.add_argument("--checkpoint", required=True, help=".safetensors file, checkpoint dir, or a training --out dir")
    e.add_argument("--data", required=True, help="ImageFolder directory, or a .tar/.tar.gz/.tgz of one")
    e.add_argument("--split", default=None, help="subfolder (default: val, test, or the folder itself)")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return parser


def _settings(args: argparse.Namespace) -> tuple[TrainConfig, LaunchOptions]:
    """The validated TrainConfig and LaunchOptions of the given flags (env and defaults fill the rest)."""
    import torch

    launch = settings_from_flags(LaunchOptions, args)
    use_gpu = launch.device == "cuda" or (launch.device == "auto" and torch.cuda.is_available())
    return settings_from_flags(TrainConfig, args, use_gpu=use_gpu, workers=1 if launch.local else None), launch


def resume_command(argv: list[str]) -> str:
    """The command that continues an interrupted run: the same flags plus --resume. An --api-key value becomes
    "$MASKEDKD_API_KEY" (the message must not print the key)."""
    words, hidden = ["student-client"], "@API_KEY@"
    for i, word in enumerate(argv):
        if word.startswith("--api-key="):
            word = "--api-key=" + hidden
        elif i > 0 and argv[i - 1] == "--api-key":
            word = hidden
        words.append(word)
    command = shlex.join([*words, *([] if "--resume" in argv else ["--resume"])])
    return command.replace(hidden, '"$MASKEDKD_API_KEY"')


def _print_summary(s: dict[str, Any], currency: str) -> None:
    epochs = f"{s.get('epochs_done')} epochs"
    if partial := s.get("steps_into_epoch"):
        epochs += f" + {partial} steps of epoch {int(s['epochs_done']) + 1} (stopped by --max-steps)"
    print(
        f"done: {epochs}, {s.get('global_step')} steps, {s.get('images_seen')} images "
        f"({float(s.get('wall_s', 0)):.0f}s training)"
    )
    if s.get("val_top1") is not None:
        print(
            f"student: top-1 {s['val_top1']:.2f}%  top-5 {s['val_top5']:.2f}% on {s.get('val_images')} images"
            f"  -> {s.get('out')}/model.safetensors"
        )
    if s.get("teacher_full_gflops"):
        print(
            f"teacher: {s['teacher_gflops']:.4g} GFLOPs used vs {s['teacher_full_gflops']:.4g} for the full teacher:"
            f" saved {s['teacher_saved_gflops']:.4g} GFLOPs ({100 * s['teacher_saving']:.1f}%),"
            f" cost {s['teacher_cost']:.6g} {currency}".rstrip()
        )
    if s.get("teacher_full_gflops") and s.get("kept_fraction") is not None:
        print(f"teacher input: {100 * s['kept_fraction']:.1f}% of the patches per image on average")
    if s.get("teacher_mismatched_requests"):
        rebilled = s.get("teacher_rebilled_requests", 0)
        print(
            f"teacher: {s['teacher_mismatched_requests']} re-sent requests no longer matched what was billed under "
            f"their ids: {s['teacher_mismatched_requests'] - rebilled} answered with what was billed, {rebilled} "
            "billed again under derived ids"
        )
    if s.get("overlap") is not None:
        print(f"pipeline: {100 * s['overlap']:.0f}% of teacher time hidden behind student compute")


def _train(args: argparse.Namespace) -> int:
    from student_client.training.checkpointing import latest_checkpoint
    from student_client.training.preflight import preflight

    cfg, launch = _settings(args)
    currency = preflight(cfg)
    existing: Path | str | None = latest_checkpoint(cfg.out)
    if existing is None and not launch.local:
        from student_client.training.ray_runner import stored_run

        existing = stored_run(cfg)  # Ray Train's checkpoints of the run id in --out, on --storage
    if cfg.resume and existing is None:
        print(f"student-client: no checkpoint in {cfg.out} yet; starting from scratch", file=sys.stderr)
    elif cfg.resume and existing is not None:
        print(f"student-client: resuming from {existing}", file=sys.stderr)
    elif existing is not None:
        print(
            f"student-client: {cfg.out} holds checkpoints; starting over (pass --resume to continue)", file=sys.stderr
        )
    from student_client.api import train

    summary = train(
        cfg, local=launch.local, ray_address=launch.ray_address, worker_logs=launch.ray_logs, check=False
    )  # preflight ran above, before the resume messages
    _print_summary(summary, currency)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from student_client.training.evaluate import evaluate_checkpoint

    acc = evaluate_checkpoint(
        args.checkpoint, args.data, split=args.split, batch_size=args.batch_size, device=args.device
    )
    print(f"top-1 {acc.top1:.2f}%  top-5 {acc.top5:.2f}%  ({acc.images} images)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except FlagError as err:  # a bad flag: one line, exit 2
        return _error(str(err), EXIT_USAGE)
    from maskedkd.checkpoints import CheckpointError
    from student_client.errors import TeacherError
    from student_client.training.preflight import UsageError
    from student_client.training.ray_runner import TrainingError

    try:
        return _train(args) if args.command == "train" else _eval(args)
    except (FlagError, UsageError) as err:
        return _error(str(err), EXIT_USAGE)
    except (TeacherError, TrainingError, CheckpointError, ValueError, FileNotFoundError, OSError) as err:
        return _error(str(err) or type(err).__name__, EXIT_ERROR)
    except KeyboardInterrupt:
        again = f"; resume with: {resume_command(argv)}" if args.command == "train" else ""
        print(f"student-client: interrupted{again}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def _error(message: str, code: int) -> int:
    print(f"student-client: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
