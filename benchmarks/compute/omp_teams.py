"""What a second OpenMP team costs the thread that computes (maskedkd/torch_threads.py), in one process.

Times the tiny ViT's 8-image served forward (uint8 patches in, as the server stages them) and a training step of it
(batch 32) on this thread: first with no other thread having run torch, then after a thread that ran one parallel op
and exited, then after a helper thread (`helper_pool`) ran one, then with a plain thread alive that ran one (a second
team). Medians of `--repeats` calls, float32, torch's default threads. Order matters: a team, once started, lives as
long as its thread, so the cases run in this order in one process.

    python -m benchmarks.compute.omp_teams
"""

from __future__ import annotations

import argparse
import threading
from concurrent.futures import ThreadPoolExecutor

import timm
import torch

from benchmarks.serving.tenant_loads import ARCH, TINY
from benchmarks.timing import measure
from maskedkd.masked_teacher import MaskedTeacher
from maskedkd.torch_threads import helper_pool
from teacher_server.engine.served_model import make_forward


def _parallel_op() -> None:
    torch.ones(1 << 22).mul_(2)  # large enough for torch to run it on every thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compute.omp_teams", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per case")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    teacher = MaskedTeacher(timm.create_model(ARCH, pretrained=False, **TINY)).eval()
    forward = make_forward(teacher, torch.device("cpu"), torch.float32)
    pixels = torch.randint(0, 256, (8, 32, 3, 4, 4), dtype=torch.uint8)  # [B,K,C,P,P]: keep 50% of 64 patches
    indices = torch.stack([torch.randperm(64)[:32].sort().values for _ in range(8)])  # [B,K]
    student = timm.create_model(ARCH, pretrained=False, **TINY)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))

    def serve() -> None:
        with torch.inference_mode():
            forward(pixels, indices, None)

    def train() -> None:
        loss = torch.nn.functional.cross_entropy(student(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def case(name: str) -> None:
        serve_ms, train_ms = (measure(work, warmup=3, repeats=args.repeats).median_s * 1e3 for work in (serve, train))
        print(f"| {name} | {serve_ms:.1f} | {train_ms:.0f} |")

    print(f"torch threads: {torch.get_num_threads()}, float32, medians of {args.repeats} calls")
    print("| before | 8-image served forward, ms | training step, batch 32, ms |\n|---|---|---|")
    case("nothing on another thread")
    gone = threading.Thread(target=_parallel_op)
    gone.start()
    gone.join()
    case("a parallel op on a thread that has exited")
    with helper_pool(1, "omp-teams-helper") as helper:
        helper.submit(_parallel_op).result()
        case("a parallel op on a live helper thread (helper_pool)")
        with ThreadPoolExecutor(1) as plain:
            plain.submit(_parallel_op).result()
            case("a parallel op on a live plain thread: a second team")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
