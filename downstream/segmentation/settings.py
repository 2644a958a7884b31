"""Segmentation settings; defaults are mmsegmentation's MAE/BEiT UperNet recipe for ADE20K
(ViT-B/16, 512 crops, 160k iterations at batch 16, AdamW 1e-4, layer decay 0.65)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from downstream.scenes import SceneSettings
from ropim.config import build_section
from ropim.errors import ConfigError


@dataclass
class SegmentationSettings:
    dataset: str = "ade20k"  # or "digit_scenes" (generated from the bundled digits)
    root: str | None = None  # ade20k: the folder holding ADEChallengeData2016/
    num_classes: int | None = None  # None: 150 for ADE20K, 11 for digit scenes
    reduce_zero_label: bool = True
    crop_size: int = 512
    scale: list[int] = field(default_factory=lambda: [2048, 512])  # keep-ratio (long, short)
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True
    iterations: int = 160_000
    batch_size: int = 16  # over all devices
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    layer_decay: float = 0.65
    warmup_iters: int = 1500
    poly_power: float = 1.0
    min_lr: float = 0.0
    drop_path: float = 0.1
    out_indices: list[int] | None = None  # None: blocks 4, 6, 8, 12 of 12, spread alike
    channels: int = 768  # UperNet decode-head width
    aux_channels: int = 256
    aux_weight: float = 0.4
    inference: str = "slide"  # or "whole"
    slide_stride: int = 341
    checkpoint_every: int = 2000
    log_every: int = 50
    num_workers: int = 0
    scenes: SceneSettings = field(default_factory=SceneSettings)


def segmentation_settings(raw: dict[str, Any] | None) -> SegmentationSettings:
    settings = build_section(SegmentationSettings, raw or {}, "segmentation.")
    if settings.dataset not in ("ade20k", "digit_scenes"):
        raise ConfigError(
            f"segmentation.dataset={settings.dataset!r} must be ade20k or digit_scenes"
        )
    if settings.dataset == "ade20k" and not settings.root:
        raise ConfigError(
            "segmentation.root is required for segmentation.dataset=ade20k: the folder holding "
            "ADEChallengeData2016/ (make: ADE20K_DIR=...), or use dataset=digit_scenes"
        )
    if settings.inference not in ("slide", "whole"):
        raise ConfigError(f"segmentation.inference={settings.inference!r} must be slide or whole")
    if settings.iterations <= 0 or settings.batch_size <= 0:
        raise ConfigError("segmentation.iterations and segmentation.batch_size must be positive")
    if not 0 < settings.layer_decay <= 1:
        raise ConfigError(f"segmentation.layer_decay={settings.layer_decay} must lie in (0, 1]")
    return settings
