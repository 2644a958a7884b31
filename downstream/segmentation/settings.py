"""Segmentation settings; defaults are mmsegmentation's MAE/BEiT UperNet recipe for ADE20K
(ViT-B/16, 512 crops, 160k iterations at batch 8 GPUs × 2, AdamW 1e-4, layer decay 0.65;
docs/recipes.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from downstream.scenes import SceneSettings
from ropim.harness.errors import ConfigError
from ropim.harness.tasks import TrainingSettings

MMSEG = "mmsegmentation 0.x configs/mae/upernet_mae-base_fp16_8x2_512x512_160k_ade20k.py"


PROTOCOLS = ("upernet", "linear")
DINOV2 = "DINOv2 (Oquab et al., 2023) §7.4, linear ADE20K protocol"


@dataclass
class LinearSegmentationSettings:
    """The frozen dense probe (downstream/segmentation/linear_probe.py)."""

    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3  # AdamW, cosine after a warmup
    weight_decay: float = 1e-4
    warmup_epochs: int = 1


@dataclass
class SegmentationSettings(TrainingSettings):
    DEFAULT_SOURCE: ClassVar[str] = f"suite default: {MMSEG}"
    SOURCES: ClassVar[dict[str, str]] = {
        "lr": f"{MMSEG}:29-33",
        "betas": f"{MMSEG}:29-33",
        "weight_decay": f"{MMSEG}:29-33",
        "layer_decay": f"{MMSEG}:29-33",
        "iterations": f"{MMSEG}:3 (160k)",
        "batch_size": f"{MMSEG}:48-49 (samples_per_gpu=2; 8 GPUs)",
        "warmup_iters": f"{MMSEG}:35-43",
        "poly_power": f"{MMSEG}:35-43",
        "min_lr": f"{MMSEG}:35-43",
        "drop_path": f"{MMSEG}:18",
        "relative_position": "mmseg/models/backbones/mae.py (MAEAttention, zero-initialised)",
        "layer_scale": f"{MMSEG}:17 (init_values=1.0)",
        "out_indices": f"{MMSEG}:19 ([3, 5, 7, 11])",
        "channels": f"{MMSEG}:21-22",
        "aux_channels": "mmseg configs/_base_/models/upernet_mae.py:41 (256)",
        "aux_weight": "mmseg configs/_base_/models/upernet_mae.py:48-49 (0.4)",
        "inference": f"{MMSEG}:24 (slide)",
        "slide_stride": f"{MMSEG}:24 (stride 341)",
        "crop_size": f"{MMSEG} (ade20k_512x512 pipeline)",
        "linear": f"{DINOV2} (BN + 1x1 conv on frozen last-block patch tokens); the "
        "schedule and epochs are the suite's (features cached once, no augmentation)",
    }
    # upernet: mmsegmentation's fine-tune; linear: DINOv2's frozen linear probe
    protocols: list[str] = field(default_factory=lambda: ["upernet"])
    linear: LinearSegmentationSettings = field(default_factory=LinearSegmentationSettings)

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
    batch_size: int = 2  # per device: mmsegmentation's 8 GPUs x 2 = 16 in total
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    layer_decay: float = 0.65
    warmup_iters: int = 1500
    poly_power: float = 1.0
    min_lr: float = 0.0
    drop_path: float = 0.1
    # mmsegmentation's MAE backbone: a plain ViT checkpoint gets BEiT-style blocks with their own
    # zero-initialised relative position tables and a layer scale at 1.0 (downstream/
    # relative_layers.py); "none" fine-tunes the plain ViT as pre-trained. Encoders pre-trained
    # with relative tables (BEiT-style) always carry theirs per block, resized to the crop.
    relative_position: str = "per_layer"
    layer_scale: float = 1.0
    out_indices: list[int] | None = None  # None: blocks 4, 6, 8, 12 of 12, spread alike
    channels: int = 768  # UperNet decode-head width
    aux_channels: int = 256
    aux_weight: float = 0.4
    inference: str = "slide"  # or "whole"
    slide_stride: int = 341
    checkpoint_every: int = 2000
    log_every: int = 50
    scenes: SceneSettings = field(default_factory=SceneSettings)

    def check(self, section: str) -> None:
        super().check(section)
        if self.dataset not in ("ade20k", "digit_scenes"):
            raise ConfigError(f"{section}.dataset={self.dataset!r} must be ade20k or digit_scenes")
        if self.dataset == "ade20k" and not self.root:
            raise ConfigError(
                f"{section}.root is required for {section}.dataset=ade20k: the folder holding "
                "ADEChallengeData2016/ (make: ADE20K_DIR=...), or use dataset=digit_scenes"
            )
        unknown = sorted(set(self.protocols) - set(PROTOCOLS))
        if unknown or not self.protocols:
            raise ConfigError(
                f"{section}.protocols={self.protocols!r}: choose one or more of {PROTOCOLS}"
            )
        if self.linear.epochs <= 0 or self.linear.batch_size < 2:
            raise ConfigError(
                f"{section}.linear needs epochs > 0 and batch_size >= 2 (BatchNorm), got "
                f"{self.linear.epochs} and {self.linear.batch_size}"
            )
        if self.inference not in ("slide", "whole"):
            raise ConfigError(f"{section}.inference={self.inference!r} must be slide or whole")
        if self.relative_position not in ("per_layer", "none"):
            raise ConfigError(
                f"{section}.relative_position={self.relative_position!r} must be per_layer or none"
            )
        if not self.layer_scale > 0:
            raise ConfigError(f"{section}.layer_scale={self.layer_scale} must be positive")
        if self.iterations <= 0:
            raise ConfigError(f"{section}.iterations={self.iterations} must be positive")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"{section}.layer_decay={self.layer_decay} must lie in (0, 1]")


def segmentation_settings(raw: dict[str, Any] | None) -> SegmentationSettings:
    return SegmentationSettings.parse(raw, "segmentation")
