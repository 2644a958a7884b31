"""The views a model sees: pre-training crops and flips, and the evaluation view (resize,
centre crop), normalised with the dataset's statistics."""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

from ropim.harness.config import DataSection
from ropim.harness.data.datasets import dataset_stats
from ropim.harness.errors import ConfigError


def _channels(in_chans: int) -> v2.Transform:
    return v2.RGB() if in_chans == 3 else v2.Grayscale(num_output_channels=in_chans)


# Evaluation views resize bicubic: MAE util/datasets.py:52-61, ROPIM data_finetune.py:139-146
# (DATA.INTERPOLATION's default), SimMIM likewise.
EVAL_INTERPOLATION = "bicubic"


def _interpolation(name: str | None) -> v2.InterpolationMode:
    if name is None:
        raise ConfigError("data.interpolation is unset: fill it from the method's recipe first")
    try:
        return v2.InterpolationMode(name)
    except ValueError:
        raise ConfigError(f"unknown data.interpolation={name!r}") from None


def pretrain_transform(cfg: DataSection, img_size: int, in_chans: int) -> v2.Transform:
    """RandomResizedCrop + horizontal flip, then per-dataset normalisation (the recipe)."""
    mean, std = dataset_stats(cfg)
    return v2.Compose(
        [
            v2.ToImage(),
            _channels(in_chans),
            v2.RandomResizedCrop(
                img_size,
                scale=tuple(cfg.crop_scale),
                ratio=tuple(cfg.crop_ratio),
                interpolation=_interpolation(cfg.interpolation),
                antialias=True,
            ),
            v2.RandomHorizontalFlip(cfg.hflip),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def eval_resize(cfg: DataSection, img_size: int) -> int:
    """The shorter side the evaluation view is resized to before its centre crop (timm's
    ``floor(img_size / crop_pct)``: 256 for 224 at 0.875)."""
    crop_pct = cfg.eval_crop_pct
    if crop_pct is None:
        crop_pct = 1.0 if cfg.dataset == "mnist" else 0.875
    return math.floor(img_size / crop_pct)


def eval_transform(cfg: DataSection, img_size: int, in_chans: int) -> v2.Transform:
    """Resize the shorter side, then centre crop: the published evaluation view (Resize 256 ->
    CenterCrop 224 on image folders; identity for the 28-px digits at 28 px)."""
    mean, std = dataset_stats(cfg)
    return v2.Compose(
        [
            v2.ToImage(),
            _channels(in_chans),
            v2.Resize(
                eval_resize(cfg, img_size),
                interpolation=_interpolation(EVAL_INTERPOLATION),
                antialias=True,
            ),
            v2.CenterCrop(img_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
