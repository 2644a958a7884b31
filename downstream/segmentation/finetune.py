"""Fine-tune a pre-trained encoder with UperNet and evaluate mIoU on the validation split.

Iteration-based like mmsegmentation: AdamW with layer-wise lr decay, linear warmup then poly
decay (timm's schedulers), checkpoints every ``checkpoint_every`` iterations under
``<run>/segmentation/`` and resume from the newest one, reproducible views per (seed, epoch,
image), the confusion matrix summed over ranks under torchrun.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from timm.scheduler import PolyLRScheduler
from torch import Tensor, nn
from torch.optim import Optimizer

from downstream.encoder import (
    dense_encoder,
    finetune_fingerprint,
    load_pretrained_encoder,
)
from downstream.pyramid import ViTPyramid, default_out_indices
from downstream.relative_layers import add_relative_layers
from downstream.scenes import (
    NUM_SCENE_CLASSES,
    scene_dataset_dir,
    scenes_folder,
    spec_of,
    write_ade20k_scenes,
)
from downstream.segmentation.dataset import ADE20KSegmentation, dataset_folder
from downstream.segmentation.inference import predict_labels
from downstream.segmentation.linear_probe import linear_segmentation
from downstream.segmentation.metrics import confusion_matrix, segmentation_scores
from downstream.segmentation.model import UperNetSegmenter, segmentation_loss
from downstream.segmentation.settings import SegmentationSettings
from downstream.segmentation.transforms import (
    TrainAugment,
    keep_ratio_size,
    normalize,
    resize_pair,
)
from ropim.harness.config import Config
from ropim.harness.data.datasets import dataset_stats
from ropim.harness.data.views import SeededPairs
from ropim.harness.errors import ConfigError
from ropim.harness.loop import Hooks, LoopPlan, train_loop
from ropim.harness.optim import layer_decay_adamw
from ropim.harness.progress import tracked
from ropim.harness.runtime import make_fabric
from ropim.harness.seeding import derive_seed
from ropim.harness.tasks import TaskOutcome


def resolve_data(settings: SegmentationSettings, run_dir: Path) -> tuple[Path, int, str]:
    """Dataset folder, class count and a name: the given ADE20K root, or digit scenes."""
    if settings.dataset == "ade20k":
        return dataset_folder(settings.root or ""), settings.num_classes or 150, "ade20k"
    if settings.num_classes not in (None, NUM_SCENE_CLASSES):
        raise ConfigError(
            f"segmentation.num_classes={settings.num_classes} but digit scenes have "
            f"{NUM_SCENE_CLASSES} classes (digits 0-9 and background); unset it"
        )
    s = settings.scenes
    folder = write_ade20k_scenes(
        scene_dataset_dir(s, scenes_folder(s, run_dir), "ade20k"), spec_of(s)
    )
    return folder, NUM_SCENE_CLASSES, "digit_scenes"


def segmentation_optimizer(model: nn.Module, settings: SegmentationSettings) -> Optimizer:
    """AdamW with layer-wise lr decay. mmsegmentation's LayerDecayOptimizerConstructor exempts
    1-D parameters and biases, and the names 'pos_embed'/'cls_token', which it compares against
    'backbone.'-prefixed names: so the absolute positions and the cls token are decayed after
    all (no skip list here)."""
    return layer_decay_adamw(
        model,
        settings.lr,
        settings.weight_decay,
        settings.layer_decay,
        settings.betas,
        no_weight_decay=(),
    )


def build_segmenter(
    run_dir: str | Path, settings: SegmentationSettings, num_classes: int
) -> tuple[UperNetSegmenter, Config]:
    encoder, cfg = load_pretrained_encoder(run_dir, drop_path=settings.drop_path)
    if encoder.relative_position is None and settings.relative_position == "per_layer":
        if settings.inference == "whole":
            raise ConfigError(
                "segmentation.inference=whole needs an encoder that takes any image size, but "
                "segmentation.relative_position=per_layer sizes its tables for the "
                f"{settings.crop_size}-px crop: use segmentation.inference=slide, or "
                "segmentation.relative_position=none"
            )
        encoder, cfg = add_relative_layers(encoder, cfg, settings.layer_scale)
    dense = dense_encoder(encoder, cfg, settings.crop_size, relative_ok=True)
    if dense.relative_position is not None and settings.inference == "whole":
        raise ConfigError(
            f"segmentation.inference=whole needs an encoder that takes any image size; "
            f"model.name={cfg.model.name!r} has relative position tables sized for the "
            f"{settings.crop_size}-px crop: use segmentation.inference=slide"
        )
    depth = len(dense.vit.blocks)
    indices = settings.out_indices or default_out_indices(depth)
    pyramid = ViTPyramid(dense, indices)
    model = UperNetSegmenter(
        pyramid, num_classes, channels=settings.channels, aux_channels=settings.aux_channels
    )
    return model, cfg


def run_segmentation(
    run_dir: Path,
    settings: SegmentationSettings,
    after_step: Sequence[Callable[[int], None]] = (),
) -> TaskOutcome:
    """The configured protocols: the UperNet fine-tune (``upernet``) and the frozen linear
    probe (``linear``), each with mIoU, mAcc, aAcc and its seconds."""
    measurements: list[tuple[str, str, float]] = []
    details: dict[str, Any] = {"settings": asdict(settings)}
    if "upernet" in settings.protocols:
        start = time.perf_counter()
        scores = finetune_segmentation(run_dir, settings, after_step)
        metrics = ("mIoU", "mAcc", "aAcc", "majority_mIoU")
        measurements += [("upernet", m, scores[m]) for m in metrics]
        measurements.append(("upernet", "seconds", time.perf_counter() - start))
        details["scores"] = scores
    if "linear" in settings.protocols:
        start = time.perf_counter()
        folder, num_classes, _ = resolve_data(settings, Path(run_dir))
        scores = linear_segmentation(Path(run_dir), settings, folder, num_classes)
        measurements += [("linear", m, scores[m]) for m in ("mIoU", "mAcc", "aAcc")]
        measurements.append(("linear", "seconds", time.perf_counter() - start))
        details["linear"] = scores
    return TaskOutcome(measurements, details)


def finetune_segmentation(
    run_dir: str | Path,
    settings: SegmentationSettings,
    after_step: Sequence[Callable[[int], None]] = (),
) -> dict[str, Any]:
    run_dir = Path(run_dir)
    folder, num_classes, dataset_name = resolve_data(settings, run_dir)
    model, cfg = build_segmenter(run_dir, settings, num_classes)
    seed = cfg.run.seed
    fabric = make_fabric(cfg.train.accelerator, cfg.train.precision)
    world = fabric.world_size
    mean, std = dataset_stats(cfg.data)
    in_chans = cfg.model.in_chans
    train = ADE20KSegmentation(folder, "train", num_classes, settings.reduce_zero_label)
    val = ADE20KSegmentation(folder, "val", num_classes, settings.reduce_zero_label)
    augment = TrainAugment(
        settings.crop_size,
        settings.scale,
        settings.ratio_range,
        settings.cat_max_ratio,
        settings.hflip,
        settings.photometric,
        mean,
        std,
        in_chans,
    )
    views = SeededPairs(train, augment, seed, "segmentation-view")
    if world > 1 and fabric.device.type == "cuda":
        # mmsegmentation's SyncBN; torch implements it for GPUs only, so CPU processes
        # (gloo) keep per-process BatchNorm statistics
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    torch.manual_seed(derive_seed(seed, "segmentation-heads"))
    optimizer = segmentation_optimizer(model, settings)
    total = settings.iterations
    warmup = min(settings.warmup_iters, total - 1)
    # mmcv's PolyLrUpdaterHook: the poly decay runs over all iterations (warmup included).
    scheduler = PolyLRScheduler(
        optimizer,
        t_initial=max(total, 1),
        power=settings.poly_power,
        lr_min=settings.min_lr,
        warmup_t=warmup,
        warmup_lr_init=settings.lr * 1e-6,
        warmup_prefix=False,
        t_in_epochs=False,
    )
    plan = LoopPlan.for_task(
        settings,
        seed,
        f"seg {run_dir.name}",
        steps=total,
        keep_history=True,
        batch_key="segmentation.batch_size",
        tracking=cfg.log,
    )

    def step_loss(net: nn.Module, batch: Any, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        images, labels = batch
        return segmentation_loss(net(images, with_aux=True), labels, settings.aux_weight), {}

    trained = train_loop(
        fabric,
        model,
        optimizer,
        scheduler,
        views,
        plan,
        Hooks(loss=step_loss, after_step=after_step),
        run_dir / "segmentation",
        model.signature(),
        finetune_fingerprint(run_dir, settings),
    )
    scores = evaluate_segmenter(trained.model, val, settings, cfg, fabric)
    seconds = trained.progress.train_time_s
    return (
        scores
        | {
            "dataset": dataset_name,
            "num_classes": num_classes,
            "iterations": total,
            "total_batch": settings.batch_size * world,
            "train_seconds": seconds,
            "images_per_s": trained.progress.images_seen / max(seconds, 1e-9),
            "first_loss": trained.mean_of("loss", "first"),
            "last_loss": trained.mean_of("loss", "last"),
        }
        | trained.cost()
    )


@torch.no_grad()
def evaluate_segmenter(
    model: nn.Module,
    val: ADE20KSegmentation,
    settings: SegmentationSettings,
    cfg: Config,
    fabric: Any,
) -> dict[str, Any]:
    """Confusion matrix over the whole split (each rank takes every world-th image)."""
    model.eval()
    mean, std = dataset_stats(cfg.data)
    matrix = torch.zeros((val.num_classes,) * 2, dtype=torch.long, device=fabric.device)
    start = time.perf_counter()
    mine = range(fabric.global_rank, len(val), fabric.world_size)
    for index in tracked(mine, len(mine), "segmentation eval", unit="image"):
        image, label = val[index]
        size = keep_ratio_size(*label.shape, settings.scale)
        image, _ = resize_pair(image, None, size)
        pixels = normalize(image, mean, std, cfg.model.in_chans)[None].to(fabric.device)
        prediction = predict_labels(
            lambda x: model(x)["logits"].float(),
            pixels,
            val.num_classes,
            settings.inference,
            settings.crop_size,
            settings.slide_stride,
            tuple(label.shape),
        )
        matrix += confusion_matrix(prediction[0], label.to(fabric.device), val.num_classes)
    matrix = fabric.all_reduce(matrix, reduce_op="sum")
    scores = segmentation_scores(matrix.cpu())
    scores["majority_mIoU"] = majority_baseline(matrix.cpu())
    scores["eval_seconds"] = time.perf_counter() - start
    scores["confusion_matrix"] = matrix.cpu().tolist()
    return scores


def majority_baseline(matrix: torch.Tensor) -> float:
    """mIoU of predicting the most frequent ground-truth class everywhere (e.g. background)."""
    area = matrix.sum(dim=1)
    constant = torch.zeros_like(matrix)
    constant[:, int(area.argmax())] = area
    return float(segmentation_scores(constant)["mIoU"])
