"""Model checkpoints: safetensors weights plus the metadata needed to rebuild the timm model without extra flags.

A checkpoint written by `save_model_checkpoint` carries, in the safetensors header, the timm architecture name and
the keyword arguments it was built with, so `load_model(checkpoint=path)` needs nothing else. Plain torch files
(`.pt`/`.pth`, a state dict or a dict holding one under `model`/`state_dict`) and foreign safetensors files load too,
given the model name and kwargs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from maskedkd.text import first_line

CHECKPOINT_FORMAT = "maskedkd-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the requested model."""


@dataclass
class CheckpointMeta:
    model_name: str  # timm architecture name
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # kwargs passed to timm.create_model
    extra: dict[str, Any] = field(default_factory=dict)  # anything else (class names, epoch, metrics)


def save_model_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    *,
    model_name: str,
    model_kwargs: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the model's weights and rebuild metadata to `path` (a .safetensors file), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "model_name": model_name,
        "model_kwargs": json.dumps(model_kwargs, sort_keys=True),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def read_checkpoint_meta(path: str | Path) -> CheckpointMeta | None:
    """The rebuild metadata of one of our safetensors checkpoints, or None for any other file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if meta.get("format") != CHECKPOINT_FORMAT:
        return None
    return CheckpointMeta(meta["model_name"], json.loads(meta["model_kwargs"]), json.loads(meta.get("extra", "{}")))


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a safetensors file or a torch file (state dict, or dict with `model`/`state_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    for key in ("model", "state_dict", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict")
    return obj


def load_model(
    model_name: str | None = None,
    *,
    checkpoint: str | Path | None = None,
    model_kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
) -> tuple[torch.nn.Module, CheckpointMeta]:
    """Build a timm model in eval mode, from our checkpoint, a foreign checkpoint plus name/kwargs, or the hub.

    Explicit `model_kwargs` override those stored in the checkpoint. `pretrained=True` downloads from the hub.
    """
    meta = read_checkpoint_meta(checkpoint) if checkpoint else None
    name = model_name or (meta.model_name if meta else None)
    if not name:
        raise CheckpointError("a model name is needed: this checkpoint does not say which architecture it holds")
    if meta and model_name and model_name != meta.model_name:
        raise CheckpointError(f"checkpoint holds {meta.model_name!r}, not {model_name!r}")
    kwargs = {**(meta.model_kwargs if meta else {}), **(model_kwargs or {})}
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    except RuntimeError as exc:
        raise CheckpointError(f"unknown model {name!r}: {exc}") from exc
    if checkpoint:
        state = load_state_dict(checkpoint)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {checkpoint} does not fit {name} {kwargs}: {first_line(exc)}") from exc
    model.eval()
    return model, meta or CheckpointMeta(name, kwargs)
