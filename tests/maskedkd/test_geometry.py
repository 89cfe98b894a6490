"""One geometry spec: read from the timm model, sent in GetModelInfo, read back to the same value."""

from __future__ import annotations

import pytest
import timm

from maskedkd.geometry import TeacherGeometry
from maskedkd.v1 import teacher_pb2 as pb

pytestmark = pytest.mark.dtype("none")  # no model numerics


def test_from_model_reads_timm() -> None:
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=(32, 48), patch_size=4, num_classes=10, reg_tokens=2
    )
    g = TeacherGeometry.from_model(model)
    assert (g.image_size, g.patch_size, g.in_chans, g.num_classes) == ((32, 48), 4, 3, 10)
    assert g.grid_size == tuple(model.patch_embed.grid_size) == (8, 12)
    assert g.num_patches == model.patch_embed.num_patches == 96
    assert g.num_prefix_tokens == model.num_prefix_tokens == 3
    assert g.mean == pytest.approx(model.pretrained_cfg["mean"]) and g.std == pytest.approx(model.pretrained_cfg["std"])


def test_proto_round_trip() -> None:
    g = TeacherGeometry(
        image_size=(32, 48),
        patch_size=4,
        in_chans=3,
        num_prefix_tokens=1,
        num_classes=10,
        mean=(0.5, 0.25, 0.125),
        std=(0.5, 0.5, 0.5),
    )  # exact in float32, as the proto carries it
    msg = pb.ModelInfo.FromString(pb.ModelInfo(model="m", **g.proto_fields()).SerializeToString())
    assert (msg.grid_height, msg.grid_width) == (8, 12)
    assert TeacherGeometry.from_proto(msg) == g


def test_inconsistent_info_is_refused() -> None:
    msg = pb.ModelInfo(
        image_height=32, image_width=32, patch_size=4, grid_height=4, grid_width=8, in_chans=1, mean=[0.5], std=[0.5]
    )
    with pytest.raises(ValueError, match="grid 4x8 disagrees"):
        TeacherGeometry.from_proto(msg)
    with pytest.raises(ValueError, match="mean/std need 3 values"):
        TeacherGeometry(
            image_size=(8, 8), patch_size=4, in_chans=3, num_prefix_tokens=0, num_classes=2, mean=(0.5,), std=(0.5,)
        )
