"""Multi-scale feature pyramids for a plain ViT (one stride everywhere) used by dense heads.

Rescaling ``x4`` is two stride-2 transposed convolutions with a norm and GELU between them,
``x2`` one transposed convolution, ``x1`` the identity and ``x0.5`` a 2x2 max-pool, as in
mmsegmentation's Feature2Pyramid (BEiT/MAE UperNet) and ViTDet's simple feature pyramid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from ropim.harness.backbone import ViTBackbone

SCALES = (4.0, 2.0, 1.0, 0.5)


def rescale_layer(dim: int, scale: float, norm: Callable[[int], nn.Module]) -> nn.Module:
    if scale == 4:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
            norm(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
        )
    if scale == 2:
        return nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
    if scale == 1:
        return nn.Identity()
    if scale == 0.5:
        return nn.MaxPool2d(kernel_size=2, stride=2)
    raise ValueError(f"pyramid scale {scale} is not one of {SCALES}")


def default_out_indices(depth: int) -> list[int]:
    """Blocks 4, 6, 8, 12 of a 12-block ViT (0-based 3, 5, 7, 11), spread alike for any depth."""
    return [max(round(depth * k / 12) - 1, 0) for k in (4, 6, 8, 12)]


class ViTPyramid(nn.Module):
    """Features of chosen blocks, each rescaled: strides patch/4, patch/2, patch, 2*patch.

    With a single index (ViTDet) every level is built from that block's output.
    """

    def __init__(
        self,
        backbone: ViTBackbone,
        out_indices: Sequence[int],
        scales: Sequence[float] = SCALES,
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        depth = len(backbone.vit.blocks)
        bad = [i for i in out_indices if not 0 <= i < depth]
        if bad:
            raise ValueError(f"block index {bad[0]} outside the encoder's 0..{depth - 1}")
        if len(out_indices) not in (1, len(scales)):
            raise ValueError(f"{len(out_indices)} block indices for {len(scales)} pyramid levels")
        # Dense heads read block outputs before the final norm (mmsegmentation's MAE backbone
        # with final_norm=False, ViTDet); dropping it also leaves DDP no unused parameters.
        backbone.vit.norm = nn.Identity()
        self.backbone = backbone
        self.out_indices = list(out_indices)
        self.unique_indices = sorted(set(out_indices))
        self.scales = list(scales)
        self.rescales = nn.ModuleList(rescale_layer(backbone.embed_dim, s, norm) for s in scales)
        self.channels = [backbone.embed_dim] * len(scales)
        self.strides = [backbone.patch_size / s for s in scales]

    def forward(self, images: Tensor) -> list[Tensor]:
        features = self.backbone.vit.forward_intermediates(
            images, indices=self.unique_indices, output_fmt="NCHW", intermediates_only=True
        )
        by_index = dict(zip(self.unique_indices, features, strict=True))
        blocks = [by_index[i] for i in self.out_indices]
        if len(blocks) == 1:
            blocks = blocks * len(self.scales)
        return [rescale(x) for rescale, x in zip(self.rescales, blocks, strict=True)]
