"""Detection settings; defaults are ViTDet's ViT-B Mask R-CNN recipe on COCO (detectron2's
``mask_rcnn_vitdet_b_100ep``): 1024-px large-scale jitter, 100 epochs at batch 64, AdamW 1e-4,
weight decay 0.1, layer decay 0.7, 250-iteration warmup, x0.1 steps at 88.9% and 96.3%."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from downstream.scenes import SceneSettings
from ropim.config import build_section
from ropim.errors import ConfigError


@dataclass
class DetectionSettings:
    dataset: str = "coco"  # or "digit_scenes" (generated from the bundled digits)
    root: str | None = None  # coco: folder with annotations/instances_{train,val}*.json + images
    image_size: int = 1024  # LSJ canvas; evaluation resizes the long side to it
    scale_range: list[float] = field(default_factory=lambda: [0.1, 2.0])
    hflip: float = 0.5
    epochs: float = 100
    batch_size: int = 64  # over all devices
    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    layer_decay: float = 0.7
    warmup_iters: int = 250
    decay_at: list[float] = field(default_factory=lambda: [0.889, 0.963])  # share of training
    drop_path: float = 0.1
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
    num_workers: int = 0
    scenes: SceneSettings = field(default_factory=SceneSettings)  # dataset: digit_scenes


def detection_settings(raw: dict[str, Any] | None) -> DetectionSettings:
    settings = build_section(DetectionSettings, raw or {}, "detection.")
    if settings.dataset not in ("coco", "digit_scenes"):
        raise ConfigError(f"detection.dataset={settings.dataset!r} must be coco or digit_scenes")
    if settings.dataset == "coco" and not settings.root:
        raise ConfigError(
            "detection.root is required for detection.dataset=coco: the folder holding "
            "annotations/instances_{train,val}2017.json (make: COCO_DIR=...), or use "
            "dataset=digit_scenes"
        )
    low, high = settings.scale_range
    if not 0 < low <= high:
        raise ConfigError(f"detection.scale_range={settings.scale_range} must be 0 < low <= high")
    if not 0 < settings.layer_decay <= 1:
        raise ConfigError(f"detection.layer_decay={settings.layer_decay} must lie in (0, 1]")
    if settings.epochs <= 0 or settings.batch_size <= 0:
        raise ConfigError("detection.epochs and detection.batch_size must be positive")
    return settings
