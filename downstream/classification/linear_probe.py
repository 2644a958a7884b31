"""Linear probe as MAE runs it: frozen features → BatchNorm without affine → linear layer.

Two ways to feed it: MAE's (``augment``: a new RandomResizedCrop + flip view of every training
image each epoch, through the frozen encoder; facebookresearch/mae main_linprobe.py:132-141),
or features extracted once from the evaluation view, which is much cheaper (CPU presets).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
from timm.optim import Lars
from torch import Tensor, nn
from torch.utils.data import DataLoader

from downstream.classification.settings import LinearSettings
from ropim.harness.backbone import ViTBackbone
from ropim.harness.data.batching import epoch_batches, steps_per_epoch
from ropim.harness.data.views import SeededViews
from ropim.harness.optim import build_scheduler
from ropim.harness.progress import tracked


def mae_lars(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    trust_coeff: float = 0.001,
) -> Lars:
    """MAE's LARS (facebookresearch/mae ``util/lars.py:18-47``) from timm's ``Lars``: momentum
    0.9, trust ratio ``0.001·‖w‖/‖g‖`` on every parameter with two or more dimensions, plain
    momentum SGD for biases and norms. timm's defaults (no momentum; the trust ratio only when
    weight decay is non-zero) make it plain SGD at weight decay 0, which is how MAE probes.

    With weight decay, timm divides by ``‖g‖ + wd·‖w‖`` where MAE divides by ``‖g + wd·w‖``,
    and timm also decays the 1-D parameters; MAE's probe uses weight decay 0, where both agree.
    """
    matrices = [p for p in model.parameters() if p.ndim > 1]
    vectors = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": matrices, "always_adapt": True},
        {"params": vectors, "always_adapt": False, "weight_decay": 0.0},
    ]
    return Lars(
        [g for g in groups if g["params"]],
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        trust_coeff=trust_coeff,
    )


class PerDeviceBatchNorm(nn.BatchNorm1d):
    """BatchNorm whose training statistics come from groups of ``group`` samples, as on
    ``batch / group`` GPUs without SyncBN; the running statistics follow the first group, as
    DDP broadcasts rank 0's buffers. Evaluation uses the running statistics as usual."""

    def __init__(self, dim: int, group: int | None, **kwargs) -> None:
        super().__init__(dim, **kwargs)
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.group is None or len(x) < 2 * self.group:
            return super().forward(x)
        chunks = x.tensor_split(round(len(x) / self.group))
        out = [super().forward(chunks[0])]
        for chunk in chunks[1:]:
            out.append(
                nn.functional.batch_norm(
                    chunk, None, None, self.weight, self.bias, True, 0.0, self.eps
                )
            )
        return torch.cat(out)


FEATURE_CHUNK = 256  # images per encoder pass in the augmented probe (MAE's 16384 batch is
# 32 GPUs × 512; one process gathers a batch's features chunk by chunk)

# (epoch) -> that epoch's (features, labels) batches on the head's device
EpochBatches = Callable[[int], Iterable[tuple[Tensor, Tensor]]]


def train_linear_head(
    batches: EpochBatches,
    dim: int,
    num_classes: int,
    steps_per_epoch: int,
    recipe: LinearSettings,
    seed: int,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """BatchNorm (no affine, eps 1e-6) → linear (trunc-normal 0.01), trained with MAE's LARS
    (or SGD) under warmup + cosine per step; returned in eval mode."""
    torch.manual_seed(seed)
    norm = PerDeviceBatchNorm(dim, recipe.bn_batch, affine=False, eps=1e-6)
    head = nn.Sequential(norm, nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    head.to(device)
    lr = recipe.base_lr * recipe.batch_size / recipe.lr_batch_divisor
    if recipe.optimizer == "lars":
        opt: torch.optim.Optimizer = mae_lars(
            head, lr, recipe.weight_decay, recipe.momentum, recipe.trust_coeff
        )
    elif recipe.optimizer == "sgd":
        opt = torch.optim.SGD(
            head.parameters(), lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
        )
    else:
        raise ValueError(
            f"linear probe optimizer must be 'lars' or 'sgd', got {recipe.optimizer!r}"
        )
    scheduler = build_scheduler(
        opt, recipe.epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch
    )
    step, losses = 0, []
    head.train()

    def mean_loss() -> str:
        return f"loss {float(torch.stack(losses).mean()) if losses else float('nan'):.4f}"

    epochs = range(recipe.epochs)
    for epoch in tracked(epochs, recipe.epochs, "linear probe", unit="epoch", note=mean_loss):
        losses.clear()
        for features, labels in batches(epoch):
            if len(labels) < 2:
                continue  # BatchNorm needs two samples
            scheduler.step_update(step)
            loss = nn.functional.cross_entropy(head(features), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())  # no device sync per step
            step += 1
    head.eval()
    return head


@torch.no_grad()
def head_accuracy(head: nn.Module, features: Tensor, labels: Tensor) -> float:
    predicted = head(features.to(labels.device)).argmax(dim=1)
    return float((predicted == labels).float().mean())


def shuffled_batches(features: Tensor, labels: Tensor, size: int, seed: int) -> EpochBatches:
    """Cached features in a new seeded order every epoch, ``size`` at a time."""
    generator = torch.Generator().manual_seed(seed)

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(features), generator=generator).to(features.device)
        for start in range(0, len(order), size):
            index = order[start : start + size]
            yield features[index], labels[index]

    return batches


def linear_probe_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    num_classes: int,
    recipe: LinearSettings,
    seed: int = 0,
) -> float:
    """The probe on features extracted once (the evaluation view, no augmentation)."""
    size = recipe.batch_size
    batches = shuffled_batches(train_features, train_labels, size, seed)
    per_epoch = max(1, math.ceil(len(train_features) / size))
    head = train_linear_head(batches, train_features.shape[1], num_classes, per_epoch, recipe, seed)
    return head_accuracy(head, val_features, val_labels)


def augmented_linear_probe_accuracy(
    backbone: ViTBackbone,
    train_views: SeededViews,
    feature: str,
    val_features: Tensor,
    val_labels: Tensor,
    num_classes: int,
    recipe: LinearSettings,
    seed: int,
    device: torch.device,
    num_workers: int = 0,
) -> float:
    """MAE's probe: every epoch a fresh seeded RandomResizedCrop + flip view of each training
    image goes through the frozen encoder (eval mode, no gradient), so the head never sees the
    same features twice; the validation features are the evaluation view's."""
    size = recipe.batch_size
    backbone.eval()

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        train_views.set_epoch(epoch)
        order = epoch_batches(len(train_views), size, seed=seed, epoch=epoch)  # drop_last
        # The encoder sees chunks of at most FEATURE_CHUNK images; the head, whole batches.
        chunks = [b[i : i + FEATURE_CHUNK] for b in order for i in range(0, size, FEATURE_CHUNK)]
        loader = iter(DataLoader(train_views, batch_sampler=chunks, num_workers=num_workers))
        for _ in order:
            features, labels = [], []
            for _ in range(math.ceil(size / FEATURE_CHUNK)):
                images, targets = next(loader)
                with torch.no_grad():
                    pooled = backbone.pooled_features(images.to(device), recipe.layer)
                    features.append(pooled[feature].float())
                labels.append(torch.as_tensor(targets).to(device))
            yield torch.cat(features), torch.cat(labels)

    # MAE drops the last partial batch
    per_epoch = steps_per_epoch(len(train_views), size, key="classification.linear.batch_size")
    head = train_linear_head(
        batches, val_features.shape[1], num_classes, per_epoch, recipe, seed, device
    )
    return head_accuracy(head, val_features.to(device), val_labels.to(device))
