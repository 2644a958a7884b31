"""End-to-end fine-tuning with the field's recipe, built from timm's parts: layer-wise lr
decay, drop path, mixup/cutmix, RandAugment, random erasing and label smoothing."""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from downstream.classification.settings import FinetuneSettings
from ropim.backbone import ViTBackbone
from ropim.config import Config
from ropim.data import SeededViews, dataset_stats, eval_transform, load_images
from ropim.optim import build_scheduler
from ropim.trainer import make_fabric


class _ToPilRgb:
    """timm's training transforms take PIL images; the bundled digits are uint8 tensors."""

    def __init__(self, channels: int) -> None:
        self.mode = "RGB" if channels == 3 else "L"

    def __call__(self, image: Any) -> Image.Image:
        if isinstance(image, torch.Tensor):
            image = v2.functional.to_pil_image(image)
        return image.convert(self.mode)


def finetune_transform(cfg: Config, ft: FinetuneSettings) -> v2.Compose:
    mean, std = dataset_stats(cfg.data)
    timm_transform = create_transform(
        cfg.model.img_size,
        is_training=True,
        scale=tuple(ft.crop_scale),
        hflip=ft.hflip,
        auto_augment=ft.rand_augment,
        color_jitter=None,  # MAE's recipe: RandAugment only (timm adds jitter 0.4 otherwise)
        interpolation="bicubic",
        re_prob=ft.random_erasing,
        re_mode="pixel",
        mean=tuple(mean),
        std=tuple(std),
    )
    return v2.Compose([_ToPilRgb(cfg.model.in_chans), timm_transform])


def finetune_accuracy(
    backbone: ViTBackbone, cfg: Config, ft: FinetuneSettings, num_classes: int, seed: int
) -> dict[str, float]:
    """Fine-tune ``backbone`` (changed in place) on the train split; top-1 on the val split."""
    fabric = make_fabric(cfg.train.accelerator, cfg.train.precision)
    torch.manual_seed(seed)
    model = backbone.vit
    model.reset_classifier(num_classes, global_pool="avg")
    train_set = SeededViews(load_images(cfg.data, "train"), finetune_transform(cfg, ft), seed)
    val_set = SeededViews(
        load_images(cfg.data, "val"),
        eval_transform(cfg.data, cfg.model.img_size, cfg.model.in_chans),
        seed,
    )
    batch = ft.batch_size - ft.batch_size % 2  # mixup pairs samples
    world = fabric.world_size
    lr = ft.base_lr * batch * world / ft.lr_batch_divisor
    optimizer = create_optimizer_v2(
        model, "adamw", lr=lr, weight_decay=ft.weight_decay, layer_decay=ft.layer_decay
    )
    train_loader = DataLoader(
        train_set,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    val_loader = DataLoader(val_set, batch_size=256, num_workers=cfg.data.num_workers)
    model, optimizer = fabric.setup(model, optimizer)
    train_loader, val_loader = fabric.setup_dataloaders(train_loader, val_loader)
    per_epoch = len(train_loader)
    total = max(1, math.ceil(ft.epochs * per_epoch))
    scheduler = build_scheduler(optimizer, total, round(ft.warmup_epochs * per_epoch), ft.min_lr)
    mixing = ft.mixup > 0 or ft.cutmix > 0
    mixup = (
        Mixup(
            mixup_alpha=ft.mixup,
            cutmix_alpha=ft.cutmix,
            label_smoothing=ft.label_smoothing,
            num_classes=num_classes,
        )
        if mixing
        else None
    )
    criterion = (
        SoftTargetCrossEntropy() if mixing else LabelSmoothingCrossEntropy(ft.label_smoothing)
    )
    step = 0
    model.train()
    while step < total:
        for images, labels in train_loader:
            scheduler.step_update(step)
            if mixup is not None:
                images, labels = mixup(images, labels)
            loss = criterion(model(images), labels)
            fabric.backward(loss)
            if ft.clip_grad is not None:
                fabric.clip_gradients(model, optimizer, max_norm=ft.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step >= total:
                break
    model.eval()
    correct = torch.zeros((), device=fabric.device)
    seen = torch.zeros((), device=fabric.device)
    with torch.no_grad():
        for images, labels in val_loader:
            correct += (model(images).argmax(dim=1) == labels).sum()
            seen += len(labels)
    correct, seen = fabric.all_reduce(correct, "sum"), fabric.all_reduce(seen, "sum")
    return {"top1": float(correct / seen), "final_train_loss": float(loss.detach()), "steps": step}
