"""MaskedKD in a PyTorch Lightning module: `training_step` returns `kd(images, labels)`; Lightning runs backward.

    python examples/lightning_loop.py --teacher 127.0.0.1:50051 --api-key $KEY --steps 3

The MaskedKD is made in `on_fit_start`, when the student is already on its device; its request ids carry Lightning's
`global_step`, so a run resumed from a Lightning checkpoint re-sends the same ids and is not billed twice.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
from _shared import parse_args, report, student_and_loader

from student_client import MaskedKD, TeacherClient


class MaskedKDModule(L.LightningModule):
    def __init__(self, student: torch.nn.Module, args: argparse.Namespace) -> None:
        super().__init__()
        self.student = student
        self.args = args
        self.kd: MaskedKD | None = None
        self.teacher: TeacherClient | None = None
        self.losses: list[float] = []

    def on_fit_start(self) -> None:
        self.teacher = TeacherClient(self.args.teacher, self.args.api_key)
        self.kd = MaskedKD(
            self.student, self.teacher, keep=self.args.keep, run_id=self.args.run_id, seed=self.args.seed
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        assert self.kd is not None
        images, labels = batch
        return self.kd(images, labels, step=self.global_step)

    def on_train_batch_end(self, outputs: Any, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        # After the backward: reading the loss parts sooner would hold the backward behind the forward on a GPU.
        assert self.kd is not None
        self.log_dict(
            {"ce": self.kd.last.ce, "kd": self.kd.last.kd, "teacher_gflops": self.kd.last.billed.gflops},
            on_step=True,
            batch_size=batch[0].shape[0],
        )
        self.losses.append(self.kd.last.loss)

    def on_fit_end(self) -> None:
        assert self.kd is not None and self.teacher is not None
        self.kd.close()
        self.teacher.close()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.student.parameters(), lr=self.args.lr)


def main() -> None:
    args = parse_args("MaskedKD in a PyTorch Lightning module")
    student, loader = student_and_loader(args)
    module = MaskedKDModule(student, args)
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=loader)
    assert module.kd is not None
    report(module.kd, module.losses, args)
    if args.save:
        torch.save(student.state_dict(), args.save)


if __name__ == "__main__":
    main()
