"""ROPIM: random orthogonal projection of the patch tokens, loss on the complement."""

from __future__ import annotations

import torch
from torch import Tensor

from ropim.backbone import ViTBackbone
from ropim.method import MaskingMethod, Recipe, linear_pixel_head
from ropim.patches import patchify
from ropim.sketch import SCALINGS, CountSketch, Scaling, num_buckets


class ROPIM(MaskingMethod):
    """Encoder input ``ΠΦ``; linear decoder; ``mean |Π⊥(x − x̂)|`` with the same ``Π``."""

    name = "ropim"
    recipe = Recipe(
        base_lr=1.5e-4,
        lr_batch_divisor=512,
        warmup_epochs=5,
        betas=(0.9, 0.95),
        weight_decay=0.05,
        source="ROPIM ViT-B/16 300-epoch config (spec/ROPIM.md)",
    )

    def __init__(self, backbone: ViTBackbone, ratio: float = 0.14, scaling: Scaling = "exact"):
        super().__init__(backbone)
        num_buckets(backbone.num_tokens, ratio)  # reject a bad ratio before any training
        if scaling not in SCALINGS:
            raise ValueError(f"method.scaling={scaling!r} is not one of {SCALINGS}")
        self.ratio = float(ratio)
        self.scaling: Scaling = scaling
        self.head = linear_pixel_head(backbone)

    def prepare(
        self, patch_tokens: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, CountSketch]:
        b, n, _ = patch_tokens.shape
        sketch = CountSketch.sample(
            b, n, self.ratio, generator=generator, device=patch_tokens.device, scaling=self.scaling
        )
        return sketch.project(patch_tokens), sketch

    def decode(self, features: Tensor, state: CountSketch) -> Tensor:
        return self.head(features)

    def loss(self, prediction: Tensor, target: Tensor, state: CountSketch) -> Tensor:
        return state.complement(target - prediction.float()).abs().mean()

    def encoder_view(self, images: Tensor, state: CountSketch) -> Tensor:
        return self.to_images(state.project(patchify(images, self.patch_size)))
