"""Masked forward of a timm ViT teacher: only the kept patches are embedded and go through the blocks.

The wrapper reuses the model's own modules (patch projection weights and norm, cls/dist/reg tokens, pos_embed,
norm_pre, blocks, norm, fc_norm, head) and differs from `model(x)` in one place: the position embedding is
gathered for the kept positions, so masked patches cost nothing (paper App. G gathers after the full embedding;
the result is the same). The order of keep_indices does not matter: every kept token carries its own position
embedding and attention and pooling are permutation invariant, so logits only depend on the kept set.

The forward checks shapes and dtypes only, never values: it makes no host sync. keep_indices / keep_counts are
validated once where they enter (`maskedkd.keep.check_keep`: the server's decode, the client's request
building); a duplicated position acts as an extra token, an out-of-range one fails in the gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from timm.layers.mlp import Mlp
from timm.layers.patch_embed import PatchEmbed
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from maskedkd.flops import ViTShape, masked_forward_flops
from maskedkd.geometry import TeacherGeometry
from maskedkd.patches import gather_patches, images_to_patches

SUPPORTED_FAMILIES = (
    "timm VisionTransformer (class token, register tokens, no_embed_class/DeiT3, fc_norm, "
    "global_pool 'token'|'avg'|'max'|'avgmax') and VisionTransformerDistilled (DeiT distilled), "
    "with a fixed img_size, a non-overlapping Conv2d PatchEmbed, a learned absolute pos_embed "
    "and standard Block/Attention/Mlp blocks"
)
_POOLS = ("token", "avg", "max", "avgmax")


class UnsupportedModelError(TypeError):
    """The model is not a ViT this wrapper can mask; the message names the supported families."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"unsupported teacher model: {reason}. Supported: {SUPPORTED_FAMILIES}.")


def check_supported(model: nn.Module) -> None:
    """Raise UnsupportedModelError unless MaskedTeacher reproduces `model(x)` exactly."""
    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(f"{name} is not a timm VisionTransformer")
    if model.dynamic_img_size:
        raise UnsupportedModelError(f"{name} uses dynamic_img_size=True")
    pe = model.patch_embed
    if type(pe) is not PatchEmbed:
        raise UnsupportedModelError(f"{name}.patch_embed is {type(pe).__name__} (hybrid/custom stem), not PatchEmbed")
    proj = pe.proj
    if not (
        isinstance(proj, nn.Conv2d)
        and proj.kernel_size == proj.stride == pe.patch_size
        and proj.padding == (0, 0)
        and proj.dilation == (1, 1)
        and proj.groups == 1
        and pe.patch_size[0] == pe.patch_size[1]
        and pe.flatten
        and not pe.dynamic_img_pad
    ):
        raise UnsupportedModelError(f"{name}.patch_embed is not a plain non-overlapping square-patch conv")
    if model.pos_embed is None:
        raise UnsupportedModelError(f"{name} has no absolute pos_embed (e.g. rope)")
    embed_len = pe.num_patches + (0 if model.no_embed_class else model.num_prefix_tokens)
    if tuple(model.pos_embed.shape) != (1, embed_len, model.embed_dim):
        raise UnsupportedModelError(f"{name}.pos_embed has shape {tuple(model.pos_embed.shape)}")
    if model.attn_pool is not None or model.global_pool not in _POOLS:
        raise UnsupportedModelError(f"{name} uses global_pool={model.global_pool!r}")
    if isinstance(model, VisionTransformerDistilled) and model.reg_token is not None:
        raise UnsupportedModelError(f"{name} mixes a distillation token with register tokens")
    for i, blk in enumerate(model.blocks):
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        if not (
            type(blk) is Block
            and type(attn) is Attention
            and getattr(attn, "gate", None) is None
            and type(mlp) is Mlp
            and isinstance(mlp.fc1, nn.Linear)
            and isinstance(mlp.fc2, nn.Linear)
        ):
            raise UnsupportedModelError(
                f"{name}.blocks[{i}] is {type(blk).__name__}/{type(attn).__name__}/{type(mlp).__name__}"
            )


class MaskedTeacher(nn.Module):
    """Logits of a timm ViT from a subset of its patches; equal to `model(x)` when every patch is kept.

    Put in eval mode at construction (the teacher only serves inference). Inputs are cast to the weights'
    dtype and moved to their device. Images/patches are expected normalized with `mean`/`std`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        check_supported(model)
        assert isinstance(model, VisionTransformer)  # check_supported raised otherwise
        self.model = model
        self._patch_embed: PatchEmbed = model.patch_embed
        proj = self._patch_embed.proj
        assert isinstance(proj, nn.Conv2d) and model.pos_embed is not None
        self._proj = proj
        self._pos_embed: Tensor = model.pos_embed  # [1, embed_len, D]
        self.geometry = TeacherGeometry.from_model(model)
        self.embed_dim: int = int(model.embed_dim)
        self.shape = ViTShape.from_model(model)
        self._pooled_head = model.global_pool != "token" and not isinstance(model, VisionTransformerDistilled)
        raw_weight, raw_bias = _pixels_projection(proj, self.geometry.mean, self.geometry.std)
        self._raw_weight: Tensor  # [D, C*P*P]; buffers follow the module's device and dtype
        self._raw_bias: Tensor  # [D]
        self.register_buffer("_raw_weight", raw_weight, persistent=False)
        self.register_buffer("_raw_bias", raw_bias, persistent=False)
        # weights loaded later (into the teacher, its timm model or the projection itself) are folded again
        proj.register_load_state_dict_post_hook(self._refold_projection)  # type: ignore[no-untyped-call]  # torch leaves it untyped
        self.eval()

    # ---------------------------------------------------------------- public API
    def gflops(self, num_kept: int) -> float:
        """Analytic GFLOPs (2 per multiply-add) of one image with `num_kept` patches."""
        return masked_forward_flops(self.shape, num_kept).total / 1e9

    def embed_patches(self, patches: Tensor, keep_indices: Tensor, *, raw: bool = False) -> Tensor:
        """[B,K,C,P,P] normalized patches (`raw`: un-normalized 0..255 pixels, as `forward_pixels` takes them) at
        positions keep_indices [B,K] -> tokens [B,K,D] incl. pos embed."""
        idx, _ = self._resolve_keep(keep_indices, None, patches.shape[0])
        return self._embed(self._check_patches(patches, idx.shape[1]), idx, raw=raw)

    def forward(self, images: Tensor, keep_indices: Tensor | None = None, keep_counts: Tensor | None = None) -> Tensor:
        """images [B,C,H,W] normalized; keep_indices [B,K] row-major grid positions (None: all) -> logits."""
        g = self.geometry
        if images.dim() != 4 or images.shape[1] != g.in_chans or tuple(images.shape[2:]) != g.image_size:
            raise ValueError(
                f"images must be [B, {g.in_chans}, {g.image_size[0]}, {g.image_size[1]}], got {list(images.shape)}"
            )
        weight = self._proj.weight
        x = images.to(device=weight.device, dtype=weight.dtype)
        if keep_indices is None:
            if keep_counts is not None:
                raise ValueError("keep_counts needs keep_indices")
            patches = images_to_patches(x, g.patch_size)  # [B,N,C,P,P]
            return self._encode(self._embed(patches, None), None)
        idx, valid = self._resolve_keep(keep_indices, keep_counts, x.shape[0])
        return self._forward_kept(gather_patches(x, idx, g.patch_size), idx, valid)  # [B,K,C,P,P] kept

    def forward_patches(self, patches: Tensor, keep_indices: Tensor, keep_counts: Tensor | None = None) -> Tensor:
        """patches [B,K,C,P,P] normalized, only the kept ones, at positions keep_indices [B,K] -> logits."""
        idx, valid = self._resolve_keep(keep_indices, keep_counts, patches.shape[0])
        return self._forward_kept(self._check_patches(patches, idx.shape[1]), idx, valid)

    def forward_pixels(self, pixels: Tensor, keep_indices: Tensor, keep_counts: Tensor | None = None) -> Tensor:
        """pixels [B,K,C,P,P] as sent, un-normalized on the 0..255 scale (uint8, or float), only the kept ones, at
        positions keep_indices [B,K] -> logits. The teacher's mean/std are folded into its patch projection, so the
        pixels are only cast (on the device), never normalized in a pass of their own."""
        idx, valid = self._resolve_keep(keep_indices, keep_counts, pixels.shape[0])
        return self._forward_kept(self._check_patches(pixels, idx.shape[1]), idx, valid, raw=True)

    # ---------------------------------------------------------------- internals
    def _refold_projection(self, _module: nn.Module, _incompatible_keys: object) -> None:
        """After a load into the patch projection: the raw-pixel projection of its new weights, written into the
        buffers in place where they keep their shape, dtype and device (a captured CUDA graph reads them there)."""
        raw_weight, raw_bias = _pixels_projection(self._proj, self.geometry.mean, self.geometry.std)
        for name, value in (("_raw_weight", raw_weight), ("_raw_bias", raw_bias)):
            buffer: Tensor = getattr(self, name)
            if (buffer.shape, buffer.dtype, buffer.device) == (value.shape, value.dtype, value.device):
                with torch.no_grad():
                    buffer.copy_(value)
            else:  # a load with `assign=True` brought weights of another dtype or device
                setattr(self, name, value)

    def _check_patches(self, patches: Tensor, k: int) -> Tensor:
        c, p = self.geometry.in_chans, self.geometry.patch_size
        if patches.dim() != 5 or tuple(patches.shape[1:]) != (k, c, p, p):
            raise ValueError(
                f"patches must be [B, {k}, {c}, {p}, {p}] to match keep_indices, got {list(patches.shape)}"
            )
        weight = self._proj.weight
        return patches.to(device=weight.device, dtype=weight.dtype)

    def _resolve_keep(
        self, keep_indices: Tensor, keep_counts: Tensor | None, batch: int
    ) -> tuple[Tensor, Tensor | None]:
        """Shapes and dtypes only (values are trusted, see the module doc): indices [B,K] on the weights' device
        with padding zeroed, and valid [B,K] (None: every entry is real)."""
        if keep_indices.dim() != 2 or keep_indices.shape[0] != batch or keep_indices.shape[1] < 1:
            raise ValueError(f"keep_indices must be [B={batch}, K>=1], got {list(keep_indices.shape)}")
        if keep_indices.dtype.is_floating_point or keep_indices.dtype.is_complex or keep_indices.dtype == torch.bool:
            raise ValueError(f"keep_indices must be an integer tensor, got {keep_indices.dtype}")
        device = self._proj.weight.device
        idx = keep_indices.to(device=device, dtype=torch.long)
        if keep_counts is None:
            return idx, None
        if keep_counts.shape != (batch,) or keep_counts.dtype.is_floating_point or keep_counts.dtype == torch.bool:
            raise ValueError(
                f"keep_counts must be an integer tensor [B={batch}], got {keep_counts.dtype} {list(keep_counts.shape)}"
            )
        counts = keep_counts.to(device=device, dtype=torch.long)
        valid = torch.arange(idx.shape[1], device=device) < counts[:, None]  # [B,K]
        return idx.masked_fill(~valid, 0), valid

    def _patch_pos_embed(self) -> Tensor:
        """Position embedding of the N grid positions, [N,D]."""
        pos = self._pos_embed[0]
        return pos if self.model.no_embed_class else pos[self.geometry.num_prefix_tokens :]

    def _prefix_tokens(self) -> Tensor | None:
        """cls/dist/reg tokens with their position embedding where the model has one, [1,prefix,D]."""
        m = self.model
        parts = [t for t in (m.cls_token, getattr(m, "dist_token", None), m.reg_token) if t is not None]
        if not parts:
            return None
        prefix = torch.cat(parts, dim=1)
        return prefix if m.no_embed_class else prefix + self._pos_embed[:, : self.geometry.num_prefix_tokens]

    def _embed(self, patches: Tensor, idx: Tensor | None, *, raw: bool = False) -> Tensor:
        """The patch conv as a matmul over flattened patches, then the gathered pos embed: [B,K,D]. `raw`: the
        patches are un-normalized 0..255 pixels, projected with the normalization folded in."""
        pe = self.model.patch_embed
        B, K = patches.shape[:2]
        if raw:
            x = F.linear(patches.reshape(B, K, -1), self._raw_weight, self._raw_bias)  # [B,K,D]
            return self._add_pos_embed(pe.norm(x), idx)
        weight = pe.proj.weight  # [D,C,P,P]; flattening matches a [C,P,P] patch
        x = F.linear(patches.reshape(B, K, -1), weight.reshape(weight.shape[0], -1), pe.proj.bias)  # [B,K,D]
        return self._add_pos_embed(pe.norm(x), idx)

    def _add_pos_embed(self, x: Tensor, idx: Tensor | None) -> Tensor:
        """x [B,K,D] + the position embedding of each token's grid position (all N in order when idx is None)."""
        pos = self._patch_pos_embed()  # [N,D]
        embedded: Tensor = x + (pos if idx is None else pos[idx])
        return embedded

    def _forward_kept(self, patches: Tensor, idx: Tensor, valid: Tensor | None, *, raw: bool = False) -> Tensor:
        tokens = self._embed(patches, idx, raw=raw)
        if valid is not None:  # padding may hold anything (even NaN); zero it so masked keys stay finite
            tokens = tokens.masked_fill(~valid[..., None], 0.0)
        return self._encode(tokens, valid)

    def _encode(self, tokens: Tensor, valid: Tensor | None) -> Tensor:
        """Patch tokens [B,K,D] (+ valid [B,K]) -> prefix, blocks, norm, head -> logits [B,classes]."""
        m = self.model
        B = tokens.shape[0]
        prefix = self._prefix_tokens()
        x = tokens if prefix is None else torch.cat([prefix.expand(B, -1, -1), tokens], dim=1)  # [B,n,D]
        x = m.norm_pre(m.pos_drop(x))
        if valid is None:
            x = m.blocks(x)
        else:
            attn_mask = self._padding_mask(valid, x)
            for blk in m.blocks:
                x = blk(x, attn_mask=attn_mask)
        return self._head(m.norm(x), valid)

    def _padding_mask(self, valid: Tensor, x: Tensor) -> Tensor:
        """valid [B,K] -> additive attention mask [B,1,1,n] in x's dtype: every query ignores padded keys."""
        keys = F.pad(valid, (self.geometry.num_prefix_tokens, 0), value=True)  # [B,n]
        attn_mask = torch.zeros(keys.shape, dtype=x.dtype, device=x.device).masked_fill_(~keys, float("-inf"))
        return attn_mask[:, None, None, :]

    def _head(self, x: Tensor, valid: Tensor | None) -> Tensor:
        """Normed tokens [B,n,D] -> logits; pooling heads pool over real tokens only."""
        if valid is None or not self._pooled_head:
            logits: Tensor = self.model.forward_head(x)  # token heads read prefix tokens only: padding cannot leak in
            return logits
        return self._masked_pool_head(x, valid)

    def _masked_pool_head(self, x: Tensor, valid: Tensor) -> Tensor:
        """timm's avg/max pooling over real tokens only (padding excluded), then fc_norm and head."""
        m = self.model
        logits: Tensor = m.head(m.head_drop(self._masked_pool(x, valid)))
        return logits

    def _masked_pool(self, x: Tensor, valid: Tensor) -> Tensor:
        """x [B,n,D] -> the pooled feature after fc_norm [B,D], pooling over real tokens only."""
        m = self.model
        if m.pool_include_prefix:
            keep = F.pad(valid, (self.geometry.num_prefix_tokens, 0), value=True)  # [B,n]
        else:
            x, keep = x[:, self.geometry.num_prefix_tokens :], valid  # [B,K,D], [B,K]
        w = keep[..., None].to(x.dtype)
        avg = (x * w).sum(dim=1) / w.sum(dim=1)  # [B,D]
        if m.global_pool == "avg":
            pooled = avg
        else:
            peak = x.masked_fill(~keep[..., None], float("-inf")).amax(dim=1)  # [B,D]
            pooled = peak if m.global_pool == "max" else 0.5 * (peak + avg)
        feature: Tensor = m.fc_norm(pooled)
        return feature


def _pixels_projection(proj: nn.Conv2d, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """(weight [D, C*P*P], bias [D]) of the patch projection taking raw 0..255 pixels instead of normalized ones:
    W ((x / 255 - mean) / std) + b = (W / (255 std)) x + (b - W mean / std), per input channel. Computed in float32 on
    the weights' device; the buffers then follow the module's `.to()`."""
    weight = proj.weight.detach().float()  # [D, C, P, P]
    m = torch.tensor(mean, device=weight.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=weight.device).view(1, -1, 1, 1)
    bias = proj.bias.detach().float() if proj.bias is not None else torch.zeros(weight.shape[0], device=weight.device)
    raw_weight = (weight / (255.0 * s)).reshape(weight.shape[0], -1)  # [D, C*P*P]
    raw_bias = bias - (weight * (m / s)).sum(dim=(1, 2, 3))  # [D]
    return raw_weight.to(proj.weight.dtype), raw_bias.to(proj.weight.dtype)
