"""Fine-tune a pre-trained encoder as ViTDet Mask R-CNN and score box and mask AP with COCOeval.

AdamW with layer-wise lr decay, linear warmup then x0.1 steps (timm's schedulers), large-scale
jitter seeded per (seed, epoch, image), checkpoints under ``<run>/detection/`` with resume, and
predictions gathered from every rank before one COCOeval.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from timm.scheduler import MultiStepLRScheduler
from torch import Tensor, nn

from downstream.detection.coco_eval import coco_evaluate, coco_results, gather_predictions
from downstream.detection.dataset import CocoInstances
from downstream.detection.model import ViTDetMaskRCNN
from downstream.detection.settings import DetectionSettings
from downstream.detection.transforms import LargeScaleJitter, to_model_input
from downstream.encoder import (
    dense_encoder,
    finetune_fingerprint,
    load_pretrained_encoder,
)
from downstream.scenes import scene_dataset_dir, scenes_folder, spec_of, write_coco_scenes
from ropim.harness.data.datasets import dataset_stats
from ropim.harness.data.views import SeededPairs
from ropim.harness.loop import Hooks, LoopPlan, train_loop
from ropim.harness.optim import layer_decay_adamw
from ropim.harness.progress import tracked
from ropim.harness.runtime import make_fabric
from ropim.harness.seeding import derive_seed
from ropim.harness.tasks import TaskOutcome


def resolve_data(settings: DetectionSettings, run_dir: Path) -> tuple[Path, str]:
    if settings.dataset == "coco":
        return Path(settings.root or "").expanduser(), "coco"
    s = settings.scenes
    return write_coco_scenes(
        scene_dataset_dir(s, scenes_folder(s, run_dir), "coco"), spec_of(s)
    ), "digit_scenes"


def collate_lists(batch: list) -> tuple[list, list]:
    """Detection batches stay lists: images and targets differ in size."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def run_detection(
    run_dir: Path,
    settings: DetectionSettings,
    after_step: Sequence[Callable[[int], None]] = (),
) -> TaskOutcome:
    """Mask R-CNN fine-tune and COCO's six AP numbers for boxes and masks (size ranges without
    objects have no AP and give no row)."""
    start = time.perf_counter()
    scores = finetune_detection(run_dir, settings, after_step)
    measurements = [
        ("vitdet_mask_rcnn", f"{prefix}_{stat}", scores[f"{prefix}_{stat}"])
        for prefix in ("box", "mask")
        for stat in ("AP", "AP50", "AP75", "APs", "APm", "APl")
        if not math.isnan(scores[f"{prefix}_{stat}"])
    ]
    measurements.append(("vitdet_mask_rcnn", "seconds", time.perf_counter() - start))
    return TaskOutcome(measurements, {"scores": scores, "settings": asdict(settings)})


def finetune_detection(
    run_dir: str | Path,
    settings: DetectionSettings,
    after_step: Sequence[Callable[[int], None]] = (),
) -> dict[str, Any]:
    run_dir = Path(run_dir)
    root, dataset_name = resolve_data(settings, run_dir)
    train = CocoInstances(root, "train", filter_empty=settings.filter_empty)
    val = CocoInstances(root, "val")
    drop_path = 0.0 if settings.freeze_encoder else settings.drop_path
    encoder, cfg = load_pretrained_encoder(run_dir, drop_path=drop_path)
    seed = cfg.run.seed
    mean, std = dataset_stats(cfg.data)
    torch.manual_seed(derive_seed(seed, "detection-heads"))
    model = ViTDetMaskRCNN(
        dense_encoder(encoder, cfg, settings.image_size),
        train.num_classes,
        settings.image_size,
        mean,
        std,
        fpn_channels=settings.fpn_channels,
        box_head_dim=settings.box_head_dim,
        mask_head_layers=settings.mask_head_layers,
        rpn_pre_nms_top_n=settings.rpn_pre_nms_top_n,
        rpn_post_nms_top_n=settings.rpn_post_nms_top_n,
        rpn_batch_per_image=settings.rpn_batch_per_image,
        roi_batch_per_image=settings.roi_batch_per_image,
        score_threshold=settings.score_threshold,
        detections_per_image=settings.detections_per_image,
        architecture=settings.architecture,
        window_size=settings.window_size,
        global_indices=settings.global_blocks,
        box_loss=settings.box_loss,
    )
    if settings.freeze_encoder:  # the optimiser's groups leave frozen parameters out
        model.encoder.requires_grad_(False)
    fabric = make_fabric(cfg.train.accelerator, cfg.train.precision)
    optimizer = layer_decay_adamw(
        model,
        settings.lr,
        settings.weight_decay,
        settings.layer_decay,
        settings.betas,
        decay_biases=settings.decay_biases,
    )
    world = fabric.world_size
    total = settings.total_iterations(len(train), world)
    scheduler = MultiStepLRScheduler(
        optimizer,
        decay_t=[round(share * total) for share in settings.decay_at],
        decay_rate=0.1,
        warmup_t=min(settings.warmup_iters, total - 1),
        warmup_lr_init=settings.lr * 1e-3,
        warmup_prefix=False,
        t_in_epochs=False,
    )
    augment = LargeScaleJitter(
        settings.image_size, settings.scale_range, settings.hflip, cfg.model.in_chans
    )
    views = SeededPairs(train, augment, seed, "detection-view")
    plan = LoopPlan.for_task(
        settings,
        seed,
        f"det {run_dir.name}",
        steps=total,
        keep_history=True,
        collate=collate_lists,
        batch_key="detection.batch_size",
        tracking=cfg.log,
    )

    def step_loss(net: nn.Module, batch: Any, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        images, targets = batch
        losses = net(images, targets)
        return sum(losses.values()), dict(losses)

    trained = train_loop(
        fabric,
        model,
        optimizer,
        scheduler,
        views,
        plan,
        Hooks(loss=step_loss, after_step=after_step),
        run_dir / "detection",
        model.signature(),
        finetune_fingerprint(run_dir, settings),
    )
    scores = evaluate_detector(trained.model, val, cfg.model.in_chans, fabric)
    terms = [k for k in trained.history[-1] if k != "loss"] if trained.history else []
    return (
        scores
        | {
            "dataset": dataset_name,
            "num_classes": train.num_classes,
            "iterations": total,
            "total_batch": settings.batch_size * world,
            "train_seconds": trained.progress.train_time_s,
            "images_per_s": trained.progress.images_seen / max(trained.progress.train_time_s, 1e-9),
            "first_losses": {k: trained.mean_of(k, "first") for k in ["loss", *terms]},
            "last_losses": {k: trained.mean_of(k, "last") for k in ["loss", *terms]},
            "loss_curves": {k: trained.curve(k) for k in ["loss", *terms]},
        }
        | trained.cost()
    )


@torch.no_grad()
def evaluate_detector(model: nn.Module, val: CocoInstances, in_chans: int, fabric: Any) -> dict:
    """Each rank predicts every world-th image; the merged results go through COCOeval."""
    model.eval()
    start = time.perf_counter()
    local = []
    mine = range(fabric.global_rank, len(val), fabric.world_size)
    for index in tracked(mine, len(mine), "detection eval", unit="image"):
        image, target = val[index]
        output = model([to_model_input(image, in_chans).to(fabric.device)])[0]
        local += coco_results(output, int(target["image_id"]), val.category_ids)
    merged = gather_predictions(local)
    scores = coco_evaluate(val.coco, merged, val.image_ids)
    return scores | {"detections": len(merged), "eval_seconds": time.perf_counter() - start}
