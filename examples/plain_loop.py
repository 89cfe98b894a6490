"""MaskedKD in a plain PyTorch loop: a few steps of a CIFAR-size ViT student against a running teacher server.

python examples/plain_loop.py --teacher 127.0.0.1:50051 --api-key $KEY --steps 3
"""

from __future__ import annotations

import torch
from _shared import batches, parse_args, report, student_and_loader

from student_client import MaskedKD, TeacherClient


def main() -> None:
    args = parse_args("MaskedKD in a plain PyTorch training loop")
    student, loader = student_and_loader(args)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    student.train()
    losses: list[float] = []
    with (
        TeacherClient(args.teacher, args.api_key) as teacher,
        MaskedKD(student, teacher, keep=args.keep, run_id=args.run_id, seed=args.seed) as kd,
    ):
        for step, (images, labels) in enumerate(batches(loader, args.steps)):
            loss = kd(images, labels, step=step)  # student forward, SIPS, kept patches to the teacher, CE + KD
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            print(
                f"step {step}: loss {kd.last.loss:.4f} (ce {kd.last.ce:.4f}, kd {kd.last.kd:.4f}), teacher "
                f"{kd.last.billed.gflops:.4f} GFLOPs, {100 * kd.last.overlap:.0f}% of its time hidden"
            )
        report(kd, losses, args)
    if args.save:
        torch.save(student.state_dict(), args.save)


if __name__ == "__main__":
    main()
