"""What both examples share: the command line, the data (un-normalized pixels in [0, 1]), the student, the bill."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from typing import Any

import timm
import torch
from torch.utils.data import DataLoader

from student_client import MaskedKD
from student_client.data import build_datasets, class_names_of


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--teacher",
        default=os.environ.get("MASKEDKD_TEACHER", "127.0.0.1:50051"),
        help="HOST:PORT of the teacher server (env MASKEDKD_TEACHER)",
    )
    p.add_argument("--api-key", default=os.environ.get("MASKEDKD_API_KEY"), help="API key (env MASKEDKD_API_KEY)")
    p.add_argument("--data", default="data/cifar10-subset", help="ImageFolder root with train/")
    p.add_argument("--student", default="vit_tiny_patch16_224", help="timm architecture")
    p.add_argument(
        "--student-kwargs",
        type=json.loads,
        default={"img_size": 32, "patch_size": 4},
        help="JSON kwargs for timm.create_model (num_classes comes from the data)",
    )
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--keep", type=float, default=0.5, help="fraction of the teacher's patches sent")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-id", default=None, help="request-id prefix: a rerun with the same id is not billed again")
    p.add_argument("--save", default=None, help="write the student's state_dict here (torch.save)")
    p.add_argument("--json", action="store_true", help="last line: the losses and the bill as JSON")
    args = p.parse_args()
    if not args.api_key:
        p.error("no API key: pass --api-key or set MASKEDKD_API_KEY")
    return args


def student_and_loader(args: argparse.Namespace) -> tuple[torch.nn.Module, DataLoader]:
    """A timm student (seeded by --seed) and a shuffled loader of [B, C, H, W] pixels in [0, 1] at its size."""
    torch.manual_seed(args.seed)
    classes = len(class_names_of(args.data))
    student = timm.create_model(args.student, pretrained=False, **{**args.student_kwargs, "num_classes": classes})
    size = tuple(student.patch_embed.img_size)
    train_set, _, _ = build_datasets(args.data, size, augment="simple")
    return student, DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True)


def batches(loader: DataLoader, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` batches, going round the loader as often as needed (a new shuffle each time)."""
    done = 0
    while done < steps:
        for images, labels in loader:
            if done == steps:
                return
            yield images, labels
            done += 1


def bill(kd: MaskedKD) -> dict[str, Any]:
    """What the teacher billed this run (kd.total_billed: the ledger's rows of these requests)."""
    b = kd.total_billed
    return {
        "teacher_gflops": b.gflops,
        "teacher_full_gflops": b.full_gflops,
        "teacher_cost": b.cost,
        "teacher_requests": b.requests,
        "teacher_images": b.images,
        "currency": kd.info.currency,
    }


def report(kd: MaskedKD, losses: list[float], args: argparse.Namespace) -> None:
    b = bill(kd)
    print(
        f"teacher bill: {b['teacher_gflops']:.4f} GFLOPs of {b['teacher_full_gflops']:.4f} for the full teacher "
        f"({100 * (1 - kd.total_billed.saving):.1f}%), {b['teacher_requests']} requests, "
        f"cost {b['teacher_cost']:.6g} {b['currency']}".rstrip()
    )
    if args.json:
        print(json.dumps({"losses": losses, **b}))
