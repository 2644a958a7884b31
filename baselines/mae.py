"""MAE (He et al., CVPR 2022): encode 25% visible tokens, a light transformer paints the rest.

Per image, a random 75% of the tokens is dropped after position embedding; the encoder runs on
the visible tokens (plus cls) only; a transformer decoder with a learned mask token and fixed
2-D sin-cos positions predicts every patch; MSE on the masked patches, against per-patch
normalised pixels by default ("norm_pix_loss", as the released models).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ropim.harness.backbone import ViTBackbone, sincos_2d, xavier_linears
from ropim.harness.errors import ConfigError, check_ratio
from ropim.harness.methods import MaskingMethod, ProtocolRecipe, PublishedResult, Recipe
from ropim.harness.patches import patchify


@dataclass(frozen=True)
class TokenMask:
    """``keep[b]`` lists image b's visible token indices; ``masked[b, i]`` is 1.0 if hidden."""

    keep: Tensor  # (B, n_keep) int64
    masked: Tensor  # (B, N) float


def random_token_mask(
    batch: int, tokens: int, mask_ratio: float, generator: torch.Generator | None, device
) -> TokenMask:
    """Shuffle each image's tokens independently; the first ``N·(1−ratio)`` stay visible."""
    check_ratio("mask_ratio", mask_ratio)
    n_keep = max(1, int(tokens * (1 - mask_ratio)))
    order = torch.rand(batch, tokens, generator=generator, device=device).argsort(dim=1)
    keep = order[:, :n_keep].sort(dim=1).values
    masked = torch.ones(batch, tokens, device=device)
    masked.scatter_(1, keep, 0.0)
    return TokenMask(keep=keep, masked=masked)


def normalise_patches(target: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Per-patch mean/variance normalisation (MAE's norm_pix_loss target) and its statistics."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps).sqrt(), mean, var


class MAE(MaskingMethod):
    name = "mae"
    test_settings = {"decoder_depth": 1, "decoder_dim": 32, "decoder_heads": 2}
    recipe = Recipe(
        base_lr=1.5e-4,
        lr_batch_divisor=256,
        warmup_epochs=40,
        betas=(0.9, 0.95),
        weight_decay=0.05,
        clip_grad=None,
        base_min_lr=0.0,
        crop_scale=(0.2, 1.0),
        drop_path=0.0,
        interpolation="bicubic",
        source="facebookresearch/mae PRETRAIN.md:9-18, main_pretrain.py:163-180",
        sources={
            "clip_grad": "mae engine_pretrain.py:47,57 (no clipping)",
            "base_min_lr": "mae main_pretrain.py (min_lr default 0)",
            "crop_scale": "mae main_pretrain.py:124",
            "interpolation": "mae main_pretrain.py:124 (interpolation=3, bicubic)",
            "drop_path": "mae models_mae.py:39-41 (encoder blocks without drop path)",
        },
    )
    references = (
        PublishedResult(
            "classification",
            "finetune",
            "top1_best",
            83.6,
            "He et al., MAE (CVPR 2022), ImageNet-1k fine-tune, ViT-B/16",
            "fine-tune 100 epochs, global average pooling",
            pretrain_epochs=1600,
        ),
        PublishedResult(
            "classification",
            "linear",
            "top1",
            68.0,
            "He et al., MAE (CVPR 2022) paper, last block's cls token; 67.8 in "
            "facebookresearch/mae FINETUNE.md:173",
            "last block's cls token, BatchNorm + linear, LARS, 90 epochs",
            pretrain_epochs=1600,
            feature="cls",
            layer="last",
        ),
        PublishedResult(
            "segmentation",
            "upernet",
            "mIoU",
            48.1,
            "He et al., MAE (CVPR 2022); mmsegmentation reproduction 48.13",
            "UperNet 160k iterations, 512 crops, single-scale",
            pretrain_epochs=1600,
        ),
        PublishedResult(
            "detection",
            "vitdet_mask_rcnn",
            "box_AP",
            51.6,
            "detectron2 ViTDet page, Mask R-CNN 100 ep",
            "ViTDet Mask R-CNN, 100 epochs, LSJ 1024",
            pretrain_epochs=1600,
        ),
        PublishedResult(
            "detection",
            "vitdet_mask_rcnn",
            "mask_AP",
            45.9,
            "detectron2 ViTDet page, Mask R-CNN 100 ep",
            "ViTDet Mask R-CNN, 100 epochs, LSJ 1024",
            pretrain_epochs=1600,
        ),
    )
    protocol_recipes = {
        "finetune": ProtocolRecipe(
            values={
                "epochs": 100,
                "warmup_epochs": 5,
                "base_lr": 5e-4,
                "lr_batch_divisor": 256,
                "min_lr": 1e-6,
                "layer_decay": 0.65,
                "weight_decay": 0.05,
                "drop_path": 0.1,
                "clip_grad": None,
                "rand_augment": "rand-m9-mstd0.5-inc1",
                "mixup": 0.8,
                "cutmix": 1.0,
                "label_smoothing": 0.1,
                "random_erasing": 0.25,
            },
            source="facebookresearch/mae FINETUNE.md:113-125, main_finetune.py:57-95",
        ),
        "linear": ProtocolRecipe(
            values={
                "epochs": 90,
                "warmup_epochs": 10,
                "base_lr": 0.1,
                "lr_batch_divisor": 256,
                "optimizer": "lars",
                "weight_decay": 0.0,
                "batch_size": 16384,
                "augment": True,
                "crop_scale": [0.08, 1.0],
                "momentum": 0.9,
                "trust_coeff": 0.001,
                "bn_batch": 512,
            },
            source="facebookresearch/mae main_linprobe.py:44-66,218,222, util/lars.py:18-47",
            sources={
                "momentum": "mae util/lars.py:18",
                "trust_coeff": "mae util/lars.py:18 (trust_coefficient)",
                "bn_batch": "mae FINETUNE.md:142,150 (512 per GPU, 32 GPUs), main_linprobe.py:222 "
                "(BatchNorm, no SyncBN)",
                "batch_size": "mae main_linprobe.py:44-66 (16384 in total)",
                "augment": "mae main_linprobe.py:132-141 (RandomResizedCrop + flip per epoch)",
                "crop_scale": "mae main_linprobe.py:132 (RandomResizedCrop's default scale)",
            },
        ),
    }

    fixed_choices = {
        "decoder_init": (
            "xavier-uniform on every Linear, zero biases, LayerNorm eps 1e-6, mask token "
            "normal(0.02)",
            "mae models_mae.py:57,83-90,227",
        ),
        "loss": ("MSE on the masked patches", "mae models_mae.py (forward_loss)"),
    }

    def __init__(
        self,
        backbone: ViTBackbone,
        mask_ratio: float = 0.75,
        decoder_depth: int = 8,
        decoder_dim: int = 512,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__(backbone)
        if backbone.relative_position is not None:
            raise ConfigError(
                f"mae drops 75% of the tokens before the encoder; model.name="
                f"{backbone.name!r} has a relative position bias over the full grid. MAE's own "
                f"encoder uses absolute positions: choose a 'vit_*' model for mae"
            )
        random_token_mask(1, backbone.num_tokens, mask_ratio, None, "cpu")  # validate early
        if decoder_dim % decoder_heads:
            raise ValueError(
                f"decoder_dim={decoder_dim} must be divisible by decoder_heads={decoder_heads}"
            )
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        prefix = backbone.num_prefix_tokens
        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # MAE's own table and channel order (sin/cos of the column, then of the row:
        # util/pos_embed.py), the encoder's too; cls position zeros (models_mae.py:71-72).
        positions = sincos_2d(*backbone.grid, decoder_dim)
        positions = torch.cat([torch.zeros(prefix, decoder_dim), positions])
        self.register_buffer("decoder_pos", positions.unsqueeze(0), persistent=False)
        # LayerNorm eps 1e-6 in the decoder's blocks and final norm (models_mae.py:57,227).
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.Sequential(
            *[
                Block(decoder_dim, decoder_heads, qkv_bias=True, norm_layer=norm)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, backbone.patch_size**2 * backbone.in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        """MAE's ``_init_weights`` reaches the decoder too (models_mae.py:83-90): xavier-uniform
        on every Linear with zero biases, norms at one/zero, the mask token normal(0.02)."""
        nn.init.normal_(self.mask_token, std=0.02)
        xavier_linears(
            self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred
        )

    def prepare(
        self, patch_tokens: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, TokenMask]:
        b, n, _ = patch_tokens.shape
        return patch_tokens, random_token_mask(
            b, n, self.mask_ratio, generator, patch_tokens.device
        )

    def encode(self, tokens: Tensor, state: TokenMask) -> Tensor:
        """Positions first, then drop the hidden tokens: the encoder never sees them."""
        sequence = self.backbone.add_position(tokens)
        prefix = self.backbone.num_prefix_tokens
        index = state.keep.unsqueeze(-1).expand(-1, -1, sequence.shape[-1])
        visible = torch.gather(sequence[:, prefix:], 1, index)
        return self.backbone.run_blocks(torch.cat([sequence[:, :prefix], visible], dim=1))

    def decode(self, features: Tensor, state: TokenMask) -> Tensor:
        prefix = self.backbone.num_prefix_tokens
        x = self.decoder_embed(features)
        b, n = state.masked.shape
        full = self.mask_token.to(x.dtype).expand(b, n, -1).clone()
        index = state.keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        full = full.scatter(1, index, x[:, prefix:])
        x = torch.cat([x[:, :prefix], full], dim=1) + self.decoder_pos.to(x.dtype)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, prefix:]

    def _target(self, target: Tensor) -> Tensor:
        return normalise_patches(target)[0] if self.norm_pix_loss else target

    def loss(self, prediction: Tensor, target: Tensor, state: TokenMask) -> Tensor:
        per_token = (prediction.float() - self._target(target)).pow(2).mean(dim=-1)
        return (per_token * state.masked).sum() / state.masked.sum()

    def encoder_view(self, images: Tensor, state: TokenMask) -> Tensor:
        patches = patchify(images, self.patch_size)
        return self.to_images(patches * (1 - state.masked).unsqueeze(-1))

    def reconstruct(self, prediction: Tensor, images: Tensor, state: TokenMask) -> Tensor:
        if self.norm_pix_loss:  # undo the per-patch normalisation with the true statistics
            _, mean, var = normalise_patches(patchify(images, self.patch_size))
            prediction = prediction * (var + 1e-6).sqrt() + mean
        return self.to_images(prediction)

    def no_weight_decay(self) -> set[str]:
        """None beyond biases and norms: MAE's ``optim_factory.add_weight_decay(model, wd)``
        passes no skip list (facebookresearch/mae main_pretrain.py:178-179), so its cls token,
        mask token and any learned position embedding are decayed."""
        return set()
