"""Teacher-fidelity probe (no training): how far the masked teacher's answer moves from the full teacher's.

For a trained teacher and student checkpoint, over a test split: the student's SIPS picks the teacher's patches
(or random / bottom-k), and per keep and strategy we report KL(teacher full || teacher masked) (nats, mean over
images), top-1 agreement of the masked with the full teacher, the masked teacher's top-1 accuracy, and how often
the masked teacher agrees with the student. The teacher sees the student's images resized to its own resolution
(bilinear, as the client does) and normalized with its own mean/std, exactly as the server would.

    python -m experiments.fidelity_probe --teacher T.safetensors --student S.safetensors --data DIR \\
        [--split test] [--max-images 2000] [--json out.json] [--doc docs/reproduction.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from experiments.datasets import evenly_spaced
from student_client.distill.keep_auto import LADDER

KEEPS = (1.0, *LADDER)  # every rung `--keep auto` tries, and the full image
STRATEGIES = ("sips", "random", "bottom")
SECTION = "fidelity"


def _normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    return (x - m) / torch.tensor(std, device=x.device).view(1, -1, 1, 1)


@torch.inference_mode()
def probe(
    teacher_ckpt: Path,
    student_ckpt: Path,
    data: Path,
    *,
    split: str | None = None,
    max_images: int | None = None,
    batch_size: int = 100,
    seed: int = 0,
    device: str = "cpu",
    keeps: tuple[float, ...] = KEEPS,
    strategies: tuple[str, ...] = STRATEGIES,
) -> dict[str, Any]:
    from maskedkd.checkpoints import load_model
    from maskedkd.keep import num_keep
    from maskedkd.masked_teacher import MaskedTeacher
    from student_client.data import eval_transform, image_folder
    from student_client.distill.losses import merged_logits
    from student_client.distill.sips import SIPSCapture, select_patches
    from student_client.student import describe_student
    from student_client.training.checkpointing import resolve_model_file
    from student_client.training.evaluate import eval_split_dir
    from student_client.transport.wire import to_teacher_resolution

    dev = torch.device(device)
    teacher = MaskedTeacher(load_model(checkpoint=resolve_model_file(teacher_ckpt))[0].to(dev))
    student = load_model(checkpoint=resolve_model_file(student_ckpt))[0].to(dev)
    spec = describe_student(student)
    if spec.grid_size is None:
        raise ValueError("the student has no patch grid: SIPS needs a ViT student")
    dataset = image_folder(eval_split_dir(data, split), eval_transform(spec.image_size))
    if max_images is not None and max_images < len(dataset):
        dataset = Subset(dataset, evenly_spaced(len(dataset), max_images))  # type: ignore[assignment]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    gen = torch.Generator().manual_seed(seed)
    sums: dict[tuple[str, float], dict[str, float]] = {
        (s, k): {"kl": 0.0, "agree": 0.0, "correct": 0.0, "agree_student": 0.0, "entropy": 0.0}
        for s in strategies
        for k in keeps
    }
    full_correct = student_correct = full_agree_student = images = 0
    full_entropy = 0.0
    with SIPSCapture(student) as capture:
        for x, y in loader:  # x [B,C,h,w] in [0,1]
            x, y = x.to(dev), y.to(dev)
            s_logits = merged_logits(student(_normalize(x, spec.mean, spec.std)))  # [B,classes]; fills capture
            scores = capture.scores  # [B, N_student]
            assert scores is not None
            g = teacher.geometry
            xt = _normalize(to_teacher_resolution(x, g.image_size), g.mean, g.std)  # [B,C,H,W]
            full = teacher(xt)  # [B,classes]
            log_p = F.log_softmax(full.float(), dim=1)
            full_entropy += float(-(log_p.exp() * log_p).sum())
            s_top, t_top = s_logits.argmax(1), full.argmax(1)
            full_correct += int((t_top == y).sum())
            student_correct += int((s_top == y).sum())
            full_agree_student += int((t_top == s_top).sum())
            images += int(y.numel())
            for strategy in strategies:
                for keep in keeps:
                    idx = select_patches(
                        scores,
                        keep,
                        strategy,
                        teacher_grid=teacher.geometry.grid_size,
                        student_grid=spec.grid_size,
                        generator=gen,
                    )  # [B,K]
                    masked = teacher(xt, idx)  # [B,classes]
                    log_q = F.log_softmax(masked.float(), dim=1)
                    acc = sums[(strategy, keep)]
                    acc["kl"] += float((log_p.exp() * (log_p - log_q)).sum())
                    acc["entropy"] += float(-(log_q.exp() * log_q).sum())  # how soft the KD target is
                    m_top = masked.argmax(1)
                    acc["agree"] += int((m_top == t_top).sum())
                    acc["correct"] += int((m_top == y).sum())
                    acc["agree_student"] += int((m_top == s_top).sum())
    if images == 0:
        raise ValueError(f"no images in {data}")
    rows = [
        {
            "strategy": s,
            "keep": k,
            "kept": num_keep(k, teacher.geometry.num_patches),
            "kl": v["kl"] / images,
            "top1_agreement": v["agree"] / images,
            "teacher_top1": 100 * v["correct"] / images,
            "agreement_with_student": v["agree_student"] / images,
            "entropy": v["entropy"] / images,
        }
        for (s, k), v in sums.items()
    ]
    return {
        "teacher": str(teacher_ckpt),
        "student": str(student_ckpt),
        "data": str(data),
        "images": images,
        "teacher_num_patches": teacher.geometry.num_patches,
        "teacher_full_top1": 100 * full_correct / images,
        "student_top1": 100 * student_correct / images,
        "teacher_full_agreement_with_student": full_agree_student / images,
        "teacher_full_entropy": full_entropy / images,
        "rows": rows,
    }


def markdown(result: dict[str, Any], command: str, title: str = "Teacher fidelity under masking") -> str:
    lines = [
        f"## {title}",
        "",
        f"Made by `{command}`: no training; teacher `{result['teacher']}`, student `{result['student']}`, "
        f"{result['images']} test images. Full teacher top-1 {result['teacher_full_top1']:.2f}%, student top-1 "
        f"{result['student_top1']:.2f}%, full teacher agrees with the student on "
        f"{100 * result['teacher_full_agreement_with_student']:.1f}% of images.",
        "",
        "KL is KL(teacher full || teacher masked) in nats, mean over images; agreement is top-1 agreement with the "
        "full teacher; entropy is the masked teacher's answer's (softmax at tau 1, nats, mean over images: how soft "
        f"the KD target is; the full teacher's: {_nats(result.get('teacher_full_entropy'))}).",
        "",
        "| strategy | keep | patches | KL | top-1 agreement | masked teacher top-1 | agrees with student | entropy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        result["rows"],
        key=lambda r: (STRATEGIES.index(r["strategy"]) if r["strategy"] in STRATEGIES else 9, -r["keep"]),
    ):
        lines.append(
            f"| {r['strategy']} | {100 * r['keep']:g}% | {r['kept']} | {r['kl']:.4f} | "
            f"{100 * r['top1_agreement']:.1f}% | {r['teacher_top1']:.2f}% | "
            f"{100 * r['agreement_with_student']:.1f}% | {_nats(r.get('entropy'))} |"
        )
    return "\n".join(lines) + "\n"


def _nats(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"  # n/a: a probe recorded before entropies were


def write_outputs(
    result: dict[str, Any],
    command: str,
    *,
    json_path: Path | None,
    doc: Path | None,
    section: str = SECTION,
    title: str = "Teacher fidelity under masking",
) -> None:
    from experiments.doc_sections import update_section

    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"command": command, **result}, indent=2) + "\n")
    if doc is not None:
        update_section(doc, section, markdown(result, command, title))


def main(argv: list[str] | None = None) -> int:
    import shlex

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m experiments.fidelity_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, type=Path, help="teacher checkpoint (.safetensors or run dir)")
    parser.add_argument("--student", required=True, type=Path, help="student checkpoint (.safetensors or run dir)")
    parser.add_argument("--data", required=True, type=Path, help="ImageFolder root (test/ or val/ is used)")
    parser.add_argument("--split", default=None)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="for the random strategy")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--doc", type=Path, default=None, help="write/replace the section in this markdown file")
    parser.add_argument("--section", default=SECTION, help="name of the section it owns in --doc")
    args = parser.parse_args(argv)
    try:
        result = probe(
            args.teacher,
            args.student,
            args.data,
            split=args.split,
            max_images=args.max_images,
            seed=args.seed,
            device=args.device,
        )
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"fidelity_probe: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    command = shlex.join(["python", "-m", "experiments.fidelity_probe", *argv])
    write_outputs(result, command, json_path=args.json, doc=args.doc, section=args.section)
    print(markdown(result, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
