"""Bytes on the wire per image: the serialized `InferRequest` the product's client builds, divided by the batch.

The request is built by `student_client.transport.wire.build_request` from un-normalized images exactly as training
sends them (pixels that are k/255 travel as uint8; only the kept patches go, with int16 positions). At keep 100% the
client sends the whole image and no positions. References: the kept share of the raw uint8 image
(keep x C*H*W bytes) and the full image as float32 (4*C*H*W bytes).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from benchmarks.compute.teacher import build_teacher
from benchmarks.config import KEEPS, BenchConfig
from maskedkd.keep import num_keep
from student_client.transport.wire import ModelInfo, build_request, new_request_id


def model_info_of(teacher: Any, name: str) -> ModelInfo:
    """The ModelInfo a server would announce for this teacher (no server needed to size a request)."""
    return ModelInfo(
        **asdict(teacher.geometry),
        model=name,
        full_gflops=teacher.gflops(teacher.geometry.num_patches),
        price_per_gflop=0.0,
        currency="USD",
        max_batch_images=0,
    )


def run_wire_section(cfg: BenchConfig) -> dict[str, Any]:
    models = []
    gen = torch.Generator().manual_seed(0)
    for case in cfg.models:
        teacher = build_teacher(case)
        info = model_info_of(teacher, case.timm_name)
        b, (h, w), c = cfg.wire_batch, teacher.geometry.image_size, teacher.geometry.in_chans
        images = torch.randint(0, 256, (b, c, h, w), generator=gen).float() / 255.0  # [B,C,H,W], k/255 as in training
        raw_uint8 = c * h * w
        rows = []
        for keep in KEEPS:
            kept = num_keep(keep, teacher.geometry.num_patches)
            if kept == teacher.geometry.num_patches:
                keep_indices = None  # strategy `all` / full KD: the client sends the image itself
            else:
                noise = torch.rand(b, teacher.geometry.num_patches, generator=gen)
                keep_indices = noise.argsort(dim=1)[:, :kept].sort(dim=1).values  # [B,K]
            request = build_request(info, images=images, keep_indices=keep_indices, request_id=new_request_id())
            per_image = len(request.serialize()) / b
            kept_raw = raw_uint8 * kept / teacher.geometry.num_patches
            rows.append(
                {
                    "keep": keep,
                    "kept": kept,
                    "payload": request.message.WhichOneof("input"),
                    "pixel_dtype": getattr(request.message, request.message.WhichOneof("input")).dtype,
                    "bytes_per_image": per_image,
                    "kept_uint8_bytes": kept_raw,
                    "vs_kept_uint8": per_image / kept_raw,
                    "vs_float32_image": per_image / (4 * raw_uint8),
                }
            )
        models.append(
            {
                "model": case.key,
                "label": case.label,
                "image": [c, h, w],
                "batch": b,
                "raw_uint8_bytes": raw_uint8,
                "float32_image_bytes": 4 * raw_uint8,
                "rows": rows,
            }
        )
    return {"models": models}
