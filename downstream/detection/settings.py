"""Detection settings; defaults are ViTDet's ViT-B Mask R-CNN recipe on COCO (detectron2's
``mask_rcnn_vitdet_b_100ep``): 1024-px large-scale jitter, batch 64, AdamW 1e-4,
weight decay 0.1, layer decay 0.7, 250-iteration warmup, 184,375 iterations with x0.1 steps at
163,889 and 177,546 (docs/recipes.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from downstream.scenes import SceneSettings
from ropim.harness.errors import ConfigError
from ropim.harness.tasks import TrainingSettings

D2 = "detectron2 projects/ViTDet/configs"
VITDET = f"{D2}/COCO/mask_rcnn_vitdet_b_100ep.py"


@dataclass
class DetectionSettings(TrainingSettings):
    DEFAULT_SOURCE: ClassVar[str] = f"suite default: {VITDET}"
    SOURCES: ClassVar[dict[str, str]] = {
        "lr": f"{D2}/common/optim.py:18-28",
        "betas": f"{D2}/common/optim.py:18-28",
        "weight_decay": f"{D2}/common/optim.py:18-28",
        "layer_decay": f"{VITDET} (lr_factor_func, 0.7), modeling/backbone/vit.py:506-524",
        "decay_biases": "detectron2 solver/build.py:148 (bias decay = weight decay)",
        "iterations": f"{VITDET}:25-35 (train.max_iter = 184375: 100 epochs of the filtered "
        "COCO train set at batch 64, hard-coded)",
        "epochs": "suite option (null: detection.iterations; set, the iterations come from "
        "epochs x images / total batch, for other datasets)",
        "batch_size": f"{VITDET}:25-35 (64 in total)",
        "warmup_iters": f"{VITDET}:25-35",
        "decay_at": f"{VITDET}:25-35 (milestones 163,889 and 177,546 of 184,375: 8/9 and "
        "26/27, which round to them exactly)",
        "image_size": f"{D2}/common/coco_loader_lsj.py:6-22",
        "scale_range": f"{D2}/common/coco_loader_lsj.py:6-22",
        "hflip": f"{D2}/common/coco_loader_lsj.py:6-22",
        "filter_empty": "detectron2 data/build.py:219",
        "drop_path": f"{D2}/common/models/mask_rcnn_vitdet.py:15",
        "window_size": f"{D2}/common/models/mask_rcnn_vitdet.py:25",
        "global_blocks": f"{D2}/common/models/mask_rcnn_vitdet.py:29-39",
        "box_loss": "detectron2 modeling/proposal_generator/rpn.py:204, "
        "modeling/roi_heads/fast_rcnn.py:193 (smooth_l1_beta=0)",
    }

    dataset: str = "coco"  # or "digit_scenes" (generated from the bundled digits)
    root: str | None = None  # coco: folder with annotations/instances_{train,val}*.json + images
    image_size: int = 1024  # LSJ canvas; evaluation resizes the long side to it
    scale_range: list[float] = field(default_factory=lambda: [0.1, 2.0])
    hflip: float = 0.5
    # detectron2's hard-coded schedule length; a config that sets `epochs` (and not this)
    # derives the iterations from its epochs instead (other datasets, the CPU presets).
    iterations: int | None = 184_375
    epochs: float | None = None
    batch_size: int = 8  # per device: 8 GPUs x 8 = detectron2's total of 64
    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    layer_decay: float = 0.7
    # Biases decayed, norms and pos_embed not: detectron2 common/optim.py (weight_decay_norm=0),
    # solver/build.py (bias decay = weight decay), mask_rcnn_vitdet_b_100ep.py (pos_embed 0).
    decay_biases: bool = True
    warmup_iters: int = 250
    # shares of training: 8/9 and 26/27 of 184,375 round to detectron2's 163,889 and 177,546
    decay_at: list[float] = field(default_factory=lambda: [8 / 9, 26 / 27])
    drop_path: float = 0.1
    # true: the encoder stays at its pre-trained weights (no gradient, no drop path); only the
    # pyramid and the heads train. A frozen-backbone protocol for small budgets, where a full
    # fine-tune moves the encoder too little and too noisily to show what pre-training gave.
    freeze_encoder: bool = False
    # detectron2's L1 (smooth_l1_beta=0: rpn.py:204, fast_rcnn.py:193); smooth_l1: torchvision's
    box_loss: str = "l1"
    architecture: str = "vitdet"  # ViTDet's model; "light": global attention, lighter heads
    window_size: int = 14  # vitdet: window attention in every block but the global ones
    global_blocks: list[int] | None = None  # None: 2, 5, 8, 11 of 12, spread alike otherwise
    filter_empty: bool = True  # leave images without annotations out of training (detectron2)
    fpn_channels: int = 256
    box_head_dim: int = 1024
    mask_head_layers: list[int] = field(default_factory=lambda: [256, 256, 256, 256])
    rpn_pre_nms_top_n: list[int] = field(default_factory=lambda: [2000, 1000])  # train, test
    rpn_post_nms_top_n: list[int] = field(default_factory=lambda: [1000, 1000])
    rpn_batch_per_image: int = 256
    roi_batch_per_image: int = 512
    score_threshold: float = 0.05
    detections_per_image: int = 100
    checkpoint_every: int = 2000
    log_every: int = 20
    scenes: SceneSettings = field(default_factory=SceneSettings)  # dataset: digit_scenes

    def check(self, section: str) -> None:
        super().check(section)
        if self.dataset not in ("coco", "digit_scenes"):
            raise ConfigError(f"{section}.dataset={self.dataset!r} must be coco or digit_scenes")
        if self.dataset == "coco" and not self.root:
            raise ConfigError(
                f"{section}.root is required for {section}.dataset=coco: the folder holding "
                "annotations/instances_{train,val}2017.json (make: COCO_DIR=...), or use "
                "dataset=digit_scenes"
            )
        if self.architecture not in ("vitdet", "light"):
            raise ConfigError(f"{section}.architecture={self.architecture!r}: vitdet or light")
        if self.box_loss not in ("l1", "smooth_l1"):
            raise ConfigError(f"{section}.box_loss={self.box_loss!r}: l1 or smooth_l1")
        if self.window_size <= 0:
            raise ConfigError(f"{section}.window_size={self.window_size} must be positive")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ConfigError(f"{section}.scale_range={self.scale_range} must be 0 < low <= high")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"{section}.layer_decay={self.layer_decay} must lie in (0, 1]")
        given = getattr(self, "given", set())
        if "epochs" in given and "iterations" in given and self.iterations is not None:
            raise ConfigError(
                f"{section}.epochs={self.epochs} and {section}.iterations={self.iterations} are "
                f"two schedule lengths: set one (iterations: detectron2's 184375 on COCO)"
            )
        if self.iterations is None and self.epochs is None:
            raise ConfigError(f"{section}: set iterations (detectron2: 184375) or epochs")
        if self.iterations is not None and self.iterations < 1:
            raise ConfigError(f"{section}.iterations={self.iterations} must be 1 or more")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"{section}.epochs={self.epochs} must be positive")

    @classmethod
    def read(cls, raw: dict[str, Any] | None, section: str) -> DetectionSettings:
        """A config that sets ``epochs`` alone derives the iterations from them."""
        settings = super().read(raw, section)
        given = getattr(settings, "given", set())
        if "epochs" in given and "iterations" not in given:
            settings.iterations = None
        return settings

    def total_iterations(self, train_images: int, world: int) -> int:
        """Optimiser steps: ``iterations``, else ``epochs`` over the training images."""
        if self.iterations is not None:
            return self.iterations
        assert self.epochs is not None  # check() refuses neither
        return max(1, math.ceil(self.epochs * train_images / (self.batch_size * world)))


def detection_settings(raw: dict[str, Any] | None) -> DetectionSettings:
    return DetectionSettings.parse(raw, "detection")
