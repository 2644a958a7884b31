"""Fine-tune a pre-trained encoder with UperNet and evaluate mIoU on the validation split.

Iteration-based like mmsegmentation: AdamW with layer-wise lr decay, linear warmup then poly
decay (timm's schedulers), checkpoints every ``checkpoint_every`` iterations under
``<run>/segmentation/`` and resume from the newest one, reproducible views per (seed, epoch,
image), the confusion matrix summed over ranks under torchrun.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import PolyLRScheduler
from torch import nn
from torch.utils.data import DataLoader, Dataset

from downstream.encoder import dense_encoder, load_pretrained_encoder
from downstream.pyramid import ViTPyramid, default_out_indices
from downstream.scenes import NUM_SCENE_CLASSES, spec_of, write_ade20k_scenes
from downstream.segmentation.dataset import ADE20KSegmentation, dataset_folder
from downstream.segmentation.inference import predict_labels
from downstream.segmentation.metrics import confusion_matrix, segmentation_scores
from downstream.segmentation.model import UperNetSegmenter, segmentation_loss
from downstream.segmentation.settings import SegmentationSettings
from downstream.segmentation.transforms import (
    TrainAugment,
    keep_ratio_size,
    normalize,
    resize_pair,
)
from ropim.checkpoint import CheckpointDir
from ropim.config import Config
from ropim.data import dataset_stats, epoch_batches
from ropim.errors import ConfigError
from ropim.progress import ProgressDisplay
from ropim.run_record import MetricsLog
from ropim.seeding import derive_seed
from ropim.trainer import make_fabric


def resolve_data(settings: SegmentationSettings) -> tuple[Path, int, str]:
    """Dataset folder, class count and a name: the given ADE20K root, or digit scenes."""
    if settings.root:
        return dataset_folder(settings.root), settings.num_classes or 150, "ade20k"
    if settings.num_classes not in (None, NUM_SCENE_CLASSES):
        raise ConfigError(
            f"segmentation.num_classes={settings.num_classes} but digit scenes have "
            f"{NUM_SCENE_CLASSES} classes (digits 0-9 and background); unset it or set "
            f"segmentation.root to your dataset"
        )
    s = settings.scenes
    spec = spec_of(s)
    digest = derive_seed(*sorted(asdict(spec).items())) % 10**8
    name = f"digit_scenes_{s.canvas}px_{s.train_scenes}_{s.val_scenes}_{digest:08d}"
    folder = write_ade20k_scenes(Path(s.folder) / name, spec)
    return folder, NUM_SCENE_CLASSES, "digit_scenes"


class AugmentedPairs(Dataset):
    """Training views fixed by (seed, epoch, index), so a resumed run sees the same batches."""

    def __init__(self, data: ADE20KSegmentation, augment: TrainAugment, seed: int) -> None:
        self.data, self.augment, self.seed, self.epoch = data, augment, seed, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        image, label = self.data[index]
        generator = torch.Generator().manual_seed(
            derive_seed(self.seed, "segmentation-view", self.epoch, index)
        )
        return self.augment(image, label, generator)


def build_segmenter(
    run_dir: str | Path, settings: SegmentationSettings, num_classes: int
) -> tuple[UperNetSegmenter, Config]:
    encoder, cfg = load_pretrained_encoder(run_dir, drop_path=settings.drop_path)
    dense = dense_encoder(encoder, cfg, settings.crop_size)
    depth = len(dense.vit.blocks)
    indices = settings.out_indices or default_out_indices(depth)
    pyramid = ViTPyramid(dense, indices)
    model = UperNetSegmenter(
        pyramid, num_classes, channels=settings.channels, aux_channels=settings.aux_channels
    )
    return model, cfg


def finetune_segmentation(run_dir: str | Path, settings: SegmentationSettings) -> dict[str, Any]:
    run_dir = Path(run_dir)
    folder, num_classes, dataset_name = resolve_data(settings)
    model, cfg = build_segmenter(run_dir, settings, num_classes)
    seed = cfg.run.seed
    fabric = make_fabric(cfg.train.accelerator, cfg.train.precision)
    world, rank = fabric.world_size, fabric.global_rank
    if settings.batch_size % world:
        raise ConfigError(
            f"segmentation.batch_size={settings.batch_size} must divide over {world} devices"
        )
    per_device = settings.batch_size // world
    mean, std = dataset_stats(cfg.data)
    in_chans = cfg.model.in_chans
    train = ADE20KSegmentation(folder, "train", num_classes, settings.reduce_zero_label)
    val = ADE20KSegmentation(folder, "val", num_classes, settings.reduce_zero_label)
    if len(train) < settings.batch_size:
        raise ConfigError(
            f"{len(train)} training images is fewer than segmentation.batch_size="
            f"{settings.batch_size}"
        )
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
    views = AugmentedPairs(train, augment, seed)
    if world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # mmsegmentation's SyncBN
    torch.manual_seed(derive_seed(seed, "segmentation-heads"))
    optimizer = create_optimizer_v2(
        model,
        "adamw",
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        layer_decay=settings.layer_decay,
        betas=tuple(settings.betas),
    )
    total = settings.iterations
    warmup = min(settings.warmup_iters, total - 1)
    scheduler = PolyLRScheduler(
        optimizer,
        t_initial=max(total - warmup, 1),
        power=settings.poly_power,
        lr_min=settings.min_lr,
        warmup_t=warmup,
        warmup_lr_init=settings.lr * 1e-6,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    out_dir = run_dir / "segmentation"
    checkpoints = CheckpointDir(out_dir)
    state: dict[str, Any] = {"optimizer": optimizer, "scheduler": scheduler}
    step, train_time, losses = 0, 0.0, []
    latest = checkpoints.latest()
    if latest is not None:
        rest = checkpoints.load(fabric, latest, model, state)
        step, train_time, losses = rest["step"], rest["train_time_s"], rest["losses"]
        fabric.print(f"segmentation: resuming {run_dir.name} from iteration {step}")
    signature = model.signature()
    model, optimizer = fabric.setup(model, optimizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out_dir / "metrics.csv")
    log.truncate_after(step)
    per_epoch = len(train) // settings.batch_size
    display = ProgressDisplay(total, step, f"seg {run_dir.name}", rank == 0)
    model.train()
    window_start, window_images = time.perf_counter(), 0
    while step < total:
        epoch, start_batch = divmod(step, per_epoch)
        views.epoch = epoch
        batches = epoch_batches(
            len(train),
            per_device,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world,
            start_batch=start_batch,
        )
        loader = fabric.setup_dataloaders(
            DataLoader(
                views, batch_sampler=batches[: total - step], num_workers=settings.num_workers
            ),
            use_distributed_sampler=False,
        )
        for images, labels in loader:
            scheduler.step_update(step)
            loss = segmentation_loss(model(images, with_aux=True), labels, settings.aux_weight)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_images += len(images) * world
            losses.append(float(loss.detach()))
            display.advance()
            if step % settings.log_every == 0 or step == total:
                now = time.perf_counter()
                train_time += now - window_start
                speed = window_images / max(now - window_start, 1e-9)
                lr = optimizer.param_groups[-1]["lr"]
                display.report(losses[-1], lr, speed)
                if rank == 0:
                    log.append(
                        {
                            "step": step,
                            "epoch": round(step / per_epoch, 4),
                            "loss": losses[-1],
                            "lr": lr,
                            "images_per_s": round(speed, 2),
                            "elapsed_s": round(train_time, 2),
                        }
                    )
                window_start, window_images = time.perf_counter(), 0
            if step % settings.checkpoint_every == 0 or step == total:
                checkpoints.save(
                    fabric,
                    step,
                    model,
                    state | {"step": step, "train_time_s": train_time, "losses": losses},
                    signature,
                )
                window_start = time.perf_counter()
    display.close()
    scores = evaluate_segmenter(model, val, settings, cfg, fabric)
    head = max(1, min(settings.log_every, len(losses) // 4))
    return scores | {
        "dataset": dataset_name,
        "num_classes": num_classes,
        "iterations": total,
        "train_seconds": train_time,
        "images_per_s": total * settings.batch_size / max(train_time, 1e-9),
        "first_loss": sum(losses[:head]) / head,
        "last_loss": sum(losses[-head:]) / head,
    }


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
    for index in range(fabric.global_rank, len(val), fabric.world_size):
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
    model.train()
    return scores


def majority_baseline(matrix: torch.Tensor) -> float:
    """mIoU of predicting the most frequent ground-truth class everywhere (e.g. background)."""
    area = matrix.sum(dim=1)
    constant = torch.zeros_like(matrix)
    constant[:, int(area.argmax())] = area
    return float(segmentation_scores(constant)["mIoU"])
