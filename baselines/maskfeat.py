"""MaskFeat (Wei et al., CVPR 2022): predict the HOG features of masked patches.

40% of the patches are replaced by a learned mask token in BEiT-style blocks; a linear head on
the encoder's last block (through a LayerNorm: here the encoder's own final norm) predicts, per
masked patch, the histograms of oriented gradients of its pixels: 9 orientation bins per colour
channel and 8-px cell, each cell's histogram L2-normalised. MSE on the masked patches.

Follows facebookresearch/SlowFast (commit 287ec00): ``slowfast/models/operators.py:62-112``
(``HOGLayerC``), ``slowfast/models/masked.py`` (targets, head, loss) and
``configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml`` / ``_FT.yaml`` (the ViT-B recipes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from baselines._block_masking import block_mask, check_block_mask
from ropim.harness.backbone import ViTBackbone
from ropim.harness.methods import MaskingMethod, ProtocolRecipe, PublishedResult, Recipe
from ropim.harness.patches import patchify, unpatchify

SLOWFAST = "facebookresearch/SlowFast"
PT = f"{SLOWFAST} configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml"
FT = f"{SLOWFAST} configs/masked_ssl/in1k_VIT_B_MaskFeat_FT.yaml"
MASKED = f"{SLOWFAST} slowfast/models/masked.py"
HOG = f"{SLOWFAST} slowfast/models/operators.py:62-112"


def hog_histograms(images: Tensor, bins: int = 9, cell: int = 8) -> Tensor:
    """``(B, C, bins, H/cell, W/cell)``: per channel, Sobel gradients (reflect-padded), each
    pixel's magnitude added to the bin of its orientation over the full circle
    (``atan2(gx, gy)``, ``bins`` equal sectors of ``[-pi, pi)`` folded modulo ``bins``), summed
    over ``cell`` x ``cell`` pixels, L2-normalised over the bins (HOGLayerC)."""
    b, c, h, w = images.shape
    padded = F.pad(images.float(), (1, 1, 1, 1), mode="reflect")
    # HOGLayerC's 3x3 kernels [[1,0,-1],[2,0,-2],[1,0,-1]] (gx) and their transpose (gy), as
    # differences of the mirrored pixels weighted 1-2-1: equal to the convolution, and a pixel
    # whose neighbours are equal gets exactly 0 (conv2d's float32 sums may leave -1e-7 there,
    # which moves it across a sector boundary).
    across = padded[:, :, :, :-2] - padded[:, :, :, 2:]  # (B, C, H+2, W)
    gx = across[:, :, :-2] + 2 * across[:, :, 1:-1] + across[:, :, 2:]
    down = padded[:, :, :-2, :] - padded[:, :, 2:, :]  # (B, C, H, W+2)
    gy = down[..., :-2] + 2 * down[..., 1:-1] + down[..., 2:]
    magnitude = torch.sqrt(gx**2 + gy**2)
    sector = torch.floor(torch.atan2(gx, gy) / math.pi * bins).long() % bins
    hist = torch.zeros(b, c, bins, h, w, device=images.device)
    hist.scatter_add_(2, sector.unsqueeze(2), magnitude.unsqueeze(2))
    hist = hist.view(b, c, bins, h // cell, cell, w // cell, cell).sum(dim=(4, 6))
    return F.normalize(hist, p=2, dim=2)


def hog_targets(images: Tensor, patch: int, bins: int = 9, cell: int = 8) -> Tensor:
    """``(B, N, C·bins·(patch/cell)²)`` per-patch HOG targets, ordered as SlowFast's
    ``_get_hog_label_2d`` unfolds them: (channel, bin) first, then the cell's row and column."""
    hist = hog_histograms(images, bins, cell)
    b, c, k, rows, cols = hist.shape
    per = patch // cell
    hist = hist.reshape(b, c * k, rows // per, per, cols // per, per)
    return hist.permute(0, 2, 4, 1, 3, 5).reshape(b, (rows // per) * (cols // per), -1)


class MaskFeat(MaskingMethod):
    name = "maskfeat"
    # The test backbone's patches are 7 px: one 7-px cell per patch.
    test_settings = {"cell_size": 7}
    recipe = Recipe(
        base_lr=2e-4,
        lr_batch_divisor=256,
        warmup_epochs=30,
        betas=(0.9, 0.999),
        weight_decay=0.05,
        clip_grad=0.02,
        base_min_lr=1e-6,
        base_warmup_lr=1e-6,
        warmup_prefix=True,
        crop_scale=(0.5, 1.0),
        drop_path=0.0,
        interpolation="bicubic",
        source=f"{PT}:50-63",
        sources={
            "base_lr": f"{PT}:5,52 (2e-4 for the config's batch 256)",
            "lr_batch_divisor": f"{PT}:5,51-52 (batch 256 on one shard; BASE_LR_SCALE_NUM_SHARDS "
            "scales lr, warmup and end lr with the shards, slowfast/config/defaults.py:1281-1284)",
            "warmup_epochs": f"{PT}:57",
            "base_warmup_lr": f"{PT}:58 (1e-6 at batch 256)",
            "base_min_lr": f"{PT}:61 (COSINE_END_LR 1e-6 at batch 256)",
            "warmup_prefix": f"{PT}:60 (COSINE_AFTER_WARMUP)",
            "betas": f"{SLOWFAST} slowfast/config/defaults.py:881",
            "weight_decay": f"{PT}:56",
            "clip_grad": f"{PT}:63 (CLIP_GRAD_L2NORM)",
            "crop_scale": f"{PT}:10 (TRAIN_JITTER_SCALES_RELATIVE)",
            "interpolation": f"{SLOWFAST} slowfast/config/defaults.py:196",
            "drop_path": f"{PT}:33",
            # the method's settings
            "mask_ratio": f"{PT}:47 (MASK_RATIO)",
            "bins": f"{MASKED}:50 (nbins = 9)",
            "cell_size": f"{MASKED}:51 (cell_sz = 8)",
        },
    )
    protocol_recipes = {
        "finetune": ProtocolRecipe(
            values={
                "epochs": 100,
                "warmup_epochs": 20,
                "base_lr": 2e-3,
                "lr_batch_divisor": 512,
                "min_lr": 1e-6,
                "warmup_lr": 1e-8,
                "layer_decay": 0.65,
                "weight_decay": 0.05,
                "drop_path": 0.1,
                "rand_augment": "rand-m9-mstd0.5-inc1",
                "mixup": 0.8,
                "cutmix": 1.0,
                "label_smoothing": 0.1,
                "random_erasing": 0.25,
            },
            source=f"{FT}:5-66",
            sources={
                "epochs": f"{FT}:59",
                "warmup_epochs": f"{FT}:62",
                "base_lr": f"{FT}:57",
                "lr_batch_divisor": f"{FT}:5,82 (2e-3 for batch 512 on one shard)",
                "min_lr": f"{FT}:66",
                "warmup_lr": f"{FT}:63",
                "layer_decay": f"{FT}:56",
                "weight_decay": f"{FT}:61",
                "drop_path": f"{FT}:32",
                "rand_augment": f"{FT}:41",
                "mixup": f"{FT}:49",
                "cutmix": f"{FT}:50",
                "label_smoothing": f"{FT}:53",
                "random_erasing": f"{FT}:43",
            },
        ),
    }
    fixed_choices = {
        "hog": (
            "Sobel gradients per colour channel (reflect padding), orientation over the full "
            "circle, magnitude-weighted bins summed per cell, L2-normalised per cell; no "
            "Gaussian window; computed on the normalised input",
            f"{HOG}, {MASKED}:49-56,232-251 (HOGLayerC(nbins=9, pool=8))",
        ),
        "masking": (
            "BEiT-style blocks, round(ratio x N) tokens, blocks of N·ratio//5 tokens at least "
            "and up to all of them, aspect 0.3-3.3",
            f"{SLOWFAST} slowfast/datasets/imagenet.py:174-192, transform.py:776-840",
        ),
        "mask_token": (
            "a learned token (trunc-normal 0.02) replaces masked patch embeddings before the "
            "positions",
            f"{MASKED}:110-113,550-560",
        ),
        "head": (
            "LayerNorm (eps 1e-6: the encoder's final norm here) + one Linear (trunc-normal "
            "0.02, zero bias) on the last block's masked patch tokens",
            f"{SLOWFAST} slowfast/models/head_helper.py (MSSeparateHead)",
        ),
        "loss": ("MSE averaged over masked patches and HOG channels", f"{MASKED}:70"),
    }
    references = (
        PublishedResult(
            "classification",
            "finetune",
            "top1_best",
            84.0,
            "Wei et al., MaskFeat (CVPR 2022), ImageNet-1K comparison, ViT-B 1600 epochs",
            "fine-tune 100 epochs",
            pretrain_epochs=1600,
        ),
    )

    def __init__(
        self,
        backbone: ViTBackbone,
        mask_ratio: float = 0.4,
        bins: int = 9,
        cell_size: int = 8,
    ) -> None:
        super().__init__(backbone)
        if bins < 1:
            raise ValueError(f"bins={bins} must be at least 1")
        if cell_size < 1 or backbone.patch_size % cell_size:
            raise ValueError(
                f"cell_size={cell_size} must divide the patch size {backbone.patch_size}"
            )
        self.count = round(backbone.num_tokens * mask_ratio)
        check_block_mask(backbone.grid, self.count, self.count // 5)
        self.mask_ratio, self.bins, self.cell_size = mask_ratio, bins, cell_size
        cells = (backbone.patch_size // cell_size) ** 2
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(backbone.embed_dim, backbone.in_chans * bins * cells)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def prepare(
        self, patch_tokens: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        hidden = block_mask(
            patch_tokens.shape[0],
            self.backbone.grid,
            self.count,
            self.count // 5,
            self.count,
            generator,
            patch_tokens.device,
        ).to(patch_tokens.dtype)
        w = hidden.unsqueeze(-1)
        return patch_tokens * (1 - w) + self.mask_token.to(patch_tokens.dtype) * w, hidden

    def decode(self, features: Tensor, state: Tensor) -> Tensor:
        return self.head(features)

    def loss(self, prediction: Tensor, target: Tensor, state: Tensor) -> Tensor:
        images = unpatchify(target, self.patch_size, self.backbone.grid, self.backbone.in_chans)
        goal = hog_targets(images, self.patch_size, self.bins, self.cell_size)
        hidden = state.bool()
        return F.mse_loss(prediction.float()[hidden], goal[hidden])

    def encoder_view(self, images: Tensor, state: Tensor) -> Tensor:
        patches = patchify(images, self.patch_size)
        return self.to_images(patches * (1 - state).unsqueeze(-1))

    def reconstruct(self, prediction: Tensor, images: Tensor, state: Tensor) -> Tensor:
        raise NotImplementedError("MaskFeat predicts HOG histograms, not pixels")

    def no_weight_decay(self) -> set[str]:
        """None beyond 1-D parameters: ZERO_WD_1D_PARAM, and ZERO_DECAY_POS_CLS False, so the
        positions and cls token are decayed (in1k_VIT_B_MaskFeat_PT.yaml:23,62)."""
        return set()
