"""End-to-end fine-tuning with the field's recipe, built from timm's parts: layer-wise lr
decay, drop path, mixup/cutmix, RandAugment, random erasing and label smoothing."""

from __future__ import annotations

import csv
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data.auto_augment import RandAugment, posterize
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from downstream.classification.settings import FinetuneSettings
from ropim.harness.backbone import ViTBackbone
from ropim.harness.checkpoint import backbone_signature
from ropim.harness.config import Config
from ropim.harness.data.datasets import dataset_stats, load_images
from ropim.harness.data.transforms import eval_transform
from ropim.harness.data.views import SeededViews
from ropim.harness.loop import Hooks, LoopPlan, plan_steps, train_loop
from ropim.harness.optim import build_scheduler, layer_decay_adamw
from ropim.harness.runtime import make_fabric
from ropim.harness.seeding import derive_seed, seeded_host_rngs

# (model with its fresh head, the training images' evaluation view, the val split) -> notes
HeadInit = Callable[[nn.Module, Dataset, Dataset], dict[str, float]]


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
    _allow_zero_bit_posterize(timm_transform)
    return v2.Compose([_ToPilRgb(cfg.model.in_chans), timm_transform])


def _posterize(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Posterize that keeps 0 bits as a black image, as Pillow did before it began refusing
    ``bits=0``: timm's increasing-severity RandAugment ('inc1', MAE's recipe) asks for 0 bits at
    magnitude 10, which ``mstd0.5`` reaches, and would otherwise stop the fine-tune."""
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return posterize(image, bits_to_keep)


def _allow_zero_bit_posterize(transform: Any) -> None:
    for step in getattr(transform, "transforms", []):
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.aug_fn is posterize:
                    op.aug_fn = _posterize


FINETUNE_BETAS = (0.9, 0.999)  # AdamW's default: MAE main_finetune.py, ROPIM finetune yaml:26


def published_head(vit: nn.Module, num_classes: int) -> None:
    """The fine-tune head all three papers use: mean of the patch tokens with no final token
    norm, a fresh LayerNorm after pooling (``fc_norm``), then a linear head trunc-normal at
    std 2e-5 with a zero bias (MAE ``models_vit.py:27-32,46-48``, ``main_finetune.py:257``;
    ROPIM/BEiT ``vision_transformer.py:251-265,320-322``: std 0.02 × init scale 0.001)."""
    vit.reset_classifier(num_classes, global_pool="avg")
    vit.norm = nn.Identity()
    vit.fc_norm = nn.LayerNorm(vit.embed_dim, eps=1e-6)
    nn.init.trunc_normal_(vit.head.weight, std=2e-5)
    nn.init.zeros_(vit.head.bias)


def finetune_optimizer(
    model: nn.Module, ft: FinetuneSettings, total_batch: int, skip: Collection[str] | None = None
) -> tuple[torch.optim.Optimizer, float]:
    """AdamW with the recipe's layer-wise lr decay (timm's groups), and the schedule's floor:
    ``min_lr`` as given (MAE), or scaled with the batch like the lr (``min_lr_scaled``: ROPIM's
    and SimMIM's ``MIN_LR × batch / 512``). ``skip``: names kept out of weight decay besides
    1-D parameters (default: the model's ``no_weight_decay``)."""
    scale = total_batch / ft.lr_batch_divisor
    optimizer = layer_decay_adamw(
        model,
        ft.base_lr * scale,
        ft.weight_decay,
        ft.layer_decay,
        FINETUNE_BETAS,
        no_weight_decay=skip,
    )
    return optimizer, ft.min_lr * scale if ft.min_lr_scaled else ft.min_lr


def warmup_start(ft: FinetuneSettings, total_batch: int) -> float:
    """The lr warmup starts from: ``warmup_lr``, scaled with the batch like ``min_lr``."""
    return ft.warmup_lr * total_batch / ft.lr_batch_divisor if ft.min_lr_scaled else ft.warmup_lr


def finetune_accuracy(
    backbone: ViTBackbone,
    cfg: Config,
    ft: FinetuneSettings,
    num_classes: int,
    seed: int,
    out_dir: Path,
    fingerprint: dict[str, Any],
    after_step: Sequence[Callable[[int], None]] = (),
    train_indices: Sequence[int] | None = None,
    every_epoch: bool = True,
    init_head: HeadInit | None = None,
) -> dict[str, float]:
    """Fine-tune ``backbone`` (changed in place) on the train split through the one loop
    (checkpoints and resume under ``out_dir``); top-1 on the val split.

    Deterministic per seed: views are seeded per (seed, epoch, image) including timm's draws
    from Python's ``random``; mixup/cutmix draw from NumPy seeded per (seed, step).
    ``init_head`` (the low-shot protocol's LP-FT) sets the head from the training images'
    evaluation view before the first step; what it returns joins the result."""
    fabric = make_fabric(cfg.train.accelerator, cfg.train.precision)
    torch.manual_seed(derive_seed(seed, "classifier-head"))
    model = backbone.vit
    published_head(model, num_classes)
    images = load_images(cfg.data, "train")
    if train_indices is not None:  # the low-shot protocol's labelled subset
        images = Subset(images, list(train_indices))
    train_set = SeededViews(images, finetune_transform(cfg, ft), seed)
    view = eval_transform(cfg.data, cfg.model.img_size, cfg.model.in_chans)
    val_set = SeededViews(load_images(cfg.data, "val"), view, seed)
    head_info: dict[str, float] = {}
    if init_head is not None:
        model.to(fabric.device)
        head_info = init_head(model, SeededViews(images, view, seed), val_set)
    batch = ft.batch_size - ft.batch_size % 2  # mixup pairs samples
    world = fabric.world_size
    optimizer, min_lr = finetune_optimizer(model, ft, batch * world, backbone.vit_no_weight_decay())
    desc = f"finetune {out_dir.parent.name}"
    plan = LoopPlan.for_task(
        ft,
        seed,
        desc,
        epochs=ft.epochs,
        batch_size=batch,
        clip_grad=ft.clip_grad or None,
        batch_key="classification.finetune.batch_size",
        tracking=cfg.log,
    )
    per_epoch, total = plan_steps(len(train_set), plan, world)
    scheduler = build_scheduler(
        optimizer,
        total,
        round(ft.warmup_epochs * per_epoch),
        min_lr,
        warmup_lr=warmup_start(ft, batch * world),
        warmup_prefix=ft.warmup_prefix,
    )
    total_batch = batch * world
    fabric.print(
        f"{desc}: lr {ft.base_lr * total_batch / ft.lr_batch_divisor:.3g} = base_lr "
        f"{ft.base_lr:g} x total batch {total_batch} ({world} device(s)) / "
        f"{ft.lr_batch_divisor}; min lr {min_lr:.3g}; warmup {ft.warmup_epochs:g} epochs from "
        f"{warmup_start(ft, total_batch):.3g}; cosine; layer decay {ft.layer_decay:g}; wd "
        f"{ft.weight_decay:g}; clip {ft.clip_grad or 'off'}; {ft.epochs:g} epochs = {total} steps"
    )
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
    rank = fabric.global_rank

    def step_loss(net: nn.Module, batch: Any, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        images, labels = batch
        if mixup is not None:
            with seeded_host_rngs(derive_seed(seed, "mixup", step, rank)):
                images, labels = mixup(images, labels)
        return criterion(net(images), labels), {}

    # Each rank scores every world-th image, none twice (a DistributedSampler would pad with
    # repeats and bias the top-1); the counts are summed over ranks.
    shard = Subset(val_set, range(rank, len(val_set), fabric.world_size))
    val_loader = fabric.setup_dataloaders(
        DataLoader(shard, batch_size=256, num_workers=ft.num_workers),
        use_distributed_sampler=False,
    )

    def evaluate(net: nn.Module, step: int) -> dict[str, float]:
        """Top-1 on the val split after every epoch (and the last step), as the official
        scripts do; their reported number is the best epoch, ours both best and last."""
        correct = torch.zeros((), device=fabric.device)
        seen = torch.zeros((), device=fabric.device)
        for images, labels in val_loader:
            correct += (net(images).argmax(dim=1) == labels).sum()
            seen += len(labels)
        correct = fabric.all_reduce(correct, reduce_op="sum")
        seen = fabric.all_reduce(seen, reduce_op="sum")
        return {"epoch": round(step / per_epoch, 4), "top1": float(correct / seen)}

    hooks = Hooks(  # every_epoch=False: once, after the last step (low-shot)
        loss=step_loss,
        evaluate=evaluate,
        evaluate_every=per_epoch if every_epoch else 0,
        after_step=after_step,
    )
    trained = train_loop(
        fabric,
        model,
        optimizer,
        scheduler,
        train_set,
        plan,
        hooks,
        out_dir,
        signature=backbone_signature(backbone)
        | {"task": "classification", "num_classes": str(num_classes)},
        fingerprint=fingerprint,
    )
    fabric.barrier()
    with (out_dir / "evaluations.csv").open(newline="") as handle:
        epochs = [(float(r["epoch"]), float(r["top1"])) for r in csv.DictReader(handle)]
    best_epoch, best = max(epochs, key=lambda pair: pair[1])
    return (
        {
            "top1": epochs[-1][1],
            "top1_best": best,
            "best_epoch": best_epoch,
            "per_epoch_top1": epochs,
            "steps": trained.progress.step,
            "total_batch": batch * world,
            "train_seconds": trained.progress.train_time_s,
        }
        | head_info
        | trained.cost()
    )
