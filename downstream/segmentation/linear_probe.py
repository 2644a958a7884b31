"""Frozen dense probe: DINOv2's "linear" semantic-segmentation protocol (Oquab et al., 2023,
§7.4): BatchNorm and a 1×1 convolution on the frozen last block's patch tokens, bilinear
upsampling of the logits to the label, cross-entropy; mIoU on the val split. Cheap and
low-variance: it measures what the pre-trained patch features already separate.

Here the features are extracted once per image at the crop size (the image resized to a
square crop; no augmentation, unlike DINOv2's mmsegmentation pipeline: a deliberate saving,
docs/recipes.md), the head trains on the cached features, and evaluation upsamples to each
label's full size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from downstream.encoder import dense_encoder, load_pretrained_encoder
from downstream.segmentation.dataset import ADE20KSegmentation
from downstream.segmentation.metrics import IGNORE_INDEX, confusion_matrix, segmentation_scores
from downstream.segmentation.settings import SegmentationSettings
from downstream.segmentation.transforms import normalize, resize_pair
from ropim.harness.data.datasets import dataset_stats
from ropim.harness.optim import build_scheduler
from ropim.harness.progress import tracked
from ropim.harness.seeding import derive_seed


@torch.no_grad()
def _features(
    encoder: nn.Module, data: ADE20KSegmentation, crop: int, stats: tuple, in_chans: int, desc: str
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Patch-token maps (N, D, h, w) at the crop size, the crop-size labels and the full ones."""
    mean, std = stats
    maps, small, full = [], [], []
    grid = crop // encoder.patch_size
    for index in tracked(range(len(data)), len(data), desc, unit="image"):
        image, label = data[index]
        resized, label_small = resize_pair(image, label, (crop, crop))
        tokens = encoder(normalize(resized, mean, std, in_chans)[None])  # (1, N, D)
        maps.append(tokens[0].T.reshape(-1, grid, grid))
        small.append(label_small)
        full.append(label)
    return torch.stack(maps), small, full


def linear_segmentation(
    run_dir: Path, settings: SegmentationSettings, folder: Path, num_classes: int
) -> dict[str, Any]:
    probe = settings.linear
    encoder, cfg = load_pretrained_encoder(run_dir)
    dense = dense_encoder(encoder, cfg, settings.crop_size, relative_ok=True).eval()
    stats, chans, crop = dataset_stats(cfg.data), cfg.model.in_chans, settings.crop_size
    train = ADE20KSegmentation(folder, "train", num_classes, settings.reduce_zero_label)
    val = ADE20KSegmentation(folder, "val", num_classes, settings.reduce_zero_label)
    x_train, y_train, _ = _features(dense, train, crop, stats, chans, "linear seg features (train)")
    x_val, _, y_val = _features(dense, val, crop, stats, chans, "linear seg features (val)")
    labels = torch.stack(y_train)
    seed = cfg.run.seed
    torch.manual_seed(derive_seed(seed, "linear-segmentation-head"))
    head = nn.Sequential(
        nn.BatchNorm2d(x_train.shape[1]), nn.Conv2d(x_train.shape[1], num_classes, 1)
    )
    optimizer = torch.optim.AdamW(head.parameters(), lr=probe.lr, weight_decay=probe.weight_decay)
    per_epoch = max(1, math.ceil(len(x_train) / probe.batch_size))
    total = probe.epochs * per_epoch
    scheduler = build_scheduler(optimizer, total, min(probe.warmup_epochs * per_epoch, total - 1))
    generator = torch.Generator().manual_seed(derive_seed(seed, "linear-segmentation-order"))
    head.train()
    step, losses = 0, []

    def recent_loss() -> str:
        recent = losses[-per_epoch:]
        return f"loss {sum(recent) / max(len(recent), 1):.4f}"

    epochs = range(probe.epochs)
    for _ in tracked(epochs, probe.epochs, "linear seg probe", unit="epoch", note=recent_loss):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), probe.batch_size):
            index = order[start : start + probe.batch_size]
            if len(index) < 2:
                continue  # BatchNorm needs two maps
            scheduler.step_update(step)
            logits = F.interpolate(
                head(x_train[index]), size=(crop, crop), mode="bilinear", align_corners=False
            )
            loss = F.cross_entropy(logits, labels[index], ignore_index=IGNORE_INDEX)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
    head.eval()
    matrix = torch.zeros((num_classes, num_classes), dtype=torch.long)
    with torch.no_grad():
        for features, label in zip(x_val, y_val, strict=True):
            logits = F.interpolate(
                head(features[None]), size=tuple(label.shape), mode="bilinear", align_corners=False
            )
            matrix += confusion_matrix(logits.argmax(dim=1)[0], label, num_classes)
    scores = segmentation_scores(matrix)
    return {
        "mIoU": scores["mIoU"],
        "mAcc": scores["mAcc"],
        "aAcc": scores["aAcc"],
        "first_loss": losses[0] if losses else float("nan"),
        "last_loss": losses[-1] if losses else float("nan"),
    }
