"""`--init`: start the student from existing weights instead of a fresh initialization (fine-tuning a pretrained
student is the common case of distillation): a `.safetensors` or `.pth` state dict, e.g. a `model.safetensors` that
`student-client train` wrote or a timm checkpoint. The optimizer and the learning-rate schedule start fresh (that is
the difference from `--resume`).

Adapted, as timm adapts its own pretrained weights: a position embedding of another patch grid is resampled and a
patch embedding of another patch size resized (the model family's `checkpoint_filter_fn`), and a classifier head of
another number of classes is left at its fresh initialization. Any other mismatch is an error naming the tensor.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from timm.models import load_state_dict
from torch import nn

from maskedkd.text import one_line
from student_client.student import classifier_modules


class StudentInitError(ValueError):
    """The --init weights cannot be read or do not fit the student; str(err) is one line."""


def _head_parameter_names(model: nn.Module) -> set[str]:
    heads = {id(h) for h in classifier_modules(model)}
    return {
        f"{name}.{p}" if name else p
        for name, module in model.named_modules()
        if id(module) in heads
        for p, _ in module.named_parameters(recurse=True)
    }


def init_student(model: nn.Module, path: str | Path, *, assign: bool = False) -> list[str]:
    """Load the weights at `path` into `model`; returns the names left at their fresh init (a resized head).

    `assign=True` for a model on the meta device (the preflight check: shapes only)."""
    if not Path(path).is_file():
        raise StudentInitError(f"--init: no file {path}")
    try:
        state: dict[str, torch.Tensor] = load_state_dict(str(path), use_ema=False)
    except Exception as err:  # safetensors, torch.load and pickle raise many kinds for a file that is not a state dict
        reason = one_line(err, 160) or type(err).__name__
        raise StudentInitError(f"--init: {path} is not a state dict (.safetensors or .pth): {reason}") from err
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as err:  # a family's filter assumes its own checkpoint layout
            raise StudentInitError(f"--init: {path} does not fit {type(model).__name__}: {one_line(err)}") from err
    own = model.state_dict()
    heads = _head_parameter_names(model)
    fresh = sorted(k for k in heads if k in state and k in own and state[k].shape != own[k].shape)
    for key in fresh:
        del state[key]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if wrong:
        raise StudentInitError(
            f"--init: {path} does not fit the student: {len(wrong)} tensor(s) of another shape, e.g. {wrong[0]}"
        )
    missing, unexpected = model.load_state_dict(state, strict=False, assign=assign)
    missing = [k for k in missing if k not in fresh]
    if missing or unexpected:
        what = [
            f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
        ]
        raise StudentInitError(f"--init: {path} does not fit the student: {', '.join(w for w in what if w)} tensor(s)")
    return fresh
