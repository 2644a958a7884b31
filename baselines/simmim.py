"""SimMIM (Xie et al., CVPR 2022): mask 60% of the image in 32-px blocks with a learned token.

All tokens go through the encoder; masked ones are replaced by one learned mask token; a
linear head predicts raw (mean/std-normalised) pixels; L1 on the masked pixels only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ropim.harness.backbone import ViTBackbone
from ropim.harness.errors import check_ratio
from ropim.harness.methods import (
    MaskingMethod,
    ProtocolRecipe,
    PublishedResult,
    Recipe,
    linear_pixel_head,
)
from ropim.harness.patches import patchify


def block_mask(
    batch: int,
    grid: tuple[int, int],
    block_tokens: int,
    mask_ratio: float,
    generator: torch.Generator | None,
    device,
) -> Tensor:
    """``(B, N)`` float mask, 1.0 = hidden: ``ceil(ratio · blocks)`` whole blocks per image."""
    rows, cols = grid[0] // block_tokens, grid[1] // block_tokens
    blocks = rows * cols
    count = math.ceil(blocks * mask_ratio)
    order = torch.rand(batch, blocks, generator=generator, device=device).argsort(dim=1)
    hidden = torch.zeros(batch, blocks, device=device)
    hidden.scatter_(1, order[:, :count], 1.0)
    hidden = hidden.view(batch, rows, 1, cols, 1).expand(-1, -1, block_tokens, -1, block_tokens)
    return hidden.reshape(batch, grid[0] * grid[1])


PRETRAIN_YAML = "configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml"
FINETUNE_YAML = "configs/vit_base__800ep/simmim_finetune__vit_base__img224__800ep.yaml"


class SimMIM(MaskingMethod):
    name = "simmim"
    test_settings = {"mask_patch_size": 14}  # whole blocks of 2x2 tokens on the 28-px test grid
    recipe = Recipe(
        base_lr=1e-4,
        lr_batch_divisor=512,
        warmup_epochs=10,
        betas=(0.9, 0.999),
        weight_decay=0.05,
        clip_grad=5.0,
        base_min_lr=5e-6,
        base_warmup_lr=5e-7,
        warmup_prefix=False,
        schedule="multistep",
        decay_at=(0.875,),
        decay_rate=0.1,
        crop_scale=(0.67, 1.0),
        drop_path=0.1,
        interpolation="bilinear",
        source="microsoft/SimMIM configs/vit_base__800ep/"
        "simmim_pretrain__vit_base__img224__800ep.yaml",
        sources={
            "base_lr": f"SimMIM {PRETRAIN_YAML}:20, main_simmim.py:218",
            "lr_batch_divisor": "SimMIM main_simmim.py:218",
            "clip_grad": "SimMIM config.py:102",
            "base_min_lr": "SimMIM config.py:100 (unused by the multistep schedule)",
            "base_warmup_lr": f"SimMIM {PRETRAIN_YAML}:21, main_simmim.py:219 (per 512 images)",
            "warmup_prefix": "SimMIM lr_scheduler.py:136-140 (milestones count from step 0)",
            "schedule": f"SimMIM {PRETRAIN_YAML}:23-26 (×0.1 at epoch 700 of 800)",
            "decay_at": f"SimMIM {PRETRAIN_YAML}:26 (700/800)",
            "decay_rate": f"SimMIM {PRETRAIN_YAML}:25",
            "crop_scale": "SimMIM data/data_simmim.py:52",
            "drop_path": f"SimMIM {PRETRAIN_YAML}:4",
            "interpolation": "SimMIM data/data_simmim.py:52 (torchvision's default, bilinear)",
        },
    )
    references = (
        PublishedResult(
            "classification",
            "finetune",
            "top1_best",
            83.8,
            "Xie et al., SimMIM (CVPR 2022), ViT-B/16 800 ep",
            "fine-tune 100 epochs, mean pooling",
            pretrain_epochs=800,
        ),
        PublishedResult(
            "classification",
            "linear",
            "top1",
            56.7,
            "SimMIM maintainers (microsoft/SimMIM issues #14, #36): block 8, average-pooled",
            "block 8 of 12, average-pooled patch tokens (not the last block's cls token)",
            pretrain_epochs=800,
            feature="avg",
            layer=8,
        ),
    )
    protocol_recipes = {
        "finetune": ProtocolRecipe(
            values={
                "epochs": 100,
                "warmup_epochs": 20,
                "base_lr": 1.25e-3,
                "lr_batch_divisor": 512,
                "min_lr": 2.5e-7,
                "min_lr_scaled": True,
                "warmup_lr": 2.5e-7,
                "warmup_prefix": False,
                "layer_decay": 0.65,
                "weight_decay": 0.05,
                "drop_path": 0.1,
                "clip_grad": 5.0,
            },
            source="microsoft/SimMIM configs/vit_base__800ep/"
            "simmim_finetune__vit_base__img224__800ep.yaml:4-22",
            sources={
                "min_lr_scaled": "SimMIM main_finetune.py (linear_scaled_min_lr and _warmup_lr "
                "= × total batch / 512)",
                "warmup_lr": f"SimMIM {FINETUNE_YAML}:19 (2.5e-7 per 512 images)",
                "warmup_prefix": "SimMIM lr_scheduler.py:26-35 (cosine over all steps)",
                "clip_grad": "SimMIM config.py:102 (TRAIN.CLIP_GRAD; the fine-tune yaml leaves "
                "it at this default)",
            },
        )
    }
    fixed_choices = {
        "mask_token_init": (
            "trunc-normal std 0.02 cut at ±1σ (decayed)",
            "SimMIM models/simmim.py:53-67, optimizer.py:21-32",
        ),
        "decoder": ("1×1 conv + PixelShuffle (a linear map per token)", "SimMIM models/simmim.py"),
        "loss": (
            "L1 on masked pixels ÷ masked pixels ÷ channels",
            "SimMIM models/simmim.py:118-121",
        ),
    }

    def __init__(
        self, backbone: ViTBackbone, mask_ratio: float = 0.6, mask_patch_size: int = 32
    ) -> None:
        super().__init__(backbone)
        check_ratio("mask_ratio", mask_ratio)
        p = backbone.patch_size
        if mask_patch_size % p or backbone.img_size % mask_patch_size:
            raise ValueError(
                f"mask_patch_size={mask_patch_size} must be a multiple of the patch size {p} "
                f"and divide the image size {backbone.img_size}"
            )
        self.mask_ratio = mask_ratio
        self.block_tokens = mask_patch_size // p
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))
        # truncated at ±1 std, not ±2 absolute: SimMIM models/simmim.py:63-67
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        self.head = linear_pixel_head(backbone)

    def prepare(
        self, patch_tokens: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        b = patch_tokens.shape[0]
        hidden = block_mask(
            b,
            self.backbone.grid,
            self.block_tokens,
            self.mask_ratio,
            generator,
            patch_tokens.device,
        )
        weight = hidden.unsqueeze(-1).to(patch_tokens.dtype)
        tokens = patch_tokens * (1 - weight) + self.mask_token.to(patch_tokens.dtype) * weight
        return tokens, hidden

    def decode(self, features: Tensor, state: Tensor) -> Tensor:
        return self.head(features)

    def loss(self, prediction: Tensor, target: Tensor, state: Tensor) -> Tensor:
        per_element = (prediction.float() - target).abs()
        return (per_element * state.unsqueeze(-1)).sum() / (state.sum() * target.shape[-1])

    def encoder_view(self, images: Tensor, state: Tensor) -> Tensor:
        patches = patchify(images, self.patch_size)
        return self.to_images(patches * (1 - state).unsqueeze(-1))
