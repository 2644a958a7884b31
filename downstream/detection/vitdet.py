"""ViTDet's parts that torchvision and timm do not have (Li et al., ECCV 2022; detectron2's
``modeling/backbone/vit.py``, restated here from the paper and its config, not copied):

- the pre-trained ViT run on the patch grid without a cls token, absolute positions resampled
  to the grid, **window attention** (14×14, padded when the grid is not a multiple) in every
  block but a few evenly spread **global** ones (2, 5, 8, 11 of 12);
- **decomposed relative position** in every block's attention: a bias ``q·R_h[Δh] + q·R_w[Δw]``
  from two zero-initialised tables, so the pre-trained block starts unchanged;
- the **simple feature pyramid** widths (×4: dim → dim/2 → dim/4; ×2: dim → dim/2; ×1; ×0.5);
- **aligned RoIAlign** (detectron2's ROIAlignV2: the half-pixel offset) with the FPN's
  box-to-level rule.

The block keeps the pre-trained block's own modules under their own names, so a pre-trained
encoder loads with nothing missing but the new relative-position tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, resample_abs_pos_embed
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign, roi_align

from ropim.harness.backbone import ViTBackbone

BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def global_blocks(depth: int) -> list[int]:
    """Blocks with global attention: 2, 5, 8, 11 of 12 (ViTDet), spread alike for any depth."""
    return sorted({max(round(depth * k / 4) - 1, 0) for k in (1, 2, 3, 4)})


def window_partition(x: Tensor, window: int) -> tuple[Tensor, tuple[int, int]]:
    """(B, H, W, C) → (B·windows, window, window, C), zero-padded to a multiple of ``window``;
    returns the padded grid size too."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> Tensor:
    """Inverse of :func:`window_partition`: back to (B, H, W, C), the padding dropped."""
    hp, wp = padded
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, : size[0], : size[1]].contiguous()


def relative_rows(table: Tensor, q_size: int, k_size: int) -> Tensor:
    """(q_size, k_size, dim): the table row for every query-key offset along one axis; a table
    made for another size is resized by linear interpolation first."""
    span = 2 * max(q_size, k_size) - 1
    if table.shape[0] != span:
        table = F.interpolate(table.T.unsqueeze(0), size=span, mode="linear")[0].T
    q_scale, k_scale = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    q = torch.arange(q_size, device=table.device)[:, None] * q_scale
    k = torch.arange(k_size, device=table.device)[None, :] * k_scale
    return table[((q - k) + (k_size - 1) * k_scale).long()]


def decomposed_bias(
    q: Tensor, rel_h: Tensor, rel_w: Tensor, q_size: tuple[int, int], k_size: tuple[int, int]
) -> Tensor:
    """Attention bias (B, Nq, Nk) = q·R_h[Δh] + q·R_w[Δw] for queries ``q`` (B, Nq, dim)."""
    (qh, qw), (kh, kw) = q_size, k_size
    grid_q = q.reshape(q.shape[0], qh, qw, q.shape[-1])
    bias_h = torch.einsum("bhwc,hkc->bhwk", grid_q, relative_rows(rel_h, qh, kh))
    bias_w = torch.einsum("bhwc,wkc->bhwk", grid_q, relative_rows(rel_w, qw, kw))
    bias = bias_h[:, :, :, :, None] + bias_w[:, :, :, None, :]
    return bias.reshape(q.shape[0], qh * qw, kh * kw)


class ViTDetBlock(nn.Module):
    """A pre-trained timm ViT block on a (B, H, W, C) grid: window attention (``window`` > 0)
    or global, with decomposed relative position added to its attention."""

    def __init__(self, block: nn.Module, window: int, grid: tuple[int, int]) -> None:
        super().__init__()
        for name in BLOCK_PARTS:
            setattr(self, name, getattr(block, name))
        self.window = window
        size = (window, window) if window else grid
        head_dim = self.attn.qkv.in_features // self.attn.num_heads
        self.attn.rel_pos_h = nn.Parameter(torch.zeros(2 * size[0] - 1, head_dim))
        self.attn.rel_pos_w = nn.Parameter(torch.zeros(2 * size[1] - 1, head_dim))

    def attend(self, x: Tensor) -> Tensor:
        attn = self.attn
        b, h, w, c = x.shape
        qkv = attn.qkv(x.reshape(b, h * w, c)).reshape(b, h * w, 3, attn.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, head_dim)
        q, k = attn.q_norm(q), attn.k_norm(k)
        heads = attn.num_heads
        bias = decomposed_bias(
            q.reshape(b * heads, h * w, -1), attn.rel_pos_h, attn.rel_pos_w, (h, w), (h, w)
        ).view(b, heads, h * w, h * w)
        drop = attn.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=drop)
        out = attn.norm(out.transpose(1, 2).reshape(b, h, w, c))
        return attn.proj_drop(attn.proj(out))

    def forward(self, x: Tensor) -> Tensor:
        shortcut, x = x, self.norm1(x)
        if self.window:
            size = (x.shape[1], x.shape[2])
            windows, padded = window_partition(x, self.window)
            x = window_unpartition(self.attend(windows), self.window, padded, size)
        else:
            x = self.attend(x)
        x = shortcut + self.drop_path1(self.ls1(x))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def to_vitdet(backbone: ViTBackbone, window: int, global_indices: Sequence[int]) -> ViTBackbone:
    """Turn the (weights-loaded) encoder's blocks into ViTDet blocks in place; the cls token
    and the final norm go unused (ViTDet reads the last block's output)."""
    vit = backbone.vit
    vit.blocks = nn.Sequential(
        *[
            ViTDetBlock(block, 0 if index in global_indices else window, backbone.grid)
            for index, block in enumerate(vit.blocks)
        ]
    )
    vit.norm = nn.Identity()
    if getattr(vit, "cls_token", None) is not None:
        vit.cls_token.requires_grad_(False)  # unused: DDP must not wait for its gradient
    return backbone


def encode_grid(backbone: ViTBackbone, images: Tensor) -> Tensor:
    """ViTDet's encoder pass: patches + positions (no cls token) → blocks on the grid →
    (B, C, H, W)."""
    vit = backbone.vit
    x = vit.patch_embed(images)
    if x.ndim == 3:  # (B, N, C) from a fixed-size patch embed
        x = x.reshape(x.shape[0], *backbone.grid, x.shape[-1])
    h, w = x.shape[1], x.shape[2]
    if vit.pos_embed is not None:
        prefix = 0 if getattr(vit, "no_embed_class", False) else backbone.num_prefix_tokens
        pos = vit.pos_embed[:, prefix:]
        if (h, w) != backbone.grid:
            pos = resample_abs_pos_embed(pos, [h, w], list(backbone.grid), num_prefix_tokens=0)
        x = x + pos.reshape(1, h, w, -1)
    return vit.blocks(x).permute(0, 3, 1, 2).contiguous()


class ViTDetPyramid(nn.Module):
    """ViTDet's simple feature pyramid from the last block: strides patch/4, /2, ×1, ×2 with
    widths dim/4, dim/2, dim, dim."""

    def __init__(self, backbone: ViTBackbone, window: int, global_indices: Sequence[int]):
        super().__init__()
        self.backbone = to_vitdet(backbone, window, global_indices)
        dim = backbone.embed_dim
        self.rescales = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2),
                    LayerNorm2d(dim // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2),
                ),
                nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(kernel_size=2, stride=2),
            ]
        )
        self.channels = [dim // 4, dim // 2, dim, dim]
        self.strides = [backbone.patch_size / s for s in (4, 2, 1, 0.5)]

    def forward(self, images: Tensor) -> list[Tensor]:
        features = encode_grid(self.backbone, images)
        return [rescale(features) for rescale in self.rescales]


class AlignedRoIAlign(MultiScaleRoIAlign):
    """RoIAlign with ``aligned=True`` over named pyramid levels (detectron2's ROIAlignV2 and
    its level rule: canonical box 224 px at level 4); a drop-in for torchvision's
    ``MultiScaleRoIAlign`` (whose type Mask R-CNN requires), which has no aligned option."""

    def __init__(
        self,
        featmap_names: Sequence[str],
        output_size: int,
        sampling_ratio: int = 0,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ) -> None:
        super().__init__(list(featmap_names), output_size, sampling_ratio)
        self.featmap_names = list(featmap_names)
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.canonical_scale, self.canonical_level = canonical_scale, canonical_level

    def forward(
        self,
        x: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> Tensor:  # type: ignore[override]
        features = [x[name] for name in self.featmap_names]
        height = max(shape[0] for shape in image_shapes)
        scales = [2.0 ** round(math.log2(f.shape[-2] / height)) for f in features]
        first, last = -math.log2(scales[0]), -math.log2(scales[-1])
        rois = torch.cat(
            [
                torch.cat([torch.full_like(b[:, :1], index), b], dim=1)
                for index, b in enumerate(boxes)
            ]
        )
        side = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).clamp(min=0).sqrt()
        level = torch.floor(
            self.canonical_level + torch.log2(side / self.canonical_scale + 1e-8) + 1e-6
        )
        level = (level.clamp(first, last) - first).long()
        size = self.output_size
        out = rois.new_zeros((len(rois), features[0].shape[1], size, size))
        for index, (feature, scale) in enumerate(zip(features, scales, strict=True)):
            chosen = torch.where(level == index)[0]
            if len(chosen):
                pooled = roi_align(
                    feature, rois[chosen], size, scale, self.sampling_ratio, aligned=True
                )
                out[chosen] = pooled.to(out.dtype)
        return out
