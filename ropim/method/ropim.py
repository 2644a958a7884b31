"""ROPIM: random orthogonal projection of the patch tokens, loss on the complement."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ropim.harness.backbone import ViTBackbone
from ropim.harness.methods import MaskingMethod, ProtocolRecipe, Recipe, linear_pixel_head
from ropim.harness.patches import patchify
from ropim.method.sketch import SCALINGS, CountSketch, Scaling, num_buckets


class ROPIM(MaskingMethod):
    """Encoder input ``ΠΦ``; linear decoder; ``mean |Π⊥(x − x̂)|`` with the same ``Π``."""

    name = "ropim"
    test_settings = {"ratio": 0.25}
    recipe = Recipe(
        base_lr=1.5e-4,
        lr_batch_divisor=512,
        warmup_epochs=5,
        betas=(0.9, 0.95),
        weight_decay=0.05,
        clip_grad=5.0,
        base_min_lr=5e-6,
        base_warmup_lr=5e-7,
        warmup_prefix=False,
        crop_scale=(0.67, 1.0),
        drop_path=0.1,
        interpolation="bilinear",
        source="csiro-robotics/ROPIM configs/vit_base/ropim_pretrain__vit_base.yaml",
        sources={
            "base_lr": "ROPIM ropim_pretrain__vit_base.yaml:20, main_ropim.py:209-211",
            "lr_batch_divisor": "ROPIM main_ropim.py:209-211",
            "warmup_epochs": "ROPIM ropim_pretrain__vit_base.yaml:19",
            "betas": "ROPIM ropim_pretrain__vit_base.yaml:26",
            "weight_decay": "ROPIM ropim_pretrain__vit_base.yaml:22",
            "clip_grad": "ROPIM config.py:85, main_ropim.py:156-157",
            "base_min_lr": "ROPIM config.py:83 (5e-6, per 512 images: main_ropim.py:211), "
            "lr_scheduler.py:22-31",
            "schedule": "ROPIM lr_scheduler.py:22-31",
            "base_warmup_lr": "ROPIM ropim_pretrain__vit_base.yaml:21, main_ropim.py:210 "
            "(per 512 images)",
            "warmup_prefix": "ROPIM lr_scheduler.py:22-31 (cosine over all steps, t_initial)",
            "crop_scale": "ROPIM data/data_ropim.py:74-75",
            "drop_path": "ROPIM ropim_pretrain__vit_base.yaml:4",
            "interpolation": "ROPIM data/data_ropim.py:74-75 (torchvision's default, bilinear)",
        },
    )
    protocol_recipes = {
        "finetune": ProtocolRecipe(
            values={
                "epochs": 100,
                "warmup_epochs": 5,
                "base_lr": 5e-3,
                "lr_batch_divisor": 512,
                "min_lr": 5e-6,
                "min_lr_scaled": True,
                "warmup_lr": 2.5e-7,
                "warmup_prefix": False,
                "layer_decay": 0.75,
                "weight_decay": 0.05,
                "drop_path": 0.1,
                "clip_grad": 5.0,
                "rand_augment": "rand-m9-mstd0.5-inc1",
                "mixup": 0.8,
                "cutmix": 1.0,
                "label_smoothing": 0.1,
                "random_erasing": 0.25,
            },
            source="csiro-robotics/ROPIM configs/vit_base/ropim_finetune__vit_base.yaml",
            sources={
                "epochs": "ROPIM ropim_finetune__vit_base.yaml:18",
                "warmup_epochs": "ROPIM ropim_finetune__vit_base.yaml:19",
                "base_lr": "ROPIM ropim_finetune__vit_base.yaml:20",
                "lr_batch_divisor": "ROPIM main_finetune.py:312",
                "min_lr": "ROPIM ropim_finetune__vit_base.yaml:22 (5e-6 per 512 images)",
                "min_lr_scaled": "ROPIM main_finetune.py:312-314 (min and warmup lr × total "
                "batch / 512)",
                "warmup_lr": "ROPIM ropim_finetune__vit_base.yaml:21 (2.5e-7 per 512 images)",
                "warmup_prefix": "ROPIM lr_scheduler.py:22-31 (cosine over all steps)",
                "layer_decay": "ROPIM ropim_finetune__vit_base.yaml:24",
                "weight_decay": "ROPIM ropim_finetune__vit_base.yaml:23",
                "drop_path": "ROPIM ropim_finetune__vit_base.yaml:4",
                "clip_grad": "ROPIM main_finetune.py:203-204",
                "rand_augment": "ROPIM ropim_finetune__vit_base.yaml:16, config.py:126-136",
                "mixup": "ROPIM config.py:126-136",
                "cutmix": "ROPIM config.py:126-136",
                "label_smoothing": "ROPIM config.py:55",
                "random_erasing": "ROPIM config.py:126-136",
            },
        )
    }
    fixed_choices = {
        "decoder": (
            "1×1 conv + PixelShuffle(16) (a linear map per token)",
            "ROPIM models/ropim.py:58-63",
        ),
        "loss": ("mean |Π⊥(x − x̂)| on the normalised image", "ROPIM models/ropim.py:58-63"),
        "sketch": (
            "fresh per image: buckets from concatenated permutations of [K], balanced signs",
            "ROPIM data/data_ropim.py:30-65",
        ),
    }

    def __init__(self, backbone: ViTBackbone, ratio: float = 0.14, scaling: Scaling = "exact"):
        super().__init__(backbone)
        num_buckets(backbone.num_tokens, ratio)  # reject a bad ratio before any training
        if scaling not in SCALINGS:
            raise ValueError(f"method.scaling={scaling!r} is not one of {SCALINGS}")
        self.ratio = float(ratio)
        self.scaling: Scaling = scaling
        self.head = linear_pixel_head(backbone)
        self.apply_projection = True  # False only inside the benchmark's ablation

    def prepare(
        self, patch_tokens: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, CountSketch]:
        b, n, _ = patch_tokens.shape
        sketch = CountSketch.sample(
            b, n, self.ratio, generator=generator, device=patch_tokens.device, scaling=self.scaling
        )
        tokens = sketch.project(patch_tokens) if self.apply_projection else patch_tokens
        return tokens, sketch

    def decode(self, features: Tensor, state: CountSketch) -> Tensor:
        return self.head(features)

    def loss(self, prediction: Tensor, target: Tensor, state: CountSketch) -> Tensor:
        residual = target - prediction.float()
        kept = state.complement(residual) if self.apply_projection else residual
        return kept.abs().mean()

    def encoder_view(self, images: Tensor, state: CountSketch) -> Tensor:
        return self.to_images(state.project(patchify(images, self.patch_size)))

    def ablations(self) -> dict[str, Callable[[], contextlib.AbstractContextManager]]:
        """``identity_projection``: Π and Π⊥ replaced by the identity (sketches still drawn),
        so the step's time without it shows what the projection itself costs."""
        return {"identity_projection": self._identity_projection}

    @contextlib.contextmanager
    def _identity_projection(self) -> Iterator[None]:
        self.apply_projection = False
        try:
            yield
        finally:
            self.apply_projection = True

    def micro_benchmarks(self, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
        """Projection + complement at ViT-B/16 token counts: bucket scatter/gather vs. the
        authors' dense ``(B, N, N)`` matrix product."""
        from ropim.method.projection_bench import time_projection

        return [
            {"measurement": "projection_fast_vs_dense", "img_size": size, "patch_size": 16}
            | time_projection(128, (size // 16) ** 2, 768, self.ratio, device, dtype)
            for size in (224, 448)
        ]
